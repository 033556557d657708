"""An adapter's identity by content: a hash of what its computation depends on, not of where it lives.

`content_digest` hashes the safetensors tensors (sorted by name: name, dtype, shape and the raw bytes; the
file's header order and `__metadata__` do not count) and the adapter config as canonical JSON, less the keys
that do not change the computation (where the base came from, PEFT's bookkeeping). Two directories with the
same digest compute the same deltas, so the server may serve them from one slot and one host copy and share
their prefix-cache blocks; a file changed under the same name has another digest, so it is another version.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from deltaserve.adapters.base import AdapterFormatError
from deltaserve.adapters.directory import AdapterDirectory
from deltaserve.adapters.peft_files import (
    DEFAULT_READ_OPTIONS,
    PICKLE_WEIGHTS,
    WEIGHTS_NAME,
    ReadOptions,
    read_config,
)

# Config keys that say where an adapter came from, not what it computes.
IGNORED_CONFIG_KEYS = frozenset(
    {"base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version"}
)
HEADER_MAX_BYTES = 100 << 20
# The weight files the loaders read: PEFT's, then AdapterHub's (bottleneck adapters).
SAFETENSORS_NAMES = (WEIGHTS_NAME, "adapter.safetensors")
PICKLE_NAMES = (*PICKLE_WEIGHTS, "pytorch_adapter.bin")  # safetensors' own cap on the JSON header


def safetensors_tensor_digest(data: bytes, hasher: Any, where: str = WEIGHTS_NAME) -> None:
    """Feed the tensors of a safetensors file (bytes) into `hasher` in name order; AdapterFormatError if the
    header is malformed or a tensor's byte range lies outside the file."""
    try:
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 or size > min(HEADER_MAX_BYTES, len(data) - 8):
            raise ValueError("header size")
        header = json.loads(data[8 : 8 + size])
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        base = 8 + size
        for name in sorted(key for key in header if key != "__metadata__"):
            info = header[name]
            start, end = info["data_offsets"]
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= len(data) - base):
                raise ValueError(f"tensor {name!r} lies outside the file")
            hasher.update(json.dumps([name, info["dtype"], info["shape"], end - start]).encode())
            hasher.update(memoryview(data)[base + start : base + end])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as err:
        raise AdapterFormatError(f"{where!r} is not a valid safetensors file: {err}") from None


def content_digest(path: str, options: ReadOptions = DEFAULT_READ_OPTIONS) -> str:
    """'sha256:<hex>' of the adapter directory at `path` (read under `options`' roots and size cap)."""
    hasher = hashlib.sha256()
    with AdapterDirectory(path, options.roots) as directory:
        config = {k: v for k, v in read_config(directory).items() if k not in IGNORED_CONFIG_KEYS}
        hasher.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
        safetensors = next((name for name in SAFETENSORS_NAMES if directory.has(name)), None)
        pickled = next((name for name in PICKLE_NAMES if directory.has(name)), None)
        if safetensors is not None:
            safetensors_tensor_digest(directory.read(safetensors, options.max_bytes, "--max-adapter-bytes"), hasher)
        elif pickled is not None:  # hashed as bytes, never unpickled here (the loader decides whether to)
            hasher.update(b"pickle:" + directory.read(pickled, options.max_bytes, "--max-adapter-bytes"))
        else:  # nothing the loader could read: it names the problem; the digest needs only to be stable
            hasher.update(b"no-weights")
    return "sha256:" + hasher.hexdigest()
