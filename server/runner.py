"""The model runner: the base decoder's forward with a per-row KV cache, for prefill and batched decode.

The runner drives the Hugging Face module tree directly (embeddings, decoder layers' projections, norms,
MLPs, rotary embedding) instead of the model's own forward, so that every row has its own cache length
and position while rows decode together. Supported: Llama-style decoders (Llama, Mistral, Qwen2, Qwen3).

KV cache: per layer, K and V of shape [max_batch, kv_heads, max_seq_len, head_dim], preallocated. Running
requests occupy rows 0..B-1 (the engine keeps them compact), so a decode step reads plain views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deltaserve.adapters import BaseModelSpec, LinearShape, tensor_bytes
from deltaserve.server.errors import MergeError, ModelLoadError
from deltaserve.server.layers import AdapterLinear, ForwardContext, LoraBatch, wrap_linear_layers
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


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

    # ---- description -----------------------------------------------------------------------------
    def base_spec(self) -> BaseModelSpec:
        """Module names and shapes that adapters are validated against."""
        linear = {
            name: LinearShape(layer.in_features, layer.out_features) for name, layer in self.adapter_layers.items()
        }
        other = frozenset(
            name for name, _ in self.model.named_modules() if name and name not in linear and not name.endswith(".base")
        )
        return BaseModelSpec(linear_layers=linear, other_modules=other, base_weight=self._base_weight)

    def _base_weight(self, name: str) -> torch.Tensor | None:
        base = self.adapter_layers[name].base
        quantized = type(base) is not nn.Linear  # bitsandbytes layers hold packed weights
        return None if quantized else base.weight.detach()

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
        for name, (lora_a, lora_b_scaled) in deltas.items():
            weight = self.adapter_layers[name].base.weight
            self._saved_weights[name] = weight.detach().clone()
            delta = lora_b_scaled.to(self.device, torch.float32) @ lora_a.to(self.device, torch.float32)
            weight.data.copy_((weight.float() + delta).to(weight.dtype))

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
        self, rows: list[int], prompts: list[list[int]], lora: LoraBatch | None, head_lora: LoraBatch | None
    ) -> torch.Tensor:
        """Run prompts into cache rows (positions 0..T_i-1) in one forward; return each one's last logits [n, V].

        Prompts are right-padded to the longest: causal attention never lets a real token see the padding
        after it, and the padding's cache entries lie beyond the row's length, hidden until decode
        overwrites them. `lora` describes the n*T padded tokens, `head_lora` the n last positions.
        """
        lengths = [len(prompt) for prompt in prompts]
        span = max(lengths)
        ids = torch.tensor([prompt + [0] * (span - len(prompt)) for prompt in prompts], device=self.device)
        positions = torch.arange(span, device=self.device)[None].expand(len(prompts), span)  # [n, T]
        hidden = self.embed_tokens(ids)  # [n, T, H]
        cos, sin = self.rotary(hidden, positions)  # [n, T, D]
        row_index = torch.tensor(rows, device=self.device)

        def attend(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.k_cache[layer_idx][row_index, :, :span] = k
            self.v_cache[layer_idx][row_index, :, :span] = v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True)

        last = torch.tensor(lengths, device=self.device) - 1
        return self._forward(hidden, cos, sin, attend, lora, head_lora, last)

    @torch.inference_mode()
    def decode(
        self, input_ids: torch.Tensor, positions: torch.Tensor, max_position: int, lora: LoraBatch | None
    ) -> torch.Tensor:
        """One token for each of rows 0..B-1; return logits [B, V].

        input_ids [B], positions [B] (where each row's new token goes = its current cache length),
        max_position = max(positions) as a host int (so no device sync is needed to size the views).
        """
        batch = input_ids.shape[0]
        span = max_position + 1
        rows = torch.arange(batch, device=self.device)
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
                k_cache[:batch, :, :span],
                v_cache[:batch, :, :span],
                attn_mask=mask,
                scale=self.scaling,
                enable_gqa=True,
            )

        return self._forward(hidden, cos, sin, attend, lora, lora, None)

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy a request's cache row (its first `length` entries) to another row (batch compaction)."""
        for k_cache, v_cache in zip(self.k_cache, self.v_cache, strict=True):
            k_cache[target, :, :length] = k_cache[source, :, :length]
            v_cache[target, :, :length] = v_cache[source, :, :length]

    # ---- shared layer loop -----------------------------------------------------------------------
    def _forward(self, hidden, cos, sin, attend, lora, head_lora, last: torch.Tensor | None) -> torch.Tensor:
        """Decoder layers, then final norm and LM head at each row's position `last` (None: the final one)
        -> logits [B, V]. `lora` covers every token of `hidden`, `head_lora` the B positions the head sees."""
        self.context.lora = lora
        try:
            for layer_idx, layer in enumerate(self.layers):
                hidden = hidden + self._attention(layer_idx, layer, layer.input_layernorm(hidden), cos, sin, attend)
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = hidden[:, -1] if last is None else hidden[torch.arange(hidden.shape[0]), last]
            self.context.lora = head_lora
            # Logits in fp32 so that sampling and log-probabilities do not depend on the model dtype.
            return self.lm_head(self.final_norm(hidden)).float()
        finally:
            self.context.lora = None

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
