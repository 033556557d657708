"""Reading a PEFT adapter directory: `adapter_config.json` plus `adapter_model.safetensors`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from deltaserve.adapters.base import AdapterFormatError, AdapterLimitError
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
            return _read_pickle(pickled[0], options)
        if pickled:
            raise AdapterFormatError(
                f"{pickled[0]!r} is a pickle file, which can run arbitrary code when loaded; deltaserve loads "
                f"{WEIGHTS_NAME} only (convert it with safetensors, or start the server with --allow-pickle)"
            )
        raise AdapterFormatError(f"{weights_path!r} is missing")
    _check_size(weights_path, options)
    try:
        return load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"cannot read {weights_path!r} (truncated or corrupt?): {err}") from None


def _read_pickle(file: str, options: ReadOptions) -> dict[str, torch.Tensor]:
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
