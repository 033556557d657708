"""The paged KV cache: one pool of fixed-size blocks per layer, addressed through per-request block tables.

Layout per layer: K and V of shape [num_blocks, block_size, kv_heads, head_dim] (the layout of paged-attention
kernels such as flash-attn's `flash_attn_with_kvcache`). Token position p of a request lives in block
`table[p // block_size]` at offset `p % block_size`. Block 0 is the null block: never handed out and always
zero, it pads block tables, so a gather through a padded table reads finite zeros that the mask then hides.
Which block belongs to whom is decided by the engine (server/engine/kv_blocks.py); this module only stores.
"""

from __future__ import annotations

import torch
from deltaserve.server.kernels.paged_attention import GatherBuffers

NULL_BLOCK = 0


def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one block in every layer."""
    return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def blocks_for(positions: int, block_size: int) -> int:
    return -(-positions // block_size)


class PagedKVCache:
    """K/V block pools of every layer, plus the index arithmetic that reads and writes them."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_blocks < 2:
            raise ValueError("a paged KV cache needs at least two blocks (block 0 is the null block)")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.device = device
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.gather_buffers = GatherBuffers(dtype, device)  # the torch attention path copies blocks into these
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def slots(self, table: list[int], start: int, count: int) -> list[int]:
        """Flat slot indices (block * block_size + offset) of positions start..start+count-1 of one table."""
        size = self.block_size
        return [table[p // size] * size + p % size for p in range(start, start + count)]

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store K/V ([N, kv_heads, head_dim]) at flat slots [N]."""
        self.keys[layer].view(-1, self.kv_heads, self.head_dim)[slots] = keys
        self.values[layer].view(-1, self.kv_heads, self.head_dim)[slots] = values

    def zero(self, blocks: list[int]) -> None:
        """Clear blocks (after a failed request): a later owner masks their stale entries out, but a masked NaN
        or inf would still poison its softmax sum."""
        if not blocks:
            return
        index = torch.tensor(blocks, device=self.device)
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[index] = 0
            values[index] = 0
