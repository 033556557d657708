"""The registry of adapter kinds: a directory's format and type -> the kind module that parses it.

PEFT directories name their type in `adapter_config.json` (`peft_type`); AdapterHub bottleneck directories
hold their settings under `config` (with `mh_adapter` / `output_adapter`) instead.
"""

from __future__ import annotations

from collections.abc import Callable

from deltaserve.adapters.adalora import parse_adalora
from deltaserve.adapters.base import AdapterFormatError, AdapterKind, BaseModelSpec, UnsupportedAdapterError
from deltaserve.adapters.bottleneck import is_adapterhub_config, read_bottleneck
from deltaserve.adapters.ia3 import parse_ia3
from deltaserve.adapters.lora import parse_lora
from deltaserve.adapters.peft_files import DEFAULT_READ_OPTIONS, PeftFiles, ReadOptions, read_config, read_weights
from deltaserve.adapters.prompts import parse_prefix_tuning, parse_prompt_tuning
from deltaserve.adapters.weights import ParsedAdapter

Parser = Callable[[PeftFiles, BaseModelSpec], ParsedAdapter]

# PEFT's peft_type -> the parser. LoRA's type covers DoRA (use_dora) and trained biases too.
_PEFT_PARSERS: dict[str, Parser] = {
    "LORA": parse_lora,
    "ADALORA": parse_adalora,
    "IA3": parse_ia3,
    "PREFIX_TUNING": parse_prefix_tuning,
    "PROMPT_TUNING": parse_prompt_tuning,
    "P_TUNING": parse_prompt_tuning,
}


def served_kinds() -> list[str]:
    """The kinds a directory may hold (a stack is composed per request, never read from disk)."""
    return [kind.value for kind in AdapterKind if kind is not AdapterKind.STACK]


def parser_for(config: dict) -> Parser:
    """The parser for a PEFT config, or UnsupportedAdapterError naming its type and the kinds served."""
    peft_type = config.get("peft_type")
    if not peft_type:
        raise AdapterFormatError("adapter_config.json has no peft_type (and is not an AdapterHub bottleneck config)")
    parser = _PEFT_PARSERS.get(str(peft_type).upper())
    if parser is None:
        raise UnsupportedAdapterError(
            f"adapter kind {peft_type!r} is not served; served kinds: {', '.join(served_kinds())}"
        )
    return parser


def declared_kind(config: dict) -> AdapterKind:
    """The kind a config declares (before its weights are read), or the error naming an unserved one."""
    if is_adapterhub_config(config):
        return AdapterKind.BOTTLENECK
    parser_for(config)
    peft_type = str(config["peft_type"]).upper()
    if peft_type == "LORA":
        return AdapterKind.DORA if config.get("use_dora") else AdapterKind.LORA
    return AdapterKind(peft_type.lower())


def load_adapter(path: str, spec: BaseModelSpec, options: ReadOptions = DEFAULT_READ_OPTIONS) -> ParsedAdapter:
    """Read, validate and parse the adapter in `path` (config first, so a wrong kind fails fast)."""
    config = read_config(path)
    if is_adapterhub_config(config):
        return read_bottleneck(path, config, spec, options)
    parser = parser_for(config)
    files = PeftFiles(path=path, config=config, tensors=read_weights(path, options))
    return parser(files, spec)
