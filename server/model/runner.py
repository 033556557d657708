"""The model runner: the base decoder's forward with a per-row KV cache, for prefill and batched decode.

The runner drives the Hugging Face module tree directly (embeddings, decoder layers' projections, norms,
MLPs, rotary embedding) instead of the model's own forward, so that every row has its own cache length
and position while rows decode together. Supported: Llama-style decoders (Llama, Mistral, Qwen2, Qwen3).

KV cache: paged (model/kv_cache.py). Each request owns a block table; a forward writes each token's K/V into
its request's blocks and attends over the entries its table reaches. Which blocks a request owns, and which it
shares through the prefix cache, is the engine's business (engine/kv_blocks.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from deltaserve.adapters import (
    ATTENTION_SITE,
    BOTTLENECK_SITES,
    OUTPUT_SITE,
    BaseModelSpec,
    LinearShape,
    ModelGeometry,
)
from deltaserve.server.errors import MergeError, ModelLoadError
from deltaserve.server.kernels.paged_attention import DecodeAttention, select_decode_attention, torch_decode_attention
from deltaserve.server.model.kv_cache import NULL_BLOCK, PagedKVCache, blocks_for, bytes_per_block
from deltaserve.server.model.layers import (
    AdapterLinear,
    BottleneckBank,
    ForwardContext,
    LoraBatch,
    SlotBatch,
    wrap_linear_layers,
)
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class AdapterBatch:
    """The adapter descriptions of one forward: `lora`/`slots` for every token of the body, `head_lora`/
    `head_slots` for the positions the LM head sees (the same in a decode step)."""

    lora: LoraBatch | None = None
    slots: SlotBatch | None = None
    head_lora: LoraBatch | None = None
    head_slots: SlotBatch | None = None


NO_ADAPTERS = AdapterBatch()


@dataclass(frozen=True)
class SoftPrompt:
    """What an adapter puts in front of a row's prompt, on the device: prefix entries written into the KV
    cache before the prompt ([layers, kv_heads, P, head_dim], not rotated) and virtual token embeddings
    ([V, hidden]) prepended to the prompt's embeddings."""

    prefix_keys: torch.Tensor | None = None
    prefix_values: torch.Tensor | None = None
    virtual_tokens: torch.Tensor | None = None

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_keys is None else self.prefix_keys.shape[2]

    @property
    def virtual_length(self) -> int:
        return 0 if self.virtual_tokens is None else self.virtual_tokens.shape[0]


NO_SOFT_PROMPT = SoftPrompt()


