"""LoRA, rsLoRA, DoRA and trained biases read from PEFT's LoRA format.

PEFT computes, per target linear layer, ``y = base(x) + scaling * B (A x)`` with ``A: [r, in]``,
``B: [out, r]`` and ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), where ``r`` and ``alpha``
may be overridden per module by ``rank_pattern`` / ``alpha_pattern``. The parsed adapter keeps A and B per
module with the scaling folded into B, so serving needs no per-module scalar.

DoRA (``use_dora``) rescales each output row: ``y = g * (x W^T + s B A x) + b`` with the magnitude vector m and
``g = m / ||W + s B A||`` (row norms, a constant at inference). It is served as a LoRA with ``B' = g s B``, an
output scale ``g`` and a bias correction ``(1 - g) b``, all precomputed at load.

Trained biases (``bias="all"`` / ``"lora_only"``, BitFit-style) become bias deltas ``b_trained - b_base``;
``lora_bias`` adds ``s * lora_B.bias``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from deltaserve.adapters.base import (
    AdapterFormatError,
    AdapterKind,
    AdapterMismatchError,
    BaseModelSpec,
    UnsupportedAdapterError,
)
from deltaserve.adapters.patterns import PatternBudget, compile_patterns, matches
from deltaserve.adapters.peft_files import PeftFiles, check_finite, check_vector, group_module_tensors, linear_shape
from deltaserve.adapters.weights import ModuleDelta, ParsedAdapter, sum_present


@dataclass(frozen=True)
class LoraConfig:
    """The parts of PEFT's LoraConfig that change what a served adapter computes."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    fan_in_fan_out: bool
    # The patterns compiled for PEFT's rule (a key matches a module name ending in it, as a regex), and the
    # time budget their matching shares (deltaserve.adapters.patterns).
    _rank_regexes: tuple = field(default=(), compare=False, repr=False)
    _alpha_regexes: tuple = field(default=(), compare=False, repr=False)
    _budget: PatternBudget = field(default_factory=PatternBudget, compare=False, repr=False)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> LoraConfig:
        refuse_unsupported_features(config)
        try:
            r = int(config.get("r", 8))
            alpha = float(config.get("lora_alpha", 8))
            rank_pattern = {str(k): int(v) for k, v in _mapping(config, "rank_pattern").items()}
            alpha_pattern = {str(k): float(v) for k, v in _mapping(config, "alpha_pattern").items()}
        except (TypeError, ValueError, OverflowError) as err:
            raise AdapterFormatError(f"adapter_config.json has a malformed LoRA field: {err}") from None
        if r <= 0 or any(v <= 0 for v in rank_pattern.values()):
            raise AdapterFormatError("adapter_config.json: LoRA rank r must be positive")
        return cls(
            r=r,
            lora_alpha=alpha,
            use_rslora=bool(config.get("use_rslora", False)),
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
            _rank_regexes=_suffix_regexes("rank_pattern", rank_pattern),
            _alpha_regexes=_suffix_regexes("alpha_pattern", alpha_pattern),
        )

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """Rank and alpha for one module, honouring the patterns as PEFT's `get_pattern_key` does."""
        rank = next(
            (value for regex, value in self._rank_regexes if matches(regex, module, "rank_pattern", self._budget)),
            self.r,
        )
        alpha = next(
            (value for regex, value in self._alpha_regexes if matches(regex, module, "alpha_pattern", self._budget)),
            self.lora_alpha,
        )
        return rank, alpha

    def scaling(self, module: str) -> float:
        rank, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _mapping(config: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, Mapping):
        raise AdapterFormatError(f"adapter_config.json: {key} must be an object")
    return value


def _suffix_regexes(field_name: str, pattern: Mapping[str, Any]) -> tuple:
    """(compiled, value) pairs; PEFT's rule: a key matches a module name that ends in it (as a regex)."""
    compile_patterns(field_name, pattern)  # count, length and syntax of the keys as the user wrote them
    compiled = compile_patterns(field_name, [rf"(.*\.)?({key})$" for key in pattern])
    return tuple(zip(compiled, pattern.values(), strict=True))


def refuse_unsupported_features(config: Mapping[str, Any]) -> None:
    """LoRA options that change the computation in ways deltaserve does not serve."""
    if config.get("modules_to_save"):
        raise UnsupportedAdapterError(
            f"adapters with fully trained modules (modules_to_save={config['modules_to_save']!r}) "
            "are not served: they would replace base weights for every request"
        )
    if config.get("use_dora") and config.get("lora_bias"):
        raise UnsupportedAdapterError("DoRA with lora_bias=true is not served")
    if config.get("target_parameters"):
        raise UnsupportedAdapterError(
            f"LoRA on parameters (target_parameters={config['target_parameters']!r}) is not served: deltaserve "
            "serves LoRA on linear layers, so on a mixture-of-experts model it serves adapters on the attention and "
            "shared modules, not on the experts' 3-D weights"
        )
    for key in ("layer_replication", "trainable_token_indices", "use_qalora"):
        if config.get(key):
            raise UnsupportedAdapterError(f"LoRA option {key}={config[key]!r} is not served")


# Parts of a module's saved tensors that LoRA reads (see peft_files.group_module_tensors for the key layout).
_PARTS = frozenset(
    {"lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector", "bias", "base_layer.weight"}
)
_UNSUPPORTED_PARTS = {"lora_embedding_A": "LoRA on embedding layers", "lora_embedding_B": "LoRA on embedding layers"}


