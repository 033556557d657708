"""deltaserve's attention function, registered with transformers' `AttentionInterface` under "deltaserve".

The runner switches the model's attention implementation to "deltaserve" and passes each forward's attention
context as the keyword argument `deltaserve=`, which transformers hands down through the decoder layers to every
attention call. A layer's attention module calls `deltaserve_attention` with its query [B, H, T, D] and new
key/value [B, Hkv, T, D] (rotary embedding and any q/k norms already applied), its softmax scaling, its sliding
window and its logit softcap; the context writes the new K/V into the paged cache and attends over the row's
entries, so scaling, windows and softcapping are always the layer's own.

No mask function is registered under this name, so transformers' mask creation returns None at once: the
contexts build the masks they need themselves, once per forward (per window size), not per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from deltaserve.server.kernels.paged_attention import LayerAttention, attention_mask, masked_attention
from deltaserve.server.model.kv_cache import PagedKVCache
from torch import nn
from transformers import AttentionInterface

ATTENTION_IMPLEMENTATION = "deltaserve"


class ForwardAttention:
    """One forward's attention: what every layer's attention call does in it."""

    def attend(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        window: int | None,
        softcap: float | None,
        extra: dict,
    ) -> torch.Tensor:
        """The attention output [B, H, T, D]. `mask` is whatever mask the model built (None when transformers'
        mask creation skipped it, as it does for this implementation); `extra` the call's other keywords."""
        raise NotImplementedError


def deltaserve_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    deltaserve: ForwardAttention | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: returns ([B, T, H, D] contiguous, no attention weights)."""
    if deltaserve is None:
        raise RuntimeError("deltaserve's attention ran outside a deltaserve forward (no deltaserve= context)")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = deltaserve.attend(module, query, key, value, attention_mask, scaling, sliding_window, softcap, kwargs)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register the attention function (idempotent); returns the implementation name to set on a model."""
    AttentionInterface.register(ATTENTION_IMPLEMENTATION, deltaserve_attention)
    return ATTENTION_IMPLEMENTATION


@dataclass(frozen=True)
class NewEntries:
    """Where a forward's new K/V go: the flat cache slots [N] of its real (non-padding) items, which are the
    items (rows[i], columns[i]) of the forward's [B, T] grid; rows None: each row's single item (a decode step)."""

    slots: torch.Tensor
    rows: torch.Tensor | None = None
    columns: torch.Tensor | None = None

    def write(self, cache: PagedKVCache, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        if self.rows is None:
            cache.write(layer, self.slots, key[:, :, 0], value[:, :, 0])
        else:
            cache.write(layer, self.slots, key[self.rows, :, self.columns], value[self.rows, :, self.columns])


class PagedAttention(ForwardAttention):
    """Write the new K/V, then attend through the rows' block tables: decode steps, and prefill chunks that
    follow earlier entries of their request (prefix-tuning entries, cached blocks, earlier chunks)."""

    def __init__(self, cache: PagedKVCache, entries: NewEntries, layer_attention: LayerAttention) -> None:
        self.cache, self.entries, self.layer_attention = cache, entries, layer_attention

    def attend(self, module, query, key, value, mask, scaling, window, softcap, extra):
        layer = module.layer_idx
        self.entries.write(self.cache, layer, key, value)
        return self.layer_attention(query, self.cache.keys[layer], self.cache.values[layer], scaling, window, softcap)


class ChunkAttention(ForwardAttention):
    """Prefill chunks with nothing before them: write the new K/V, and attend causally over the chunk's own K/V
    (no gather). Rows are right-padded to T items: a real item never sees the padding after it."""

    def __init__(self, cache: PagedKVCache, entries: NewEntries, positions: torch.Tensor) -> None:
        self.cache, self.entries = cache, entries
        self.positions = positions  # [B, T], start 0: an item's position is its column (padding: the last real one)
        self._masks: dict[int | None, torch.Tensor] = {}  # by window: built once per forward

    def attend(self, module, query, key, value, mask, scaling, window, softcap, extra):
        self.entries.write(self.cache, module.layer_idx, key, value)
        width = key.shape[2]
        if window is not None and window >= width:
            window = None  # a window as wide as the chunk hides nothing
        if window is None and softcap is None:
            return masked_attention(query, key, value, None, scaling, None)  # SDPA's own causal mask
        own_mask = self._masks.get(window)
        if own_mask is None:
            own_mask = self._masks[window] = attention_mask(self.positions, width, window)
        return masked_attention(query, key, value, own_mask, scaling, softcap)