@dataclass(frozen=True)
class PrefillChunk:
    """Part (or all) of one request's prompt items for a prefill forward: `token_ids` go to cache positions
    start.. through the block `table`; the first `len(virtual)` items are virtual token embeddings instead
    (their ids are placeholders)."""

    table: list[int]
    start: int
    token_ids: list[int]
    virtual: torch.Tensor | None = None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, T, D]; cos/sin: [B, T, D]
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class ModelRunner:
    """Owns the base model (wrapped for adapters) and the KV cache. Used by the engine thread only."""

    def __init__(
        self,
        model: nn.Module,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"model type {config.model_type!r} is not served; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.model = model
        self.device = device
        self.dtype = dtype
        self.context = ForwardContext()
        self.adapter_layers: dict[str, AdapterLinear] = wrap_linear_layers(model, self.context)
        self.hidden_size: int = config.hidden_size
        inner = model.model
        self.embed_tokens, self.layers, self.final_norm = inner.embed_tokens, inner.layers, inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        attention = self.layers[0].self_attn
        self.head_dim: int = attention.head_dim
        self.scaling: float = attention.scaling
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = config.num_key_value_heads
        self.cache: PagedKVCache | None = None  # allocate_cache(), once the weights and adapter slots are placed
        self.decode_attention: DecodeAttention = torch_decode_attention
        self._saved_weights: dict[str, torch.Tensor] = {}  # original weights of merged modules
        self.bottleneck_banks = {
            (index, site): BottleneckBank(self.hidden_size)
            for index in range(len(self.layers))
            for site in BOTTLENECK_SITES
        }

    # ---- description -----------------------------------------------------------------------------
    def base_spec(self) -> BaseModelSpec:
        """Module names and shapes that adapters are validated against."""
        linear = {
            name: LinearShape(layer.in_features, layer.out_features) for name, layer in self.adapter_layers.items()
        }
        other = frozenset(
            name for name, _ in self.model.named_modules() if name and name not in linear and not name.endswith(".base")
        )
        geometry = ModelGeometry(len(self.layers), self.hidden_size, self.num_kv_heads, self.head_dim)
        return BaseModelSpec(
            linear_layers=linear,
            other_modules=other,
            base_weight=self._base_weight,
            dense_weight=self._dense_weight,
            base_bias=self._base_bias,
            geometry=geometry,
        )

    def _base_weight(self, name: str) -> torch.Tensor | None:
        """The base's own weight (the saved original while an adapter is merged into it)."""
        base = self.adapter_layers[name].base
        quantized = type(base) is not nn.Linear  # bitsandbytes layers hold packed weights
        return None if quantized else self._saved_weights.get(name, base.weight).detach()

    def _dense_weight(self, name: str) -> torch.Tensor:
        """The base weight a layer computes with: dequantized for bitsandbytes 4-bit / 8-bit layers."""
        base = self.adapter_layers[name].base
        if type(base) is nn.Linear:
            return self._saved_weights.get(name, base.weight).detach().float()
        import bitsandbytes.functional as bnbf

        weight = base.weight
        if getattr(weight, "quant_state", None) is not None:  # 4-bit
            return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
        if getattr(weight, "SCB", None) is not None:  # LLM.int8: per-row int8 with absmax scales
            return bnbf.int8_vectorwise_dequant(weight.data, weight.SCB).float()
        raise MergeError(f"cannot read the dense weight of {name} ({type(base).__name__})")

    def _base_bias(self, name: str) -> torch.Tensor | None:
        bias = self.adapter_layers[name].base.bias
        return None if bias is None else bias.detach().float()

    # ---- merging one adapter into the base ---------------------------------------------------------
    def merge_weights(self, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """W += B_scaled @ A for each module (computed in fp32), keeping the original weights so that
        `restore_weights` puts them back bit for bit. Refuses what cannot be merged exactly."""
        for name in deltas:
            base = self.adapter_layers[name].base
            if type(base) is not nn.Linear:
                raise MergeError(
                    f"{name} is a quantized layer ({type(base).__name__}); merging into it would be lossy, so "
                    "deltaserve refuses it (serve the adapter unmerged)"
                )
            if base.weight.data_ptr() == self.embed_tokens.weight.data_ptr():
                raise MergeError(f"{name} shares its weight with the input embeddings; merging would change both")
        try:
            for name, (lora_a, lora_b_scaled) in deltas.items():
                weight = self.adapter_layers[name].base.weight
                self._saved_weights[name] = weight.detach().clone()
                delta = lora_b_scaled.to(self.device, torch.float32) @ lora_a.to(self.device, torch.float32)
                weight.data.copy_((weight.float() + delta).to(weight.dtype))
        except BaseException:  # e.g. out of memory halfway: never leave a partly merged base behind
            self.restore_weights()
            raise

    def restore_weights(self) -> None:
        """Put back the weights saved by `merge_weights` (an exact copy, not a subtraction)."""
        for name, original in self._saved_weights.items():
            self.adapter_layers[name].base.weight.data.copy_(original)
        self._saved_weights.clear()

    # ---- the KV cache ------------------------------------------------------------------------------
    def allocate_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        """Allocate the paged KV cache (after the weights and adapter slots, so its size can be what is left)."""
        self.cache = PagedKVCache(
            len(self.layers), num_blocks, block_size, self.num_kv_heads, self.head_dim, self.dtype, self.device
        )
        self.decode_attention = select_decode_attention(self.device, block_size, self.dtype)
        return self.cache

    def block_bytes(self, block_size: int) -> int:
        return bytes_per_block(len(self.layers), block_size, self.num_kv_heads, self.head_dim, self.dtype)

    @property
    def kv_cache_bytes(self) -> int:
        return self.cache.bytes

    def zero_blocks(self, blocks: list[int]) -> None:
        self.cache.zero(blocks)

    @torch.inference_mode()
    def write_prefix(self, table: list[int], prompt: SoftPrompt, start: int) -> None:
        """Write a soft prompt's prefix entries from position `start` on (earlier ones came from the prefix
        cache) into the blocks of `table`."""
        count = prompt.prefix_length - start
        if count <= 0:
            return
        slots = torch.tensor(self.cache.slots(table, start, count), device=self.device)
        for layer_idx in range(len(self.layers)):
            keys = prompt.prefix_keys[layer_idx, :, start:].transpose(0, 1)  # [count, kv_heads, D]
            values = prompt.prefix_values[layer_idx, :, start:].transpose(0, 1)
            self.cache.write(layer_idx, slots, keys, values)

    # ---- forward passes --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk], batch: AdapterBatch) -> torch.Tensor:
        """Run prompt chunks into their requests' blocks in one forward; return each one's last logits [n, V].

        A chunk's items go to cache positions start.. (rotary positions equal cache positions); it attends over
        its request's earlier entries (prefix-tuning entries, cached or earlier chunks) and causally over
        itself. Chunks are right-padded to the longest: causal attention never lets a real item see the padding
        after it, and padding is never written to the cache. `batch.lora`/`batch.slots` describe the n*T padded
        items, `batch.head_*` the n last ones.
        """
        lengths = [len(c.token_ids) for c in chunks]
        span = max(lengths)
        ids = torch.tensor([c.token_ids + [0] * (span - n) for c, n in zip(chunks, lengths, strict=True)])
        hidden = self.embed_tokens(ids.to(self.device))  # [n, T, H]
        for i, chunk in enumerate(chunks):
            if chunk.virtual is not None:
                hidden[i, : chunk.virtual.shape[0]] = chunk.virtual.to(hidden.dtype)
        starts = torch.tensor([c.start for c in chunks], device=self.device)
        positions = starts[:, None] + torch.arange(span, device=self.device)[None]  # [n, T]
        cos, sin = self.rotary(hidden, positions)  # [n, T, D]
        batch_idx = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)], device=self.device)
        token_idx = torch.tensor([t for n in lengths for t in range(n)], device=self.device)
        slots = torch.tensor(
            [s for c, n in zip(chunks, lengths, strict=True) for s in self.cache.slots(c.table, c.start, n)],
            device=self.device,
        )
        cache = self.cache
        if not any(c.start for c in chunks):  # nothing before the chunks: attend within them

            def attend(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                cache.write(layer_idx, slots, k[batch_idx, :, token_idx], v[batch_idx, :, token_idx])
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True)

        else:
            ends = [c.start + n for c, n in zip(chunks, lengths, strict=True)]  # host ints: no device sync
            tables = self._table_tensor([c.table for c in chunks], blocks_for(max(ends), cache.block_size))
            width = tables.shape[1] * cache.block_size
            mask = (torch.arange(width, device=self.device)[None, None, :] <= positions[:, :, None])[:, None]

            def attend(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                cache.write(layer_idx, slots, k[batch_idx, :, token_idx], v[batch_idx, :, token_idx])
                keys, values = cache.gather(layer_idx, tables)
                return F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True
                )

        last = torch.tensor(lengths, device=self.device) - 1
        return self._forward(hidden, cos, sin, attend, batch, last)

    def _table_tensor(self, tables: list[list[int]], width: int) -> torch.Tensor:
        """Block tables cut or padded (with the null block) to `width` blocks, as one [n, width] tensor."""
        rows = [table[:width] + [NULL_BLOCK] * (width - len(table)) for table in tables]
        return torch.tensor(rows, device=self.device)

    def decode_tables(self, tables: list[list[int]], max_position: int) -> torch.Tensor:
        """The decode step's block tables: enough blocks for every row's next position."""
        return self._table_tensor(tables, blocks_for(max_position + 1, self.cache.block_size))

    @torch.inference_mode()
    def decode(
        self, input_ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor, batch: AdapterBatch
    ) -> torch.Tensor:
        """One token for each of B rows; return logits [B, V].

        input_ids [B]; positions [B] (where each row's new token goes = its current cache length); tables
        [B, nb] (`decode_tables`), covering every row's new position.
        """
        cache = self.cache
        block_size = cache.block_size
        rows = torch.arange(input_ids.shape[0], device=self.device)
        slots = tables[rows, positions // block_size] * block_size + positions % block_size
        hidden = self.embed_tokens(input_ids[:, None])  # [B, 1, H]
        cos, sin = self.rotary(hidden, positions[:, None])  # [B, 1, D]
        paged_attention = self.decode_attention(cache, tables, positions, self.scaling)

        def attend(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.write(layer_idx, slots, k[:, :, 0], v[:, :, 0])
            return paged_attention(q, layer_idx)

        return self._forward(hidden, cos, sin, attend, batch, None)

    # ---- shared layer loop -----------------------------------------------------------------------
    def _forward(self, hidden, cos, sin, attend, batch: AdapterBatch, last: torch.Tensor | None) -> torch.Tensor:
        """Decoder layers, then final norm and LM head at each row's position `last` (None: the final one)
        -> logits [B, V]. `batch.lora`/`batch.slots` cover every token of `hidden`, `batch.head_*` the B
        positions the head sees."""
        context = self.context
        context.lora, context.slots = batch.lora, batch.slots
        try:
            for layer_idx, layer in enumerate(self.layers):
                attended = self._attention(layer_idx, layer, layer.input_layernorm(hidden), cos, sin, attend)
                hidden = hidden + self._bottleneck(layer_idx, ATTENTION_SITE, attended, hidden, batch.slots)
                transformed = layer.mlp(layer.post_attention_layernorm(hidden))
                hidden = hidden + self._bottleneck(layer_idx, OUTPUT_SITE, transformed, hidden, batch.slots)
            hidden = hidden[:, -1] if last is None else hidden[torch.arange(hidden.shape[0]), last]
            context.lora, context.slots = batch.head_lora, batch.head_slots
            # Logits in fp32 so that sampling and log-probabilities do not depend on the model dtype.
            return self.lm_head(self.final_norm(hidden)).float()
        finally:
            context.lora, context.slots = None, None

    def _bottleneck(
        self, layer_idx: int, site: str, out: torch.Tensor, residual: torch.Tensor, slots: SlotBatch | None
    ) -> torch.Tensor:
        """A block's output with each token's bottleneck adapter added: out + A(x), x read from the block's
        output and/or its input (the residual stream) as the adapter's configuration says."""
        if slots is None:
            return out
        delta = self.bottleneck_banks[(layer_idx, site)].delta(out, residual, slots)
        return out if delta is None else out + delta

    def _attention(self, layer_idx, layer, hidden, cos, sin, attend) -> torch.Tensor:
        attn = layer.self_attn
        batch, length, _ = hidden.shape
        q = attn.q_proj(hidden).view(batch, length, -1, self.head_dim)
        k = attn.k_proj(hidden).view(batch, length, -1, self.head_dim)
        v = attn.v_proj(hidden).view(batch, length, -1, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = _apply_rope(q.transpose(1, 2), cos, sin)  # [B, H, T, D]
        k = _apply_rope(k.transpose(1, 2), cos, sin)  # [B, Hkv, T, D]
        out = attend(layer_idx, q, k, v.transpose(1, 2))  # [B, H, T, D]
        return attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
