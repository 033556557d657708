"""The registry of adapter kinds: a directory's format and type -> the kind module that parses it.

PEFT directories name their type in `adapter_config.json` (`peft_type`); AdapterHub bottleneck directories
hold their settings under `config` (with `mh_adapter` / `output_adapter`) instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from deltaserve.adapters.adalora import parse_adalora
from deltaserve.adapters.base import (
    AdapterError,
    AdapterFormatError,
    AdapterKind,
    BaseModelSpec,
    UnsupportedAdapterError,
)
from deltaserve.adapters.bottleneck import is_adapterhub_config, read_bottleneck
from deltaserve.adapters.directory import AdapterDirectory
from deltaserve.adapters.ia3 import parse_ia3
from deltaserve.adapters.lora import parse_lora
from deltaserve.adapters.peft_files import (
    DEFAULT_READ_OPTIONS,
    PeftFiles,
    ReadOptions,
    all_finite,
    read_config,
    read_weights,
)
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
    """Read, validate and parse the adapter in `path` (config first, so a wrong kind fails fast). The
    directory is opened once, confined to `options.roots`, and every file is read relative to it. A failure
    carries the kind the config declared, so nobody needs to read the path again to label it."""
    kind = None
    try:
        with AdapterDirectory(path, options.roots) as directory:
            config = read_config(directory)
            kind = declared_kind(config)
            if kind is AdapterKind.BOTTLENECK:
                return check_device_ready(read_bottleneck(directory, config, spec, options), options.compute_dtype)
            files = PeftFiles(path=path, config=config, tensors=read_weights(directory, options))
        return check_device_ready(parser_for(config)(files, spec), options.compute_dtype)
    except AdapterError as err:
        err.declared_kind = kind
        raise


def check_device_ready(adapter: ParsedAdapter, dtype: torch.dtype) -> ParsedAdapter:
    """Every value as the device will compute with it (scaling folded in, cast to the compute dtype) must be
    finite: a finite file can still overflow (lora_alpha 1e39, or 1e5 in fp16), and one non-finite value
    in a shared batch could otherwise reach other rows' results."""
    for name, tensor in adapter.named_tensors():
        if not all_finite(tensor.to(dtype)):
            raise AdapterFormatError(
                f"{name} is not finite in {str(dtype).removeprefix('torch.')} once scaled (nan, inf or overflow)"
            )
    return adapter
