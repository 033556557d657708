"""deltaserve.adapters: adapter kinds — parse adapter directories, validate against the base, represent."""

from deltaserve.adapters.base import (
    AdapterAccessError,
    AdapterError,
    AdapterFormatError,
    AdapterKind,
    AdapterLimitError,
    AdapterMismatchError,
    BaseModelSpec,
    LinearShape,
    ModelGeometry,
    UnsupportedAdapterError,
    tensor_bytes,
)
from deltaserve.adapters.lora import LoraConfig
from deltaserve.adapters.peft_files import ReadOptions
from deltaserve.adapters.registry import load_adapter, served_kinds
from deltaserve.adapters.stack import compose
from deltaserve.adapters.weights import (
    ATTENTION_SITE,
    BOTTLENECK_SITES,
    OUTPUT_SITE,
    Bottleneck,
    ModuleDelta,
    ParsedAdapter,
    Prefix,
)

__all__ = [
    "ATTENTION_SITE",
    "BOTTLENECK_SITES",
    "OUTPUT_SITE",
    "AdapterAccessError",
    "AdapterError",
    "AdapterFormatError",
    "AdapterKind",
    "AdapterLimitError",
    "AdapterMismatchError",
    "BaseModelSpec",
    "Bottleneck",
    "LinearShape",
    "LoraConfig",
    "ModelGeometry",
    "ModuleDelta",
    "ParsedAdapter",
    "Prefix",
    "ReadOptions",
    "UnsupportedAdapterError",
    "compose",
    "load_adapter",
    "served_kinds",
    "tensor_bytes",
]
