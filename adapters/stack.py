"""Adapter stacks: several adapters of any kinds applied to one request, composed into one adapter.

The composition rule, per part of `weights.ParsedAdapter` (components in the order the request names them):
- low-rank deltas add: the factors are concatenated, so the layer adds sum_k B_k A_k x (x the layer's input);
- input scales and output scales multiply; they rescale the base projection only, never another delta;
- bias deltas add;
- prefixes are concatenated (the first component's entries come first in the cache), then all virtual tokens
  in order, then the prompt;
- at most one component may carry bottleneck modules (stacked bottlenecks would need an order of their own).
So a prefix plus a LoRA (the MAM adapter's recipe) is exactly PEFT's LoRA model run with the prefix in its
cache, and IA3 plus a LoRA is PEFT's LoRA on top of the IA3-merged base.
"""

from __future__ import annotations

import torch
from deltaserve.adapters.base import AdapterKind, UnsupportedAdapterError
from deltaserve.adapters.weights import ModuleDelta, ParsedAdapter, Prefix, sum_present


def _product(vectors: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [v for v in vectors if v is not None]
    if not present:
        return None
    result = present[0].clone()
    for vector in present[1:]:
        result *= vector
    return result


def _compose_module(deltas: list[ModuleDelta]) -> ModuleDelta:
    low_rank = [d for d in deltas if d.lora_a is not None]
    return ModuleDelta(
        lora_a=torch.cat([d.lora_a for d in low_rank]).contiguous() if low_rank else None,
        lora_b_scaled=torch.cat([d.lora_b_scaled for d in low_rank], dim=1).contiguous() if low_rank else None,
        input_scale=_product([d.input_scale for d in deltas]),
        output_scale=_product([d.output_scale for d in deltas]),
        bias_delta=sum_present(d.bias_delta for d in deltas),
    )


def _compose_prefix(prefixes: list[Prefix]) -> Prefix | None:
    if not prefixes:
        return None
    return Prefix(
        keys=torch.cat([p.keys for p in prefixes], dim=2), values=torch.cat([p.values for p in prefixes], dim=2)
    )


def compose(stack_id: str, names: list[str], adapters: list[ParsedAdapter]) -> ParsedAdapter:
    """One adapter that applies every component at once, by the rule above."""
    with_bottlenecks = [name for name, adapter in zip(names, adapters, strict=True) if adapter.bottlenecks]
    if len(with_bottlenecks) > 1:
        raise UnsupportedAdapterError(
            f"a stack may hold at most one bottleneck adapter; {', '.join(with_bottlenecks)} each carry bottlenecks"
        )
    module_names = sorted({name for adapter in adapters for name in adapter.modules})
    modules = {
        name: _compose_module([adapter.modules[name] for adapter in adapters if name in adapter.modules])
        for name in module_names
    }
    virtual = [adapter.virtual_tokens for adapter in adapters if adapter.virtual_tokens is not None]
    bottlenecks = next((adapter.bottlenecks for adapter in adapters if adapter.bottlenecks), {})
    return ParsedAdapter(
        path=stack_id,
        kind=AdapterKind.STACK,
        modules=modules,
        prefix=_compose_prefix([adapter.prefix for adapter in adapters if adapter.prefix is not None]),
        virtual_tokens=torch.cat(virtual).contiguous() if virtual else None,
        bottlenecks=bottlenecks,
        components=tuple(adapter.kind.value for adapter in adapters),
    )
