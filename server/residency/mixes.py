"""Weighted mixes of LoRA adapters, combined as PEFT's `add_weighted_adapter` defines them.

- "cat": the ranks are concatenated, A' = [w_i s_i A_i], B' = [B_i], so delta = sum_i w_i s_i B_i A_i exactly.
- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune" (all ranks equal): PEFT's task arithmetic
  on the factors, each side on its own: with a_i = sign(w_i s_i) sqrt|w_i s_i| and b_i = sqrt|w_i s_i|,
  A' = merge([A_i], [a_i]) and B' = merge([B_i], [b_i]) (cross terms included), where merge is
  - linear: sum_i c_i T_i;
  - magnitude_prune: each T_i keeps its int(density * numel) largest-magnitude entries, then linear;
  - ties: magnitude-pruned, then each entry keeps only the tasks whose sign agrees with the majority sign
    (the sign of sum_i T_i for "total", of sum_i sign(T_i) for "frequency"; ties count as +), and the kept
    weighted values are averaged over how many were kept (at least 1);
  - dare_linear / dare_ties: like linear / ties, but each entry of T_i is kept with probability `density`
    (and divided by it) instead of by magnitude. PEFT draws the masks from torch's global generator; here
    they come from a private generator seeded with MIX_SEED and drawn in PEFT's order (modules in the
    model's order; per module every A, then every B, adapters in the request's order), so a mix is a pure
    function of its request and PEFT seeded the same way at the start of its merge computes the same one.
- "svd": delta = sum_i w_i s_i B_i A_i, truncated by SVD to the largest component rank r:
  A' = Vh[:r], B' = U[:, :r] diag(S[:r]).
A density of 1 or more prunes nothing (PEFT's rule); a mix of one adapter is "linear" whatever the method
(cat excepted), as in PEFT. The result is an ordinary LoRA adapter (scaling 1, i.e. PEFT's r = lora_alpha =
new rank) that the registry serves from a device slot like any other, so requests for it run in the mixed
batch and nothing is merged into the base.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from deltaserve.adapters import AdapterKind, ModuleDelta, ParsedAdapter
from deltaserve.server.errors import InvalidRequestError, MergeError

MIX_METHODS = ("cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "svd")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # these need a density
SIGN_METHODS = ("total", "frequency")
SAME_RANK_METHODS = ("linear", *DENSITY_METHODS)
MIX_SEED = 0  # the DARE masks' seed: a mix is the same every time it is built


@dataclass(frozen=True)
class MixSpec:
    method: str
    parts: tuple[tuple[str, float], ...]  # (adapter id, weight)
    density: float | None = None  # the share of entries kept (ties, dare_*, magnitude_prune)
    majority_sign_method: str = "total"  # ties, dare_ties

    @property
    def mix_id(self) -> str:
        """The cache key and the id the mix is served under (adapter ids cannot contain '|')."""
        options = "" if self.density is None else f"|density={self.density!r}|sign={self.majority_sign_method}"
        parts = "|".join(f"{adapter}={weight!r}" for adapter, weight in self.parts)
        return "mix|" + self.method + options + "|" + parts

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(adapter for adapter, _ in self.parts)


def mix_spec(
    method: str, parts: list[tuple[str, float]], density: float | None = None, majority_sign_method: str = ""
) -> MixSpec:
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
    sign = majority_sign_method or "total"
    if sign not in SIGN_METHODS:
        raise InvalidRequestError(f"mix_majority_sign_method must be total or frequency, got {majority_sign_method!r}")
    if method in DENSITY_METHODS:
        if density is None or not 0.0 <= density <= 1.0:
            raise InvalidRequestError(f"mix_method {method!r} needs mix_density in [0, 1], got {density}")
        return MixSpec(method, tuple(parts), float(density), sign)
    if density is not None or majority_sign_method:
        raise InvalidRequestError(
            f"mix_density and mix_majority_sign_method apply to {', '.join(DENSITY_METHODS)}, not {method!r}"
        )
    return MixSpec(method, tuple(parts))


def _factors(adapter: ParsedAdapter, module: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A [r, in], unscaled B [out, r] and the scaling, as PEFT holds them."""
    weights = adapter.modules[module]
    scaling = adapter.lora_scaling[module]
    return weights.lora_a, weights.lora_b_scaled / scaling, scaling


