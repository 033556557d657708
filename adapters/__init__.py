"""deltaserve.adapters: adapter kinds — parse PEFT directories, validate against the base, represent."""

from deltaserve.adapters.base import (
    AdapterError,
    AdapterFormatError,
    AdapterKind,
    AdapterLimitError,
    AdapterMismatchError,
    BaseModelSpec,
    LinearShape,
    UnsupportedAdapterError,
    tensor_bytes,
)
from deltaserve.adapters.lora import LoraAdapter, LoraConfig, LoraModuleWeights
from deltaserve.adapters.peft_files import ReadOptions
from deltaserve.adapters.registry import ParsedAdapter, load_adapter, served_kinds

__all__ = [
    "AdapterError",
    "AdapterFormatError",
    "AdapterKind",
    "AdapterLimitError",
    "AdapterMismatchError",
    "BaseModelSpec",
    "LinearShape",
    "LoraAdapter",
    "LoraConfig",
    "LoraModuleWeights",
    "ParsedAdapter",
    "ReadOptions",
    "UnsupportedAdapterError",
    "load_adapter",
    "served_kinds",
    "tensor_bytes",
]
