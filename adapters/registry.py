"""The registry of adapter kinds: PEFT's `peft_type` -> the kind module that parses it."""

from __future__ import annotations

from collections.abc import Callable

from deltaserve.adapters.base import (
    AdapterFormatError,
    AdapterKind,
    BaseModelSpec,
    UnsupportedAdapterError,
)
from deltaserve.adapters.lora import LoraAdapter, parse_lora
from deltaserve.adapters.peft_files import (
    DEFAULT_READ_OPTIONS,
    PeftFiles,
    ReadOptions,
    read_config,
    read_weights,
)

ParsedAdapter = LoraAdapter
Parser = Callable[[PeftFiles, BaseModelSpec], ParsedAdapter]

_PEFT_TYPES: dict[str, AdapterKind] = {"LORA": AdapterKind.LORA}
_PARSERS: dict[AdapterKind, Parser] = {AdapterKind.LORA: parse_lora}


def served_kinds() -> list[str]:
    return [kind.value for kind in _PARSERS]


def kind_for(config: dict) -> AdapterKind:
    """The kind a config declares, or UnsupportedAdapterError naming it and the kinds served."""
    peft_type = config.get("peft_type")
    if not peft_type:
        raise AdapterFormatError("adapter_config.json has no peft_type")
    kind = _PEFT_TYPES.get(str(peft_type).upper())
    if kind is None:
        raise UnsupportedAdapterError(
            f"adapter kind {peft_type!r} is not served; served kinds: {', '.join(served_kinds())}"
        )
    return kind


def load_adapter(path: str, spec: BaseModelSpec, options: ReadOptions = DEFAULT_READ_OPTIONS) -> ParsedAdapter:
    """Read, validate and parse the adapter in `path` (config first, so a wrong kind fails fast)."""
    config = read_config(path)
    kind = kind_for(config)
    files = PeftFiles(path=path, config=config, tensors=read_weights(path, options))
    return _PARSERS[kind](files, spec)
