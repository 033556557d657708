"""LoRA (and rsLoRA, rank/alpha patterns) read from PEFT's format.

PEFT computes, per target linear layer, ``y = base(x) + scaling * B (A x)`` with ``A: [r, in]``,
``B: [out, r]`` and ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), where ``r`` and ``alpha``
may be overridden per module by ``rank_pattern`` / ``alpha_pattern``. The parsed adapter keeps A and B per
module with the scaling folded into B, so serving needs no per-module scalar.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from deltaserve.adapters.base import (
    AdapterFormatError,
    AdapterKind,
    AdapterMismatchError,
    BaseModelSpec,
    UnsupportedAdapterError,
    tensor_bytes,
)
from deltaserve.adapters.peft_files import PeftFiles, check_finite

# PEFT saves weights as `base_model.model.<module>.lora_A.weight`, sometimes with the adapter name
# before `.weight` (`lora_A.default.weight`).
_WEIGHT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
# With `save_embedding_layers`, PEFT also stores a copy of the base weight of a targeted lm_head/embedding.
_BASE_COPY_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.base_layer\.weight$")
_UNSUPPORTED_KEY_PARTS = {
    "lora_embedding_A": "LoRA on embedding layers",
    "lora_embedding_B": "LoRA on embedding layers",
    "lora_magnitude_vector": "DoRA (use_dora)",
}


@dataclass(frozen=True)
class LoraConfig:
    """The parts of PEFT's LoraConfig that change what a served adapter computes."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    fan_in_fan_out: bool

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> LoraConfig:
        _refuse_unsupported_features(config)
        try:
            r = int(config.get("r", 8))
            alpha = float(config.get("lora_alpha", 8))
            rank_pattern = {str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()}
            alpha_pattern = {str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()}
        except (TypeError, ValueError) as err:
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
        )

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """Rank and alpha for one module, honouring the patterns as PEFT's `get_pattern_key` does."""
        rank = self.r
        for pattern, value in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                rank = value
                break
        alpha = self.lora_alpha
        for pattern, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        return rank, alpha

    def scaling(self, module: str) -> float:
        rank, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _refuse_unsupported_features(config: Mapping[str, Any]) -> None:
    """LoRA features that change the computation in ways this kind does not serve (yet)."""
    if config.get("use_dora"):
        raise UnsupportedAdapterError("DoRA adapters (use_dora=true) are not served yet")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise UnsupportedAdapterError(f"LoRA with trained biases (bias={bias!r}) is not served yet")
    if config.get("lora_bias"):
        raise UnsupportedAdapterError("LoRA with lora_bias=true is not served yet")
    if config.get("modules_to_save"):
        raise UnsupportedAdapterError(
            f"adapters with fully trained modules (modules_to_save={config['modules_to_save']!r}) "
            "are not served: they would replace base weights for every request"
        )
    for key in ("layer_replication", "target_parameters", "trainable_token_indices", "use_qalora"):
        if config.get(key):
            raise UnsupportedAdapterError(f"LoRA option {key}={config[key]!r} is not served")


