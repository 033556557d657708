"""Who owns which KV-cache block: allocation, reference counts and the automatic prefix cache.

A block is free (nobody holds it, no content worth keeping), used (held by one or more running requests) or
cached (nobody holds it, but it is a full block whose content is indexed by its hash, so a later request with
the same prefix can take it instead of recomputing it). Cached blocks are evicted least recently released first,
and only when no free block is left.

A full block is named by a hash chain: the hash of its parent block's name and its own tokens, rooted in
everything else that shaped its K/V (the request's adapter identity and version, the adapter merged into the
base). SHA-256, not Python's hash: a tenant must not be able to craft a prompt whose blocks collide with
another tenant's.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from deltaserve.server.model.kv_cache import NULL_BLOCK


def root_hash(identity: str) -> bytes:
    """The chain's root: what besides the tokens decides a block's K/V."""
    return hashlib.sha256(b"deltaserve-kv\0" + identity.encode()).digest()


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockManager:
    """The engine thread's view of the paged KV cache's blocks (not thread-safe: the engine thread only)."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool) -> None:
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.usable = num_blocks - 1  # block 0 is the null block
        self._free: deque[int] = deque(b for b in range(num_blocks) if b != NULL_BLOCK)
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, LRU first

    # ---- counts (read by metrics at scrape time) ---------------------------------------------------
    @property
    def available(self) -> int:
        """Blocks an allocation can get: free ones, then cached ones evicted."""
        return len(self._free) + len(self._evictable)

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def cached_count(self) -> int:
        return len(self._evictable)

    @property
    def used_count(self) -> int:
        return self.usable - self.available

    # ---- allocation ----------------------------------------------------------------------------------
    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks held once each, or None (and nothing taken) when fewer are available."""
        if count > self.available:
            return None
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of[block]]
                self._hash_of[block] = None
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int], *, keep_cached: bool = True) -> list[int]:
        """Drop one hold on each block. Returns the blocks that became free with content nobody should read
        again (with keep_cached=False, a failed request's, whose hashes are forgotten): the caller zeroes them."""
        dropped = []
        for block in reversed(blocks):  # the tail of a sequence is evicted before its head
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            digest = self._hash_of[block]
            if digest is not None and keep_cached:
                self._evictable[block] = None
                continue
            if digest is not None:
                del self._by_hash[digest]
                self._hash_of[block] = None
            self._free.append(block)
            if not keep_cached:
                dropped.append(block)
        return dropped

    # ---- the prefix cache ----------------------------------------------------------------------------
    def take_cached(self, hashes: list[bytes]) -> list[int]:
        """The longest run of `hashes` (a chain, in order) that the cache holds, each block now held once more."""
        if not self.prefix_caching:
            return []
        blocks = []
        for digest in hashes:
            block = self._by_hash.get(digest)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            blocks.append(block)
        return blocks

    def register(self, block: int, digest: bytes) -> None:
        """Index a full block by its hash. A block with that hash already indexed (the same prefix computed
        twice at once) stays the one that is found; this one is freed normally when released."""
        if not self.prefix_caching or self._hash_of[block] is not None or digest in self._by_hash:
            return
        self._by_hash[digest] = block
        self._hash_of[block] = digest
