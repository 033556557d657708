"""Decode attention over the paged KV cache: the torch reference (every device) and flash-attn's paged kernel.

A decode step prepares its attention once, from the paged cache (server/model/kv_cache.py: pools
[num_blocks, block_size, kv_heads, D] per layer), the rows' block tables [B, nb], their new positions [B] (the
new token's K/V already written there) and the softmax scale; each layer then calls it with q [B, heads, 1, D]
and its layer index, and gets [B, heads, 1, D].

- `torch_decode_attention` gathers each row's blocks into a contiguous tensor and runs SDPA with a per-row
  length mask. It is the reference, and the path on the CPU.
- `flash_decode_attention` calls flash-attn's `flash_attn_with_kvcache` with the block table, reading the pool in
  place. flash-attn 2 pages in blocks of a multiple of 256 tokens, so it is used only with such a --block-size.

`select_decode_attention` picks one at start-up and says which, and why, in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FLASH_BLOCK_MULTIPLE = 256  # flash-attn 2's paged KV cache needs page sizes divisible by this

LayerAttention = Callable[[torch.Tensor, int], torch.Tensor]  # (q, layer index) -> attention output
DecodeAttention = Callable[
    [Any, torch.Tensor, torch.Tensor, float], LayerAttention
]  # (cache, tables, positions, scale)


def gather_blocks(pool: torch.Tensor, tables: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's entries through its block table: [B, kv_heads, nb * block_size, D], copied into `out` (a
    [B * nb, block elements] buffer) when given. One row gather of whole blocks; reusing `out` across layers and
    steps matters on the CPU, where a fresh buffer of this size costs more in page faults than the copy."""
    rows, width = tables.shape[0], tables.shape[1] * pool.shape[1]
    gathered = torch.index_select(pool.view(pool.shape[0], -1), 0, tables.reshape(-1), out=out)
    return gathered.view(rows, width, pool.shape[2], pool.shape[3]).transpose(1, 2)


def torch_decode_attention(cache: Any, tables: torch.Tensor, positions: torch.Tensor, scale: float) -> LayerAttention:
    """`cache` is a PagedKVCache: its `gather(layer, tables)` gives each row's K and V [B, kv_heads, W, D]."""
    width = tables.shape[1] * cache.block_size
    # [B, 1, 1, width]: a row sees its own entries up to and including the new token.
    mask = (torch.arange(width, device=tables.device)[None, :] <= positions[:, None])[:, None, None, :]

    def attend(q: torch.Tensor, layer: int) -> torch.Tensor:
        keys, values = cache.gather(layer, tables)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)

    return attend


def flash_decode_attention(cache: Any, tables: torch.Tensor, positions: torch.Tensor, scale: float) -> LayerAttention:
    """`cache` is a PagedKVCache; flash-attn reads its pools `keys[layer]`/`values[layer]` in place."""
    from flash_attn import flash_attn_with_kvcache

    lengths = (positions + 1).to(torch.int32)  # entries each row attends over, its new token included
    block_table = tables.to(torch.int32)

    def attend(q: torch.Tensor, layer: int) -> torch.Tensor:
        out = flash_attn_with_kvcache(
            q.transpose(1, 2),  # [B, 1, heads, D]
            cache.keys[layer],
            cache.values[layer],
            cache_seqlens=lengths,
            block_table=block_table,
            softmax_scale=scale,
            causal=True,
        )
        return out.transpose(1, 2)

    return attend


def select_decode_attention(device: torch.device, block_size: int, dtype: torch.dtype) -> DecodeAttention:
    """flash-attn's paged kernel where it can run (CUDA, fp16/bf16, installed, a block size it pages in), else
    the torch path."""
    if device.type != "cuda":
        return torch_decode_attention
    reason = flash_unavailable(block_size, dtype)
    if reason is None:
        log.info("decode attention: flash-attn paged kernel (flash_attn_with_kvcache, %d-token blocks)", block_size)
        return flash_decode_attention
    log.info("decode attention: torch gather + SDPA (%s)", reason)
    return torch_decode_attention


def flash_unavailable(block_size: int, dtype: torch.dtype) -> str | None:
    """Why flash-attn's paged kernel cannot serve this cache, or None when it can."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs fp16 or bf16, the cache is {dtype}"
    if block_size % FLASH_BLOCK_MULTIPLE:
        return f"flash-attn pages in multiples of {FLASH_BLOCK_MULTIPLE} tokens; --block-size is {block_size}"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flash-attn is not installed"
    return None
