"""The paged KV cache: one pool of fixed-size blocks per layer, addressed through per-request block tables.

Layout per layer: K and V of shape [num_blocks, block_size, kv_heads, head_dim] (the layout of paged-attention
kernels such as flash-attn's `flash_attn_with_kvcache`). Token position p of a request lives in block
`table[p // block_size]` at offset `p % block_size`. Block 0 is the null block: never handed out and always
zero, it pads block tables, so a gather through a padded table reads finite zeros that the mask then hides.
Which block belongs to whom is decided by the engine (server/engine/kv_blocks.py); this module only stores.
"""

from __future__ import annotations

import torch
from deltaserve.server.kernels.paged_attention import gather_blocks

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
        self.dtype = dtype
        self._block_elements = block_size * kv_heads * head_dim
        self._gather_buffers = [torch.empty(0, dtype=dtype, device=device) for _ in range(2)]
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

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's K and V through its block table [B, nb]: [B, kv_heads, nb * block_size, head_dim], views of
        two reused buffers (valid until the next gather)."""
        count = tables.numel()
        return (
            gather_blocks(self.keys[layer], tables, self._workspace(0, count)),
            gather_blocks(self.values[layer], tables, self._workspace(1, count)),
        )

    def _workspace(self, which: int, blocks: int) -> torch.Tensor:
        """A [blocks, block elements] view of a buffer kept across gathers, grown by a quarter when too small."""
        needed = blocks * self._block_elements
        if self._gather_buffers[which].numel() < needed:
            self._gather_buffers[which] = torch.empty(needed + needed // 4, dtype=self.dtype, device=self.device)
        return self._gather_buffers[which][:needed].view(blocks, self._block_elements)

    def zero(self, blocks: list[int]) -> None:
        """Clear blocks (after a failed request): a later owner masks their stale entries out, but a masked NaN
        or inf would still poison its softmax sum."""
        if not blocks:
            return
        index = torch.tensor(blocks, device=self.device)
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[index] = 0
            values[index] = 0
