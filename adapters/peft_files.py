"""Reading a PEFT adapter directory: `adapter_config.json` plus `adapter_model.safetensors`."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from deltaserve.adapters.base import (
    AdapterFormatError,
    AdapterMismatchError,
    BaseModelSpec,
    LinearShape,
    UnsupportedAdapterError,
)
from deltaserve.adapters.directory import AdapterDirectory
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


@dataclass(frozen=True)
class PeftFiles:
    path: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "")).upper()


# adapter_config.json is a few kilobytes; the cap bounds what a hostile file can make the parser do.
CONFIG_MAX_BYTES = 1 << 20


def read_config(directory: AdapterDirectory) -> dict[str, Any]:
    """Read and parse `adapter_config.json`, naming the problem when it cannot."""
    where = f"{os.path.join(directory.path, CONFIG_NAME)!r}"
    if not directory.has(CONFIG_NAME):
        raise AdapterFormatError(f"{where} is missing: not a PEFT adapter directory")
    data = directory.read(CONFIG_NAME, CONFIG_MAX_BYTES, f"the {CONFIG_MAX_BYTES}-byte cap on adapter configs")
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise AdapterFormatError(f"{where} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise AdapterFormatError(f"{where} is not valid JSON: {err}") from None
    except RecursionError:
        raise AdapterFormatError(f"{where} nests JSON too deeply") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{where} must hold a JSON object")
    return config


@dataclass(frozen=True)
class ReadOptions:
    """Server policy for reading adapters: pickle is refused unless allowed; weight files above `max_bytes`
    too; with `roots`, directories are confined to them (see deltaserve.adapters.directory)."""

    allow_pickle: bool = False
    max_bytes: int | None = None
    roots: tuple[str, ...] = ()
    compute_dtype: torch.dtype = torch.float32  # what the device computes in: parsed values must be finite in it


DEFAULT_READ_OPTIONS = ReadOptions()


def read_weights(directory: AdapterDirectory, options: ReadOptions = DEFAULT_READ_OPTIONS) -> dict[str, torch.Tensor]:
    """Load `adapter_model.safetensors` on the CPU. Pickle files are refused (unpickling runs code) unless
    the server allows them, and even then they are read with torch.load(weights_only=True)."""
    if directory.has(WEIGHTS_NAME):
        return read_safetensors(directory, WEIGHTS_NAME, options)
    pickled = [name for name in PICKLE_WEIGHTS if directory.has(name)]
    if pickled and options.allow_pickle:
        return read_pickle(directory, pickled[0], options)
    if pickled:
        raise AdapterFormatError(
            f"{pickled[0]!r} is a pickle file, which can run arbitrary code when loaded; deltaserve loads "
            f"{WEIGHTS_NAME} only (convert it with safetensors, or start the server with --allow-pickle)"
        )
    raise AdapterFormatError(f"{os.path.join(directory.path, WEIGHTS_NAME)!r} is missing")


def _weights_bytes(directory: AdapterDirectory, name: str, options: ReadOptions) -> bytes:
    return directory.read(name, options.max_bytes, "--max-adapter-bytes")


def read_safetensors(directory: AdapterDirectory, name: str, options: ReadOptions) -> dict[str, torch.Tensor]:
    data = _weights_bytes(directory, name, options)
    try:
        return load_safetensors(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"cannot read {name!r} (truncated or corrupt?): {err}") from None


def read_pickle(directory: AdapterDirectory, name: str, options: ReadOptions) -> dict[str, torch.Tensor]:
    data = _weights_bytes(directory, name, options)
    try:
        tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad pickles; all mean the same to the caller
        raise AdapterFormatError(f"cannot read {name!r} as a weights-only pickle: {err}") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise AdapterFormatError(f"{name!r} does not hold a flat dict of tensors")
    return tensors


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. One reduction pass (min and max propagate nan, and show an inf) instead
    of a boolean tensor as large as the input: the check runs on every tensor of every load."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not all_finite(tensor):
        raise AdapterFormatError(f"tensor {name!r} holds non-finite values (nan or inf)")


def check_vector(name: str, tensor: torch.Tensor, length: int) -> torch.Tensor:
    """A finite floating-point vector of `length` entries (PEFT saves some as [n, 1] or [1, n]), as fp32.
    Not a vector at all: the file is malformed; a vector of another length: it does not fit this base."""
    if not tensor.is_floating_point() or sum(size != 1 for size in tensor.shape) > 1:
        raise AdapterFormatError(f"tensor {name!r} has shape {tuple(tensor.shape)}; expected a floating-point vector")
    if tensor.numel() != length:
        raise AdapterMismatchError(f"tensor {name!r} has shape {tuple(tensor.shape)}; expected {length} values")
    check_finite(name, tensor)
    return tensor.reshape(length).to(torch.float32).contiguous()


def linear_shape(module: str, spec: BaseModelSpec, kind: str) -> LinearShape:
    """The base linear layer an adapter names, or the error naming the module."""
    shape = spec.linear_layers.get(module)
    if shape is not None:
        return shape
    if module in spec.other_modules:
        raise UnsupportedAdapterError(f"{kind} on {module!r}, which is not a linear layer, is not served")
    raise AdapterMismatchError(f"the adapter targets {module!r}, which the base model does not have")


# PEFT keys: base_model.model.<module>.<family>[.<adapter name>][.weight|.bias], e.g.
# `...q_proj.lora_A.weight`, `...q_proj.lora_A.default.weight`, `...q_proj.lora_E`, `...k_proj.ia3_l`.
_FAMILIES = "lora_A|lora_B|lora_E|lora_magnitude_vector|lora_embedding_A|lora_embedding_B|ia3_l|base_layer|bias"
_MODULE_KEY = re.compile(rf"^base_model\.model\.(?P<module>.+?)\.(?P<family>{_FAMILIES})(?P<tail>(?:\.[^.]+)*)$")


def group_module_tensors(
    tensors: Mapping[str, torch.Tensor], parts: frozenset[str], unsupported: Mapping[str, str], kind: str
) -> dict[str, dict[str, torch.Tensor]]:
    """{'model.layers.0.self_attn.q_proj': {'lora_A.weight': ..., 'bias': ...}} from PEFT's flat key space.

    A part is the family plus `.weight`/`.bias` when saved with one; a trained base bias (`.base_layer.bias`
    or `.bias`) is the part "bias". Keys outside `parts` are refused, naming the tensor."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _MODULE_KEY.match(key)
        if match is None:
            raise AdapterFormatError(f"unexpected tensor {key!r} in a {kind} adapter's weights")
        family = match["family"]
        if family in unsupported:
            raise UnsupportedAdapterError(f"{unsupported[family]} is not served (tensor {key!r})")
        last = match["tail"].rsplit(".", 1)[-1]
        part = family if family == "bias" or last not in ("weight", "bias") else f"{family}.{last}"
        part = "bias" if part == "base_layer.bias" else part
        if part not in parts:
            raise AdapterFormatError(f"unexpected tensor {key!r} in a {kind} adapter's weights")
        grouped.setdefault(match["module"], {})[part] = tensor
    return grouped