def combine(spec: MixSpec, adapters: list[ParsedAdapter], module_order: Sequence[str] = ()) -> ParsedAdapter:
    """Build the mixed adapter from the parsed components (host fp32). `module_order` is the base model's
    order of its linear layers (the order the DARE masks are drawn in); modules not in it come after, sorted."""
    method = spec.method if len(adapters) > 1 or spec.method == "cat" else "linear"
    if method in SAME_RANK_METHODS:
        ranks = {adapter.rank for adapter in adapters}
        if len(ranks) != 1 or any(len({w.rank for w in a.modules.values()}) != 1 for a in adapters):
            raise MergeError(f"the {method} mix needs adapters of one rank; got ranks {sorted(ranks)} (use 'cat')")
    weights = [weight for _, weight in spec.parts]
    present_names = {name for adapter in adapters for name in adapter.modules}
    ordered = [name for name in module_order if name in present_names]
    modules = ordered + sorted(present_names - set(ordered))
    generator = torch.Generator().manual_seed(MIX_SEED)
    new_rank = max(adapter.rank for adapter in adapters)
    combined = {}
    for name in modules:
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if name in a.modules]
        factors = [(*_factors(adapter, name), weight) for adapter, weight in present]
        if method == "cat":
            combined[name] = _cat(factors)
        elif method == "svd":
            combined[name] = _svd(factors, new_rank)
        else:
            combined[name] = _task_arithmetic(method, spec, factors, generator)
    return ParsedAdapter(
        path=spec.mix_id, kind=AdapterKind.LORA, modules=combined, lora_scaling=dict.fromkeys(combined, 1.0)
    )


Factors = list[tuple[torch.Tensor, torch.Tensor, float, float]]  # (A, unscaled B, scaling, weight) per adapter


def _cat(factors: Factors) -> ModuleDelta:
    lora_a = torch.cat([a * (weight * scaling) for a, _, scaling, weight in factors], dim=0)
    lora_b = torch.cat([b for _, b, _, _ in factors], dim=1)
    return ModuleDelta(lora_a=lora_a.contiguous(), lora_b_scaled=lora_b.contiguous())


def _svd(factors: Factors, rank: int) -> ModuleDelta:
    deltas = torch.stack([(b @ a) * scaling for a, b, scaling, _ in factors])  # [n, out, in]
    weights = torch.tensor([weight for *_, weight in factors]).view(-1, 1, 1)
    delta = (deltas * weights).sum(dim=0)
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    lora_b = u[:, :rank] @ torch.diag(s[:rank])  # [out, r]
    return ModuleDelta(lora_a=vh[:rank, :].contiguous(), lora_b_scaled=lora_b.contiguous())


def _task_arithmetic(method: str, spec: MixSpec, factors: Factors, generator: torch.Generator) -> ModuleDelta:
    signed = [(w * s, 1.0 if w * s >= 0 else -1.0) for _, _, s, w in factors]
    weights_a = [math.sqrt(abs(ws)) * sign for ws, sign in signed]  # the sign goes on one side only
    weights_b = [math.sqrt(abs(ws)) for ws, _ in signed]
    lora_a = _merge(method, spec, [a for a, _, _, _ in factors], weights_a, generator)
    lora_b = _merge(method, spec, [b for _, b, _, _ in factors], weights_b, generator)
    return ModuleDelta(lora_a=lora_a.contiguous(), lora_b_scaled=lora_b.contiguous())


def _merge(
    method: str, spec: MixSpec, tensors: list[torch.Tensor], weights: list[float], generator: torch.Generator
) -> torch.Tensor:
    """One side's merge of the task tensors (see the module docstring)."""
    density = spec.density if spec.density is not None else 1.0
    if method in ("ties", "magnitude_prune"):
        tensors = [_keep_largest(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [_keep_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)  # [n, ...]
    weighted = stacked * torch.tensor(weights).view(-1, *([1] * (stacked.dim() - 1)))
    if method not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if spec.majority_sign_method == "total" else signs.sum(dim=0)
    agrees = signs == torch.where(votes >= 0, 1.0, -1.0)  # on the unweighted tensors, as PEFT decides it
    kept = (weighted * agrees).sum(dim=0)
    return kept / torch.clamp(agrees.sum(dim=0), min=1.0)


def _keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    mask[torch.topk(tensor.abs().reshape(-1), k=keep, largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def _keep_random(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density
