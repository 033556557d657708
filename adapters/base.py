"""The shared interface of adapter kinds: errors, the kind registry and the base model's shape.

Every kind module reads a PEFT directory, validates it against the base model and returns a parsed
adapter (host tensors). `adapters/` never imports the server; the server decides where tensors live.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes held by the given tensors (None entries are skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class AdapterError(Exception):
    """Base of every adapter failure; the API layer maps each subclass to one gRPC status."""

    # The kind the adapter's config declared, when it was read before the failure (for metrics labels).
    declared_kind: AdapterKind | None = None


class AdapterFormatError(AdapterError):
    """The directory or its files are missing, unreadable, corrupt or hold non-finite values."""


class UnsupportedAdapterError(AdapterError):
    """A well-formed adapter that uses a kind or feature deltaserve does not serve."""


class AdapterMismatchError(AdapterError):
    """The adapter does not fit the base model (unknown modules, wrong shapes) or the server's limits."""


class AdapterLimitError(AdapterError):
    """The adapter is larger than the server accepts."""


class AdapterAccessError(AdapterError):
    """The path lies outside the allowed adapter roots, or reaches a file through a link under one."""


class AdapterKind(enum.Enum):
    """Adapter kinds deltaserve serves; the value is the name used on the wire and in ListAdapters."""

    LORA = "lora"  # also rsLoRA and LoRA with trained biases (BitFit-style bias deltas)
    DORA = "dora"
    ADALORA = "adalora"
    IA3 = "ia3"
    PREFIX_TUNING = "prefix_tuning"  # also P-tuning v2, which PEFT saves the same way
    PROMPT_TUNING = "prompt_tuning"
    P_TUNING = "p_tuning"
    BOTTLENECK = "bottleneck"  # AdapterHub (Houlsby / Pfeiffer) bottleneck adapters
    STACK = "stack"  # several adapters of any kinds composed for one request


@dataclass(frozen=True)
class LinearShape:
    """A base linear layer as an adapter sees it: y = x W^T, W of shape [out_features, in_features]."""

    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelGeometry:
    """The decoder's shape, for kinds that act outside linear layers (prefixes, virtual tokens, bottlenecks)."""

    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class BaseModelSpec:
    """What adapters are validated against: the base's linear layers by module name.

    Module names are the base model's own (`model.layers.0.self_attn.q_proj`), as PEFT sees them under
    its `base_model.model.` prefix.
    """

    linear_layers: dict[str, LinearShape]
    other_modules: frozenset[str]  # modules that exist but are not linear (embeddings, norms, ...)
    # A base layer's weight [out, in] by module name, or None where it cannot be compared (quantized).
    base_weight: Callable[[str], torch.Tensor | None] | None = None
    # A base layer's weight as it computes (dequantized when quantized), fp32, for DoRA's norms.
    dense_weight: Callable[[str], torch.Tensor] | None = None
    # A base layer's bias [out] or None, for bias deltas.
    base_bias: Callable[[str], torch.Tensor | None] | None = None
    geometry: ModelGeometry | None = None
    # Why bottleneck adapters cannot be served on this base (None: they can), e.g. no known place to hook them in.
    bottleneck_refusal: str | None = None

    def bias_of(self, module: str) -> torch.Tensor | None:
        return self.base_bias(module) if self.base_bias is not None else None
