"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) read from the AdapterHub `adapters` library's format.

PEFT has no bottleneck type, so these come as AdapterHub saves them: `adapter_config.json` with the settings
under "config" (plus "hidden_size", "model_type", "name", "version") and the weights in `adapter.safetensors`
(or the pickle `pytorch_adapter.bin`, read only with --allow-pickle). Tensors, per decoder layer i and site
(`attention_adapters` after the attention block, `output_adapters` after the feed-forward block):
    [model.]layers.{i}.{site}.adapters.{name}.adapter_down.0.weight [m, D]  .adapter_down.0.bias [m]
    [model.]layers.{i}.{site}.adapters.{name}.adapter_up.weight [D, m]      .adapter_up.bias [D]
    optional .scaling ([1] or [D], for scaling "learned" / "channel")

For a pre-norm decoder layer whose block maps its input r (the residual stream) to h, the library computes
A(x) = s * (W_up act(W_down x + b_down) + b_up) and the layer's output r + h + A(x), where the adapter's input
x is h (Houlsby: `original_ln_before` false), h + r (Pfeiffer: `original_ln_before` true) or r (parallel
adapters, `is_parallel`). deltaserve serves exactly those; settings that add layer norms or gates inside
the adapter, or that change how the residual is added, are refused by name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from deltaserve.adapters.base import (
    AdapterFormatError,
    AdapterKind,
    AdapterMismatchError,
    BaseModelSpec,
    UnsupportedAdapterError,
)
from deltaserve.adapters.directory import AdapterDirectory
from deltaserve.adapters.peft_files import ReadOptions, check_finite, check_vector, read_pickle, read_safetensors
from deltaserve.adapters.weights import ATTENTION_SITE, OUTPUT_SITE, Bottleneck, ParsedAdapter

SAFE_WEIGHTS_NAME = "adapter.safetensors"
PICKLE_WEIGHTS_NAME = "pytorch_adapter.bin"

INPUT_BLOCK_OUTPUT = "block_output"  # x = h (Houlsby)
INPUT_WITH_RESIDUAL = "with_residual"  # x = h + r (Pfeiffer)
INPUT_RESIDUAL = "residual"  # x = r (parallel)

_SITES = {"attention_adapters": ATTENTION_SITE, "output_adapters": OUTPUT_SITE}
_KEY = re.compile(
    r"^(?:model\.)?layers\.(?P<layer>\d+)\.(?P<site>attention_adapters|output_adapters)\.adapters\.(?P<name>[^.]+)\."
    r"(?P<part>adapter_down\.0\.weight|adapter_down\.0\.bias|adapter_up\.weight|adapter_up\.bias|scaling)$"
)
# Settings that add computation deltaserve does not serve when set (layer norms or gates inside the adapter,
# PHM layers, cross-attention adapters, invertible embedding adapters).
_REFUSED_SETTINGS = ("ln_before", "ln_after", "use_gating", "phm_layer", "cross_adapter", "inv_adapter")
# Configs written before the library versioned them used "gelu" for the tanh approximation.
_LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}
ACTIVATIONS = frozenset(
    {"relu", "swish", "silu", "gelu", "gelu_new", "gelu_fast", "quick_gelu", "tanh", "sigmoid", "leakyrelu", "linear"}
)


def is_adapterhub_config(config: Mapping[str, Any]) -> bool:
    inner = config.get("config")
    return (
        "peft_type" not in config and isinstance(inner, dict) and ("mh_adapter" in inner or "output_adapter" in inner)
    )


def _input_mode(settings: Mapping[str, Any]) -> str:
    """Which tensor the adapter reads, refusing residual wiring that is not `r + h + A(x)`."""
    residual_added = bool(settings.get("original_ln_after", True))
    if settings.get("is_parallel"):
        if not residual_added:
            raise UnsupportedAdapterError("parallel bottleneck adapters with original_ln_after=false are not served")
        return INPUT_RESIDUAL
    before = bool(settings.get("original_ln_before", False))
    residual_before_ln = settings.get("residual_before_ln", True)
    if residual_before_ln not in (True, False):
        raise UnsupportedAdapterError(f"bottleneck residual_before_ln={residual_before_ln!r} is not served")
    # The library returns A(x) + res + [original_ln_after] r with res = h, or x when residual_before_ln is false.
    residual_count = int(residual_added) + int(before and not residual_before_ln)
    if residual_count != 1:
        raise UnsupportedAdapterError(
            f"bottleneck adapters with original_ln_before={before}, original_ln_after={residual_added}, "
            f"residual_before_ln={residual_before_ln} (the residual stream added {residual_count} times) are not served"
        )
    return INPUT_WITH_RESIDUAL if before else INPUT_BLOCK_OUTPUT


def _activation(settings: Mapping[str, Any], versioned: bool) -> str:
    name = str(settings.get("non_linearity", "")).lower()
    if not versioned:
        name = _LEGACY_ACTIVATIONS.get(name, name)
    if name not in ACTIVATIONS:
        raise UnsupportedAdapterError(
            f"bottleneck non_linearity {name!r} is not served; served: {', '.join(sorted(ACTIVATIONS))}"
        )
    return name


