"""Reading a PEFT adapter directory: `adapter_config.json` plus `adapter_model.safetensors`."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from deltaserve.adapters.base import (
    AdapterFormatError,
    AdapterLimitError,
    AdapterMismatchError,
    BaseModelSpec,
    LinearShape,
    UnsupportedAdapterError,
)
from safetensors import SafetensorError
from safetensors.torch import load_file

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


def read_config(path: str) -> dict[str, Any]:
    """Read and parse `adapter_config.json`, naming the problem when it cannot."""
    if not os.path.isdir(path):
        raise AdapterFormatError(f"adapter directory {path!r} does not exist or is not a directory")
    config_path = os.path.join(path, CONFIG_NAME)
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise AdapterFormatError(f"{config_path!r} is missing: not a PEFT adapter directory") from None
    except (OSError, UnicodeDecodeError) as err:
        raise AdapterFormatError(f"cannot read {config_path!r}: {err}") from None
    except json.JSONDecodeError as err:
        raise AdapterFormatError(f"{config_path!r} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{config_path!r} must hold a JSON object")
    return config


@dataclass(frozen=True)
class ReadOptions:
    """Server policy for reading weights: pickle is refused unless allowed; files above `max_bytes` too."""

    allow_pickle: bool = False
    max_bytes: int | None = None


DEFAULT_READ_OPTIONS = ReadOptions()


def _check_size(file: str, options: ReadOptions) -> None:
    size = os.path.getsize(file)
    if options.max_bytes is not None and size > options.max_bytes:
        raise AdapterLimitError(
            f"{file!r} is {size} bytes; the server accepts adapters up to {options.max_bytes} bytes "
            "(--max-adapter-bytes)"
        )


def read_weights(path: str, options: ReadOptions = DEFAULT_READ_OPTIONS) -> dict[str, torch.Tensor]:
    """Load `adapter_model.safetensors` on the CPU. Pickle files are refused (unpickling runs code) unless
    the server allows them, and even then they are read with torch.load(weights_only=True)."""
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.exists(weights_path):
        pickled = [os.path.join(path, name) for name in PICKLE_WEIGHTS if os.path.exists(os.path.join(path, name))]
        if pickled and options.allow_pickle:
            return read_pickle(pickled[0], options)
        if pickled:
            raise AdapterFormatError(
                f"{pickled[0]!r} is a pickle file, which can run arbitrary code when loaded; deltaserve loads "
                f"{WEIGHTS_NAME} only (convert it with safetensors, or start the server with --allow-pickle)"
            )
        raise AdapterFormatError(f"{weights_path!r} is missing")
    return read_safetensors(weights_path, options)


def read_safetensors(file: str, options: ReadOptions) -> dict[str, torch.Tensor]:
    _check_size(file, options)
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"cannot read {file!r} (truncated or corrupt?): {err}") from None


def read_pickle(file: str, options: ReadOptions) -> dict[str, torch.Tensor]:
    _check_size(file, options)
    try:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad pickles; all mean the same to the caller
        raise AdapterFormatError(f"cannot read {file!r} as a weights-only pickle: {err}") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise AdapterFormatError(f"{file!r} does not hold a flat dict of tensors")
    return tensors


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
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
