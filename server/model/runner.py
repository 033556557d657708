"""The model runner: the base decoder's forward with a per-row KV cache, for prefill and batched decode.

The runner drives the Hugging Face module tree directly (embeddings, decoder layers' projections, norms,
MLPs, rotary embedding) instead of the model's own forward, so that every row has its own cache length
and position while rows decode together. Supported: Llama-style decoders (Llama, Mistral, Qwen2, Qwen3).

KV cache: per layer, K and V of shape [max_batch, kv_heads, max_seq_len, head_dim], preallocated. Running
requests occupy rows 0..B-1 (the engine keeps them compact), so a decode step reads plain views.
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
    tensor_bytes,
)
from deltaserve.server.errors import MergeError, ModelLoadError
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
        max_batch_size: int,
        max_seq_len: int,
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
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
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
        shape = (max_batch_size, self.num_kv_heads, max_seq_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
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

    @property
    def kv_cache_bytes(self) -> int:
        return tensor_bytes((*self.k_cache, *self.v_cache))

    # ---- forward passes --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self,
        rows: list[int],
        prompts: list[list[int]],
        batch: AdapterBatch,
        soft_prompts: list[SoftPrompt] | None = None,
    ) -> torch.Tensor:
        """Run prompts into cache rows in one forward; return each one's last logits [n, V].

        A row's cache holds its soft prompt's prefix entries (positions 0..P-1), then its virtual tokens and
        its prompt (positions P.., rotary positions equal cache positions). Sequences (virtual + prompt tokens)
        are right-padded to the longest: causal attention never lets a real token see the padding after it.
        `batch.lora`/`batch.slots` describe the n*T padded tokens, `batch.head_*` the n last positions.
        """
        soft = soft_prompts or [NO_SOFT_PROMPT] * len(prompts)
        offsets = [s.prefix_length for s in soft]
        lengths = [s.virtual_length + len(p) for s, p in zip(soft, prompts, strict=True)]
        span = max(lengths)
        ids = torch.tensor(
            [[0] * s.virtual_length + p + [0] * (span - n) for s, p, n in zip(soft, prompts, lengths, strict=True)],
            device=self.device,
        )
        hidden = self.embed_tokens(ids)  # [n, T, H]
        for i, prompt in enumerate(soft):
            if prompt.virtual_tokens is not None:
                hidden[i, : prompt.virtual_length] = prompt.virtual_tokens.to(hidden.dtype)
        offset = torch.tensor(offsets, device=self.device)
        positions = offset[:, None] + torch.arange(span, device=self.device)[None]  # [n, T]
        cos, sin = self.rotary(hidden, positions)  # [n, T, D]
        row_index = torch.tensor(rows, device=self.device)
        if any(offsets):
            self._write_prefixes(rows, soft)
            attend = self._prefix_attention(row_index, positions, offsets, lengths)
        else:

            def attend(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                self.k_cache[layer_idx][row_index, :, :span] = k
                self.v_cache[layer_idx][row_index, :, :span] = v
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True)

        last = torch.tensor(lengths, device=self.device) - 1
        return self._forward(hidden, cos, sin, attend, batch, last)

    def _write_prefixes(self, rows: list[int], soft: list[SoftPrompt]) -> None:
        for row, prompt in zip(rows, soft, strict=True):
            if prompt.prefix_keys is None:
                continue
            length = prompt.prefix_length
            for layer_idx, (k_cache, v_cache) in enumerate(zip(self.k_cache, self.v_cache, strict=True)):
                k_cache[row, :, :length] = prompt.prefix_keys[layer_idx]
                v_cache[row, :, :length] = prompt.prefix_values[layer_idx]

    def _prefix_attention(
        self, row_index: torch.Tensor, positions: torch.Tensor, offsets: list[int], lengths: list[int]
    ):
        """Attention for a prefill where some rows start after prefix entries: each row's tokens go to cache
        positions offset + t (`positions`, only real tokens are written), and attend over the row's cache up
        to themselves."""
        batch_idx = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)], device=self.device)
        token_idx = torch.tensor([t for n in lengths for t in range(n)], device=self.device)
        cache_rows, cache_pos = row_index[batch_idx], positions[batch_idx, token_idx]
        width = max(o + n for o, n in zip(offsets, lengths, strict=True))  # from the host lists: no device sync
        mask = (torch.arange(width, device=self.device)[None, None, :] <= positions[:, :, None])[:, None]  # [n,1,T,W]

        def attend(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_cache, v_cache = self.k_cache[layer_idx], self.v_cache[layer_idx]
            k_cache[cache_rows, :, cache_pos] = k[batch_idx, :, token_idx]
            v_cache[cache_rows, :, cache_pos] = v[batch_idx, :, token_idx]
            keys, values = k_cache[row_index, :, :width], v_cache[row_index, :, :width]
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True)

        return attend

    @torch.inference_mode()
    def decode(
        self, input_ids: torch.Tensor, positions: torch.Tensor, max_position: int, batch: AdapterBatch
    ) -> torch.Tensor:
        """One token for each of rows 0..B-1; return logits [B, V].

        input_ids [B], positions [B] (where each row's new token goes = its current cache length),
        max_position = max(positions) as a host int (so no device sync is needed to size the views).
        """
        rows_count = input_ids.shape[0]
        span = max_position + 1
        rows = torch.arange(rows_count, device=self.device)
        hidden = self.embed_tokens(input_ids[:, None])  # [B, 1, H]
        cos, sin = self.rotary(hidden, positions[:, None])  # [B, 1, D]
        # mask [B, 1, 1, span]: a row sees its own cache entries up to and including the new token.
        mask = (torch.arange(span, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]

        def attend(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_cache, v_cache = self.k_cache[layer_idx], self.v_cache[layer_idx]
            k_cache[rows, :, positions] = k[:, :, 0]
            v_cache[rows, :, positions] = v[:, :, 0]
            return F.scaled_dot_product_attention(
                q,
                k_cache[:rows_count, :, :span],
                v_cache[:rows_count, :, :span],
                attn_mask=mask,
                scale=self.scaling,
                enable_gqa=True,
            )

        return self._forward(hidden, cos, sin, attend, batch, None)

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy a request's cache row (its first `length` entries) to another row (batch compaction)."""
        for k_cache, v_cache in zip(self.k_cache, self.v_cache, strict=True):
            k_cache[target, :, :length] = k_cache[source, :, :length]
            v_cache[target, :, :length] = v_cache[source, :, :length]

    def clear_row(self, row: int, length: int) -> None:
        """Zero a vacated row's first `length` entries. A later occupant's attention masks them out, but a
        masked NaN or inf (left by an adapter that overflowed) would still poison its softmax sum."""
        for k_cache, v_cache in zip(self.k_cache, self.v_cache, strict=True):
            k_cache[row, :, :length] = 0
            v_cache[row, :, :length] = 0

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