def _settings(config: Mapping[str, Any]) -> tuple[str, str, Any]:
    settings = config["config"]
    for key in _REFUSED_SETTINGS:
        if settings.get(key):
            raise UnsupportedAdapterError(f"bottleneck adapters with {key}={settings[key]!r} are not served")
    if str(settings.get("architecture") or "bottleneck") not in ("bottleneck", "union"):
        raise UnsupportedAdapterError(f"AdapterHub architecture {settings['architecture']!r} is not served")
    scaling = settings.get("scaling", 1.0)
    if not isinstance(scaling, (int, float)) and scaling not in ("learned", "channel"):
        raise UnsupportedAdapterError(f"bottleneck scaling {scaling!r} is not served")
    return _input_mode(settings), _activation(settings, "version" in config), scaling


def _read_tensors(directory: AdapterDirectory, options: ReadOptions) -> dict[str, torch.Tensor]:
    if directory.has(SAFE_WEIGHTS_NAME):
        return read_safetensors(directory, SAFE_WEIGHTS_NAME, options)
    if not directory.has(PICKLE_WEIGHTS_NAME):
        raise AdapterFormatError(f"{os.path.join(directory.path, SAFE_WEIGHTS_NAME)!r} is missing")
    if not options.allow_pickle:
        raise AdapterFormatError(
            f"{PICKLE_WEIGHTS_NAME!r} is a pickle file, which can run arbitrary code when loaded; deltaserve loads "
            f"{SAFE_WEIGHTS_NAME} only (convert it with safetensors, or start the server with --allow-pickle)"
        )
    return read_pickle(directory, PICKLE_WEIGHTS_NAME, options)


def _group(tensors: Mapping[str, torch.Tensor]) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    names = set()
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterFormatError(f"unexpected tensor {key!r} in a bottleneck adapter's weights")
        names.add(match["name"])
        grouped.setdefault((int(match["layer"]), _SITES[match["site"]]), {})[match["part"]] = tensor
    if len(names) > 1:
        raise AdapterFormatError(
            f"the weights hold several adapters ({', '.join(sorted(names))}); save one per directory"
        )
    return grouped


def _scale(where: str, parts: dict[str, torch.Tensor], hidden: int, scaling: Any) -> torch.Tensor:
    """The adapter output's scaling as a [hidden] vector: a constant, or the saved learned/per-channel one."""
    if scaling not in ("learned", "channel"):
        return torch.full((hidden,), float(scaling))
    saved = parts.get("scaling")
    if saved is None:
        raise AdapterFormatError(f"bottleneck {where} has scaling={scaling!r} but no saved scaling tensor")
    if saved.numel() not in (1, hidden) or not saved.is_floating_point():
        raise AdapterMismatchError(f"tensor '{where}.scaling' has shape {tuple(saved.shape)}; expected 1 or {hidden}")
    check_finite(f"{where}.scaling", saved)
    return saved.float().reshape(-1).expand(hidden).clone()


def _module(where: str, parts: dict[str, torch.Tensor], hidden: int, settings: tuple[str, str, Any]) -> Bottleneck:
    input_mode, activation, scaling = settings
    missing = {"adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias"} - set(parts)
    if missing:
        raise AdapterFormatError(f"bottleneck {where} has no {', '.join(sorted(missing))}")
    down, up = parts["adapter_down.0.weight"], parts["adapter_up.weight"]
    size = down.shape[0] if down.dim() == 2 else -1
    if tuple(down.shape) != (size, hidden) or tuple(up.shape) != (hidden, size):
        raise AdapterMismatchError(
            f"bottleneck {where}: adapter_down {tuple(down.shape)} / adapter_up {tuple(up.shape)} do not fit the "
            f"base model's hidden size {hidden}"
        )
    for part in ("adapter_down.0.weight", "adapter_up.weight"):
        check_finite(f"{where}.{part}", parts[part])
    down_bias = check_vector(f"{where}.adapter_down.0.bias", parts["adapter_down.0.bias"], size)
    up_bias = check_vector(f"{where}.adapter_up.bias", parts["adapter_up.bias"], hidden)
    scale = _scale(where, parts, hidden, scaling)
    return Bottleneck(
        down=down.float().contiguous(),
        down_bias=down_bias,
        up=(up.float() * scale[:, None]).contiguous(),
        up_bias=up_bias * scale,
        activation=activation,
        input_mode=input_mode,
    )


def read_bottleneck(
    directory: AdapterDirectory, config: Mapping[str, Any], spec: BaseModelSpec, options: ReadOptions
) -> ParsedAdapter:
    if spec.bottleneck_refusal is not None:
        raise UnsupportedAdapterError(spec.bottleneck_refusal)
    settings = _settings(config)
    geometry = spec.geometry
    if geometry is None:
        raise UnsupportedAdapterError("bottleneck adapters need the model's geometry, which this server lacks")
    declared = config.get("hidden_size")
    if declared is not None and declared != geometry.hidden_size:
        raise AdapterMismatchError(
            f"the adapter was trained for hidden_size {declared}; the base model's is {geometry.hidden_size}"
        )
    grouped = _group(_read_tensors(directory, options))
    if not grouped:
        raise AdapterFormatError(f"{directory.path!r} holds no bottleneck weights")
    bottlenecks = {}
    for (layer, site), parts in sorted(grouped.items()):
        if layer >= geometry.num_layers:
            raise AdapterMismatchError(
                f"the adapter has a bottleneck in layer {layer}; the base model has {geometry.num_layers} layers"
            )
        where = f"layers.{layer}.{site}"
        bottlenecks[(layer, site)] = _module(where, parts, geometry.hidden_size, settings)
    return ParsedAdapter(path=directory.path, kind=AdapterKind.BOTTLENECK, bottlenecks=bottlenecks)