def _module_delta(module: str, parts: dict[str, torch.Tensor], config: LoraConfig, spec: BaseModelSpec) -> ModuleDelta:
    shape = linear_shape(module, spec, "LoRA")
    lora_a, lora_b = parts.get("lora_A.weight"), parts.get("lora_B.weight")
    if (lora_a is None) != (lora_b is None):
        raise AdapterFormatError(f"module {module!r} has no {'lora_B' if lora_b is None else 'lora_A'} weight")
    bias_delta = _trained_bias_delta(module, parts, shape.out_features, spec)
    if lora_a is None:
        return ModuleDelta(bias_delta=bias_delta)
    for which, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise AdapterFormatError(f"{module}.{which} must be a 2-d floating-point matrix")
        check_finite(f"{module}.{which}.weight", tensor)
    rank, _ = config.rank_and_alpha(module)
    expected_a, expected_b = (rank, shape.in_features), (shape.out_features, rank)
    if tuple(lora_a.shape) != expected_a or tuple(lora_b.shape) != expected_b:
        raise AdapterMismatchError(
            f"{module}: lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} do not fit the base layer "
            f"(expected {expected_a} / {expected_b} for rank {rank}, in={shape.in_features}, "
            f"out={shape.out_features})"
        )
    scaling = config.scaling(module)
    lora_a = lora_a.to(torch.float32).contiguous()
    lora_b_scaled = lora_b.to(torch.float32) * scaling
    if "lora_B.bias" in parts:
        lora_bias = check_vector(f"{module}.lora_B.bias", parts["lora_B.bias"], shape.out_features)
        bias_delta = sum_present([bias_delta, scaling * lora_bias])
    if "lora_magnitude_vector" in parts:
        return _dora_delta(module, parts["lora_magnitude_vector"], lora_a, lora_b_scaled, bias_delta, spec)
    return ModuleDelta(lora_a=lora_a, lora_b_scaled=lora_b_scaled.contiguous(), bias_delta=bias_delta)


def _trained_bias_delta(
    module: str, parts: dict[str, torch.Tensor], out_features: int, spec: BaseModelSpec
) -> torch.Tensor | None:
    """A trained bias saved by bias="all"/"lora_only" as the difference to the base's own bias."""
    trained = parts.get("bias")
    if trained is None:
        return None
    trained = check_vector(f"{module}.bias", trained, out_features)
    base = spec.bias_of(module)
    if base is None:
        raise AdapterMismatchError(f"the adapter trains a bias for {module!r}, which has no bias in the base model")
    return trained - base.to(torch.float32)


def _dora_delta(
    module: str,
    magnitude: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b_scaled: torch.Tensor,
    bias_delta: torch.Tensor | None,
    spec: BaseModelSpec,
) -> ModuleDelta:
    """DoRA as LoRA + output scale: g = m / ||W + s B A|| per output row, computed once here in fp32."""
    magnitude = check_vector(f"{module}.lora_magnitude_vector", magnitude, lora_b_scaled.shape[0])
    if spec.dense_weight is None:
        raise UnsupportedAdapterError(f"DoRA needs the base weight of {module!r}, which this server cannot read")
    weight = spec.dense_weight(module).to(torch.float32)
    gain = magnitude / torch.linalg.norm(weight + lora_b_scaled @ lora_a, dim=1)
    check_finite(f"{module}.lora_magnitude_vector / weight norm", gain)
    base_bias = spec.bias_of(module)
    correction = None if base_bias is None else (1 - gain) * base_bias.to(torch.float32)
    return ModuleDelta(
        lora_a=lora_a,
        lora_b_scaled=(gain[:, None] * lora_b_scaled).contiguous(),
        output_scale=gain.contiguous(),
        bias_delta=sum_present([correction, bias_delta]),
    )


def _check_base_copies(module: str, parts: dict[str, torch.Tensor], spec: BaseModelSpec) -> None:
    """Saved copies of base weights are accepted only if they equal the resident base: the base is shared
    by every request, so an adapter can never change it (a resized vocabulary fails here too)."""
    tensor = parts.get("base_layer.weight")
    if tensor is None:
        return
    key = f"{module}.base_layer.weight"
    shape = spec.linear_layers.get(module)
    if shape is None or tuple(tensor.shape) != (shape.out_features, shape.in_features):
        raise AdapterMismatchError(f"{key!r} {tuple(tensor.shape)} does not match the base model's {module!r}")
    base = spec.base_weight(module) if spec.base_weight is not None else None
    if base is not None and not torch.equal(tensor.to(base.dtype), base):
        raise UnsupportedAdapterError(
            f"{key!r} holds modified weights for the base layer {module!r}; adapters that change the shared "
            "base are not served"
        )


def parse_lora(files: PeftFiles, spec: BaseModelSpec) -> ParsedAdapter:
    """Validate a LoRA (or DoRA) adapter against the base and return its per-module deltas (fp32, CPU)."""
    config = LoraConfig.from_dict(files.config)
    grouped = group_module_tensors(files.tensors, _PARTS, _UNSUPPORTED_PARTS, "LoRA")
    for module, parts in grouped.items():
        _check_base_copies(module, parts, spec)
    modules = {
        name: _module_delta(name, parts, config, spec)
        for name, parts in sorted(grouped.items())
        if set(parts) - {"base_layer.weight"}
    }
    if not any(delta.rank for delta in modules.values()):
        raise AdapterFormatError(f"{files.path!r} holds no LoRA weights")
    dora = any(delta.output_scale is not None for delta in modules.values())
    if bool(files.config.get("use_dora")) != dora:
        raise AdapterFormatError(
            "use_dora in adapter_config.json does not match the weights (lora_magnitude_vector "
            f"{'present' if dora else 'missing'})"
        )
    return ParsedAdapter(
        path=files.path,
        kind=AdapterKind.DORA if dora else AdapterKind.LORA,
        modules=modules,
        lora_scaling={name: config.scaling(name) for name in modules},
    )
