"""Reading a PEFT adapter directory: `adapter_config.json` plus `adapter_model.safetensors`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from deltaserve.adapters.base import AdapterFormatError
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


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Load `adapter_model.safetensors` on the CPU. Pickle files are never unpickled (they run code)."""
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.exists(weights_path):
        pickled = [name for name in PICKLE_WEIGHTS if os.path.exists(os.path.join(path, name))]
        if pickled:
            raise AdapterFormatError(
                f"{os.path.join(path, pickled[0])!r} is a pickle file, which can run arbitrary code when "
                f"loaded; deltaserve loads {WEIGHTS_NAME} only (convert it with safetensors)"
            )
        raise AdapterFormatError(f"{weights_path!r} is missing")
    try:
        return load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"cannot read {weights_path!r} (truncated or corrupt?): {err}") from None


def read_peft_dir(path: str) -> PeftFiles:
    config = read_config(path)
    return PeftFiles(path=path, config=config, tensors=read_weights(path))


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise AdapterFormatError(f"tensor {name!r} holds non-finite values (nan or inf)")
