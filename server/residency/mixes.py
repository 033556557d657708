"""Weighted mixes of LoRA adapters, combined as PEFT's `add_weighted_adapter` defines them.

- "cat": the ranks are concatenated, A' = [w_i s_i A_i], B' = [B_i], so delta = sum_i w_i s_i B_i A_i exactly.
- "linear": all ranks equal; A' = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i and B' = sum_i sqrt|w_i s_i| B_i, PEFT's
  (rough) task arithmetic on the factors, cross terms included.
The result is an ordinary LoRA adapter (scaling 1, i.e. PEFT's r = lora_alpha = new rank) that the registry
serves from a device slot like any other, so requests for it run in the mixed batch and nothing is merged
into the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from deltaserve.adapters import AdapterKind, ModuleDelta, ParsedAdapter
from deltaserve.server.errors import InvalidRequestError, MergeError

MIX_METHODS = ("cat", "linear")


@dataclass(frozen=True)
class MixSpec:
    method: str
    parts: tuple[tuple[str, float], ...]  # (adapter id, weight)

    @property
    def mix_id(self) -> str:
        """The cache key and the id the mix is served under (adapter ids cannot contain '|')."""
        return "mix|" + self.method + "|" + "|".join(f"{adapter}={weight!r}" for adapter, weight in self.parts)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(adapter for adapter, _ in self.parts)


def mix_spec(method: str, parts: list[tuple[str, float]]) -> MixSpec:
    method = method or "cat"
    if method not in MIX_METHODS:
        raise InvalidRequestError(f"mix_method {method!r} is not served; use one of {', '.join(MIX_METHODS)}")
    if not parts:
        raise InvalidRequestError("adapter_mix is empty")
    for adapter, weight in parts:
        if not adapter:
            raise InvalidRequestError("adapter_mix names an empty adapter_id")
        if not math.isfinite(weight):
            raise InvalidRequestError(f"adapter_mix weight for {adapter!r} is not finite")
    if len({adapter for adapter, _ in parts}) != len(parts):
        raise InvalidRequestError("adapter_mix names an adapter twice")
    return MixSpec(method, tuple(parts))


def _factors(adapter: ParsedAdapter, module: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A [r, in], unscaled B [out, r] and the scaling, as PEFT holds them."""
    weights = adapter.modules[module]
    scaling = adapter.lora_scaling[module]
    return weights.lora_a, weights.lora_b_scaled / scaling, scaling


def combine(spec: MixSpec, adapters: list[ParsedAdapter]) -> ParsedAdapter:
    """Build the mixed adapter from the parsed components (host fp32)."""
    if spec.method == "linear":
        ranks = {adapter.rank for adapter in adapters}
        if len(ranks) != 1 or any(len({w.rank for w in a.modules.values()}) != 1 for a in adapters):
            raise MergeError(f"the linear mix needs adapters of one rank; got ranks {sorted(ranks)} (use 'cat')")
    weights = [weight for _, weight in spec.parts]
    modules = sorted({name for adapter in adapters for name in adapter.modules})
    combined = {}
    for name in modules:
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if name in a.modules]
        combined[name] = _combine_module(spec.method, name, present)
    return ParsedAdapter(
        path=spec.mix_id, kind=AdapterKind.LORA, modules=combined, lora_scaling=dict.fromkeys(combined, 1.0)
    )


def _combine_module(method: str, name: str, present: list[tuple[ParsedAdapter, float]]) -> ModuleDelta:
    factors = [(*_factors(adapter, name), weight) for adapter, weight in present]
    if method == "cat":
        lora_a = torch.cat([a * (weight * scaling) for a, _, scaling, weight in factors], dim=0)
        lora_b = torch.cat([b for _, b, _, _ in factors], dim=1)
    else:
        lora_a = sum(math.copysign(math.sqrt(abs(w * s)), w * s) * a for a, _, s, w in factors)
        lora_b = sum(math.sqrt(abs(w * s)) * b for _, b, s, w in factors)
    return ModuleDelta(lora_a=lora_a.contiguous(), lora_b_scaled=lora_b.contiguous())
