"""Attention over the paged KV cache: the torch reference (every device) and flash-attn's paged decode kernel.

A forward prepares its attention once, from the rows' block tables [B, nb], the cache positions of its queries
and the pool's block size; each layer then calls it with q [B, heads, T, D], its pools
[num_blocks, block_size, kv_heads, D] (the forward's new K/V already written), the layer's softmax scale, its
sliding window (None: full attention) and its logit softcap (None: none), and gets [B, heads, T, D].

A query at cache position p attends over the row's entries at positions k with k <= p and, for a window w,
k > p - w (transformers' sliding-window rule). Softcapping (Gemma 2) replaces each score s by
softcap * tanh(s / softcap) before the softmax.

- `torch_paged_attention` gathers each row's blocks into a contiguous tensor (buffers kept across layers and
  forwards) and attends with a per-row mask (one mask per window size, built on first use). It is the
  reference, and the path on the CPU.
- `flash_decode_attention` calls flash-attn's `flash_attn_with_kvcache` with the block table, reading the pool in
  place (decode steps only: one query per row). flash-attn 2 pages in blocks of a multiple of 256 tokens, so it is
  used only with such a --block-size.

`select_decode_attention` picks the decode path at start-up and says which, and why, in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FLASH_BLOCK_MULTIPLE = 256  # flash-attn 2's paged KV cache needs page sizes divisible by this
FLASH_MIN_VERSION = (2, 6)  # the first flash-attn with softcap (windows came earlier)

# (q, key_pool, value_pool, scale, window, softcap) -> [B, heads, T, D]
LayerAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, int | None, float | None], torch.Tensor]
# (tables, positions [B], block_size, gather buffers or None)
DecodeAttention = Callable[[torch.Tensor, torch.Tensor, int, "GatherBuffers | None"], LayerAttention]


class GatherBuffers:
    """Two buffers (K and V) that gathers copy into, kept across layers and forwards and grown by a quarter when
    too small. On the CPU a fresh buffer of a decode step's size costs more in page faults than the copy: one
    step's attention over 48 rows of 70-1,700 positions took 1.6 s with fresh buffers and 0.6 s with these."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self._buffers = [torch.empty(0, dtype=dtype, device=device) for _ in range(2)]

    def take(self, which: int, rows: int, row_elements: int) -> torch.Tensor:
        """A [rows, row_elements] view of buffer `which` (0: keys, 1: values), valid until its next take."""
        needed = rows * row_elements
        buffer = self._buffers[which]
        if buffer.numel() < needed:
            buffer = self._buffers[which] = torch.empty(needed + needed // 4, dtype=buffer.dtype, device=buffer.device)
        return buffer[:needed].view(rows, row_elements)


def gather_blocks(pool: torch.Tensor, tables: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's entries through its block table: [B, kv_heads, nb * block_size, D], copied (into `out`, a
    [B * nb, block elements] buffer, when given) by one row gather of whole blocks."""
    rows, width = tables.shape[0], tables.shape[1] * pool.shape[1]
    gathered = torch.index_select(pool.view(pool.shape[0], -1), 0, tables.reshape(-1), out=out)
    return gathered.view(rows, width, pool.shape[2], pool.shape[3]).transpose(1, 2)


def attention_mask(query_positions: torch.Tensor, width: int, window: int | None) -> torch.Tensor:
    """[B, 1, T, width] bool: True where key position k (0..width-1) is visible from query position p
    (query_positions [B, T]): k <= p, and k > p - window for a sliding window."""
    keys = torch.arange(width, device=query_positions.device)[None, None, :]
    queries = query_positions[:, :, None]
    visible = keys <= queries
    if window is not None:
        visible &= keys > queries - window
    return visible[:, None]


def masked_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """softmax(q k^T * scale [softcapped] + mask) v with grouped KV heads (q [B, H, T, D], keys/values
    [B, Hkv, W, D], mask [B, 1, T, W] bool or None for causal attention over T == W own entries)."""
    if softcap is None:
        if mask is None:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    # SDPA has no softcap: explicit scores, in the order transformers' eager Gemma 2 attention computes them.
    groups = q.shape[1] // keys.shape[1]
    if groups > 1:
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    scores = torch.matmul(q, keys.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(values.dtype), values)


def torch_paged_attention(
    tables: torch.Tensor, positions: torch.Tensor, block_size: int, buffers: GatherBuffers | None = None
) -> LayerAttention:
    """Attention for queries at cache positions `positions` [B, T] over their rows' blocks (tables [B, nb]),
    gathered into `buffers` when given."""
    width = tables.shape[1] * block_size
    masks: dict[int | None, torch.Tensor] = {}  # by window: layers of one forward share them

    def gather(pool: torch.Tensor, which: int) -> torch.Tensor:
        out = None if buffers is None else buffers.take(which, tables.numel(), pool[0].numel())
        return gather_blocks(pool, tables, out)

    def attend(q, key_pool, value_pool, scale, window=None, softcap=None):
        mask = masks.get(window)
        if mask is None:
            mask = masks[window] = attention_mask(positions, width, window)
        return masked_attention(q, gather(key_pool, 0), gather(value_pool, 1), mask, scale, softcap)

    return attend


def torch_decode_attention(
    tables: torch.Tensor, positions: torch.Tensor, block_size: int, buffers: GatherBuffers | None = None
) -> LayerAttention:
    """One query per row, at `positions` [B] (its new K/V already written there)."""
    return torch_paged_attention(tables, positions[:, None], block_size, buffers)


def flash_decode_attention(
    tables: torch.Tensor, positions: torch.Tensor, block_size: int, buffers: GatherBuffers | None = None
) -> LayerAttention:
    """Reads the pools in place: `buffers` is not used."""
    from flash_attn import flash_attn_with_kvcache

    lengths = (positions + 1).to(torch.int32)  # entries each row attends over, its new token included
    block_table = tables.to(torch.int32)

    def attend(q, key_pool, value_pool, scale, window=None, softcap=None):
        out = flash_attn_with_kvcache(
            q.transpose(1, 2),  # [B, 1, heads, D]
            key_pool,
            value_pool,
            cache_seqlens=lengths,
            block_table=block_table,
            softmax_scale=scale,
            causal=True,
            # flash-attn's window admits keys j with i - left <= j <= i + right: left = window - 1 is k > p - window.
            window_size=(-1, -1) if window is None else (window - 1, 0),
            softcap=0.0 if softcap is None else softcap,
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
        import flash_attn
    except ImportError:
        return "flash-attn is not installed"
    version = tuple(int(part) for part in flash_attn.__version__.split(".")[:2] if part.isdigit())
    if version < FLASH_MIN_VERSION:
        return f"flash-attn {flash_attn.__version__} has no softcap (needs {'.'.join(map(str, FLASH_MIN_VERSION))}+)"
    return None