@dataclass(frozen=True)
class LoraModuleWeights:
    """One target layer's low-rank delta: delta(x) = B_scaled (A x)."""

    lora_a: torch.Tensor  # [r, in_features]
    lora_b_scaled: torch.Tensor  # [out_features, r], scaling already applied

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass(frozen=True)
class LoraAdapter:
    """A parsed, validated LoRA adapter on the host (fp32)."""

    path: str
    config: LoraConfig
    modules: dict[str, LoraModuleWeights]  # base module name -> weights

    kind = AdapterKind.LORA

    @property
    def rank(self) -> int:
        return max(weights.rank for weights in self.modules.values())

    @property
    def size_bytes(self) -> int:
        return tensor_bytes(t for w in self.modules.values() for t in (w.lora_a, w.lora_b_scaled))

    @property
    def target_modules(self) -> list[str]:
        """Short names of the base modules changed, e.g. ['k_proj', 'q_proj']."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})


def _group_weights(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{'model.layers.0.self_attn.q_proj': {'A': ..., 'B': ...}} from PEFT's flat key space."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for part, feature in _UNSUPPORTED_KEY_PARTS.items():
            if part in key:
                raise UnsupportedAdapterError(f"{feature} is not served yet (tensor {key!r})")
        if _BASE_COPY_KEY.match(key):
            continue  # checked by _check_base_copies
        match = _WEIGHT_KEY.match(key)
        if match is None:
            raise AdapterFormatError(f"unexpected tensor {key!r} in a LoRA adapter's weights")
        grouped.setdefault(match["module"], {})[match["which"]] = tensor
    return grouped


def _module_weights(
    module: str, pair: dict[str, torch.Tensor], config: LoraConfig, spec: BaseModelSpec
) -> LoraModuleWeights:
    if set(pair) != {"A", "B"}:
        missing = "lora_B" if "A" in pair else "lora_A"
        raise AdapterFormatError(f"module {module!r} has no {missing} weight")
    if module not in spec.linear_layers:
        if module in spec.other_modules:
            raise UnsupportedAdapterError(f"LoRA on {module!r}, which is not a linear layer, is not served")
        raise AdapterMismatchError(f"the adapter targets {module!r}, which the base model does not have")
    lora_a, lora_b = pair["A"], pair["B"]
    for which, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise AdapterFormatError(f"{module}.{which} must be a 2-d floating-point matrix")
        check_finite(f"{module}.{which}.weight", tensor)
    shape = spec.linear_layers[module]
    rank, _ = config.rank_and_alpha(module)
    expected_a, expected_b = (rank, shape.in_features), (shape.out_features, rank)
    if tuple(lora_a.shape) != expected_a or tuple(lora_b.shape) != expected_b:
        raise AdapterMismatchError(
            f"{module}: lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} do not fit the base layer "
            f"(expected {expected_a} / {expected_b} for rank {rank}, in={shape.in_features}, "
            f"out={shape.out_features})"
        )
    return LoraModuleWeights(
        lora_a=lora_a.to(torch.float32).contiguous(),
        lora_b_scaled=(lora_b.to(torch.float32) * config.scaling(module)).contiguous(),
    )


def _check_base_copies(tensors: Mapping[str, torch.Tensor], spec: BaseModelSpec) -> None:
    """Saved copies of base weights are accepted only if they equal the resident base: the base is shared
    by every request, so an adapter can never change it (a resized vocabulary fails here too)."""
    for key, tensor in tensors.items():
        match = _BASE_COPY_KEY.match(key)
        if match is None:
            continue
        module = match["module"]
        shape = spec.linear_layers.get(module)
        if shape is None or tuple(tensor.shape) != (shape.out_features, shape.in_features):
            raise AdapterMismatchError(f"{key!r} {tuple(tensor.shape)} does not match the base model's {module!r}")
        base = spec.base_weight(module) if spec.base_weight is not None else None
        if base is not None and not torch.equal(tensor.to(base.dtype), base):
            raise UnsupportedAdapterError(
                f"{key!r} holds modified weights for the base layer {module!r}; adapters that change the shared "
                "base are not served"
            )


def parse_lora(files: PeftFiles, spec: BaseModelSpec) -> LoraAdapter:
    """Validate a LoRA adapter against the base and return its per-module weights (fp32, CPU)."""
    config = LoraConfig.from_dict(files.config)
    _check_base_copies(files.tensors, spec)
    grouped = _group_weights(files.tensors)
    if not grouped:
        raise AdapterFormatError(f"{files.path!r} holds no LoRA weights")
    modules = {name: _module_weights(name, pair, config, spec) for name, pair in sorted(grouped.items())}
    return LoraAdapter(path=files.path, config=config, modules=modules)
