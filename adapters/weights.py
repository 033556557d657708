"""The one representation every adapter kind parses into, and that the server places in a device slot.

At a base linear layer ``y = x W^T + b`` an adapter may change the computation to

    y = o * ((x * i) W^T + b) + beta + sum_k B_k (A_k x)

with ``i`` an input scale [in] (IA3 on feed-forward layers), ``o`` an output scale [out] (IA3 elsewhere, DoRA's
magnitude over norm), ``beta`` a bias delta [out] (trained biases, DoRA's bias correction) and low-rank factors
``A [r, in]``, ``B [out, r]`` (LoRA, rsLoRA, AdaLoRA, DoRA's direction; scaling folded into B). Outside the
linear layers an adapter may carry key/value prefixes per layer (prefix tuning), virtual token embeddings
prepended to the prompt (prompt tuning, P-tuning) and bottleneck modules after a decoder layer's attention
or feed-forward block. Every kind is exactly one of these shapes, or a sum of them (a stack).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from deltaserve.adapters.base import AdapterKind, tensor_bytes

ATTENTION_SITE = "attention"  # after the attention block's output projection, before the residual add
OUTPUT_SITE = "output"  # after the feed-forward block, before the residual add
BOTTLENECK_SITES = (ATTENTION_SITE, OUTPUT_SITE)


def sum_present(vectors: Iterable[torch.Tensor | None]) -> torch.Tensor | None:
    """The sum of the given vectors that are not None (None when all are): bias deltas compose this way."""
    present = [v for v in vectors if v is not None]
    return None if not present else torch.stack(present).sum(0)


@dataclass(frozen=True)
class ModuleDelta:
    """What one adapter changes at one base linear layer (None = that part is absent)."""

    lora_a: torch.Tensor | None = None  # [r, in]
    lora_b_scaled: torch.Tensor | None = None  # [out, r], scaling already applied
    input_scale: torch.Tensor | None = None  # [in]
    output_scale: torch.Tensor | None = None  # [out]
    bias_delta: torch.Tensor | None = None  # [out]

    @property
    def rank(self) -> int:
        return 0 if self.lora_a is None else self.lora_a.shape[0]

    @property
    def has_vectors(self) -> bool:
        return any(t is not None for t in (self.input_scale, self.output_scale, self.bias_delta))

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in ("lora_a", "lora_b_scaled", "input_scale", "output_scale", "bias_delta"):
            if (tensor := getattr(self, name)) is not None:
                yield name, tensor


# What a bottleneck reads, for a block mapping the residual stream r to h (the layer then outputs r + h + A(x)).
BOTTLENECK_INPUTS = ("block_output", "with_residual", "residual")  # x = h (Houlsby), h + r (Pfeiffer), r (parallel)


@dataclass(frozen=True)
class Bottleneck:
    """A(x) = up(act(down x + down_bias)) + up_bias at one site of one decoder layer (AdapterHub's bottleneck),
    the output scaling already folded into up and up_bias."""

    down: torch.Tensor  # [m, hidden]
    down_bias: torch.Tensor  # [m]
    up: torch.Tensor  # [hidden, m]
    up_bias: torch.Tensor  # [hidden]
    activation: str  # a name in deltaserve.adapters.bottleneck.ACTIVATIONS
    input_mode: str = "block_output"  # one of BOTTLENECK_INPUTS

    @property
    def size(self) -> int:
        return self.down.shape[0]

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter((("down", self.down), ("down_bias", self.down_bias), ("up", self.up), ("up_bias", self.up_bias)))


@dataclass(frozen=True)
class Prefix:
    """Per-layer key/value entries that a row's attention sees before its own tokens (not rotated)."""

    keys: torch.Tensor  # [layers, kv_heads, P, head_dim]
    values: torch.Tensor  # [layers, kv_heads, P, head_dim]

    @property
    def length(self) -> int:
        return self.keys.shape[2]


@dataclass(frozen=True)
class ParsedAdapter:
    """A parsed, validated adapter on the host (fp32), of any kind."""

    path: str
    kind: AdapterKind
    modules: dict[str, ModuleDelta] = field(default_factory=dict)  # base linear module name -> delta
    prefix: Prefix | None = None
    virtual_tokens: torch.Tensor | None = None  # [P, hidden], prepended to the prompt's embeddings
    bottlenecks: dict[tuple[int, str], Bottleneck] = field(default_factory=dict)  # (layer, site) -> module
    lora_scaling: dict[str, float] | None = None  # per-module LoRA scaling, for weighted mixes of plain LoRAs
    components: tuple[str, ...] = ()  # for a stack: the kinds it was composed from, in order

    @property
    def rank(self) -> int:
        """The largest LoRA rank over modules (0 when the adapter has no low-rank part)."""
        return max((delta.rank for delta in self.modules.values()), default=0)

    @property
    def bottleneck_size(self) -> int:
        return max((b.size for b in self.bottlenecks.values()), default=0)

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor the server will place on the device, named for error messages."""
        for module, delta in self.modules.items():
            for name, tensor in delta.named_tensors():
                yield f"{module}.{name}", tensor
        for (layer, site), bottleneck in self.bottlenecks.items():
            for name, tensor in bottleneck.named_tensors():
                yield f"layers.{layer}.{site}_bottleneck.{name}", tensor
        if self.prefix is not None:
            yield "prefix keys", self.prefix.keys
            yield "prefix values", self.prefix.values
        if self.virtual_tokens is not None:
            yield "virtual token embeddings", self.virtual_tokens

    @property
    def size_bytes(self) -> int:
        return tensor_bytes(tensor for _, tensor in self.named_tensors())

    @property
    def target_modules(self) -> list[str]:
        """Short names of what the adapter changes, e.g. ['k_proj', 'q_proj'] or ['prefix']."""
        names = {name.rsplit(".", 1)[-1] for name in self.modules}
        names |= {f"{site}_bottleneck" for _, site in self.bottlenecks}
        if self.prefix is not None:
            names.add("prefix")
        if self.virtual_tokens is not None:
            names.add("virtual_tokens")
        return sorted(names)

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix is None else self.prefix.length

    @property
    def virtual_length(self) -> int:
        return 0 if self.virtual_tokens is None else self.virtual_tokens.shape[0]

    @property
    def extra_positions(self) -> int:
        """Cache positions the adapter adds in front of every prompt (prefix entries plus virtual tokens)."""
        return self.prefix_length + self.virtual_length

    @property
    def has_vectors(self) -> bool:
        return any(delta.has_vectors for delta in self.modules.values())

    @property
    def mergeable(self) -> bool:
        """Only a pure low-rank delta folds into W exactly (W + B A) and back out of it."""
        return (
            self.kind in (AdapterKind.LORA, AdapterKind.ADALORA)
            and bool(self.modules)
            and not self.has_vectors
            and self.prefix is None
            and self.virtual_tokens is None
            and not self.bottlenecks
        )

    @property
    def is_plain_lora(self) -> bool:
        """A LoRA whose factors can be re-weighted as PEFT's add_weighted_adapter does (mixes)."""
        return self.mergeable and self.kind is AdapterKind.LORA and self.lora_scaling is not None
