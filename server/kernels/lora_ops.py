"""Mixed-adapter LoRA: y += (x A_s^T) B_s^T for each token's device slot s, with no Python loop over adapters.

The slot stacks are slot-major and zero-padded (see `AdapterLinear`):
  lora_a [S, R, in]    lora_b [S, R, out] (B transposed, scaling folded in)
so an empty slot or a padded rank adds exactly zero, and the first r ranks of a slot are one contiguous block.

A forward with tokens of several slots runs one of two strategies, chosen by `build_lora_batch` from the batch:
- grouped (SGMV-style, every device): the adapter tokens are grouped by slot into G chunks of k rows; two
  batched GEMMs over the chunks, `[G, k, in] x [G, in, r] -> [G, k, r] x [G, r, out]`, then each token takes
  its row back (a gather and an add). When the tokens already are the chunks in order (a decode batch that the
  engine ordered by slot, with as many rows on each adapter), the GEMMs read and write them in place.
  Each chunk reads its slot's weights once and the arithmetic is each token's own rank (plus padding).
  A skewed prefill (one slot owns most tokens, more than SPLIT_MIN_ROWS of them) is cut into chunks of about
  M / C rows so the padding stays small; a batch that uses at least half of the slots reads the stacks in place
  (no copy of the weights).
- per-token (BGMV-style, CUDA with Triton): `deltaserve.server.kernels.triton_lora` kernels read each token's own
  slot rows directly; no grouping, no copies. Used for small forwards (decode steps), like Punica's BGMV.

`reference_lora` is the plain per-token definition that the tests compare both against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PER_TOKEN_MAX_TOKENS = 256  # forwards up to this many tokens use the per-token kernel where it is available
# A slot's group is cut into several chunks only past this many rows. Below it the GEMMs are bound by reading the
# weights, which a cut reads again for every chunk, while the padding it saves is arithmetic that costs nothing
# (a decode step: 16 rows over 8 rank-16 adapters, 4 of them on one adapter, read 11 chunks' weights when cut).
SPLIT_MIN_ROWS = 16


@dataclass(frozen=True)
class LoraGroups:
    """Adapter tokens grouped by slot for the batched GEMMs: G chunks of `size` rows each.

    rows      [G * size]     the token (row of the flattened input) of each chunk entry; padding repeats a row
    slots     [G] | None     each chunk's slot; None when chunk g is slot g for all S slots (stacks read in place)
    padding   [G, size, 1] | None   True at padding entries (their products are zeroed); None when there are none
    inverse   [N] | None     each token's entry, or a padding entry (zero) for tokens without one, so that the
                             result reaches the tokens by one gather and an add; None: scatter with index_add_
    identity  True when the entries are the tokens in order (rows = 0..N-1, no padding): the decode batch of a
              balanced mix, which the engine orders by slot. Then no gather or scatter is needed at all.
    keep      the plan serves many forwards (a decode batch, until its rows change): weights gathered for it
              are kept by each layer instead of being gathered again every step
    """

    rows: torch.Tensor
    slots: torch.Tensor | None
    padding: torch.Tensor | None
    size: int
    inverse: torch.Tensor | None = None
    identity: bool = False
    keep: bool = False


def plan_groups(
    slot_rows: dict[int, list[int]],
    num_slots: int,
    device: torch.device,
    num_tokens: int,
    chunk_size: int | None = None,
    keep: bool = False,
) -> LoraGroups:
    """Chunks for `slot_rows` (slot -> its token rows, every list non-empty) of a forward of `num_tokens`
    tokens. Chunk size: the largest group, unless that is over SPLIT_MIN_ROWS rows and pads the batch to more
    than twice its tokens (a skewed prefill), then about M / C rows (or `chunk_size` when given, for tests)."""
    total = sum(len(rows) for rows in slot_rows.values())
    largest = max(len(rows) for rows in slot_rows.values())
    size = chunk_size or largest
    if chunk_size is None and largest > SPLIT_MIN_ROWS and len(slot_rows) * largest > 2 * total:
        size = math.ceil(total / len(slot_rows))
    chunks = [(slot, rows[i : i + size]) for slot, rows in sorted(slot_rows.items()) for i in range(0, len(rows), size)]
    in_place = len(chunks) == len(slot_rows) and 2 * len(slot_rows) >= num_slots
    if in_place:  # every slot is a chunk, in order; a slot unused by this forward is all padding
        by_slot = dict(chunks)
        chunks = [(slot, by_slot.get(slot, [])) for slot in range(num_slots)]
    first_row = next(iter(slot_rows.values()))[0]
    rows, padding = [], []
    for _, members in chunks:
        filler = members[0] if members else first_row
        rows += members + [filler] * (size - len(members))
        padding += [False] * len(members) + [True] * (size - len(members))
    return LoraGroups(
        rows=torch.tensor(rows, device=device),
        slots=None if in_place else torch.tensor([slot for slot, _ in chunks], device=device),
        padding=torch.tensor(padding, device=device).view(len(chunks), size, 1) if any(padding) else None,
        size=size,
        inverse=_inverse(rows, padding, num_tokens, device),
        identity=not any(padding) and rows == list(range(num_tokens)),
        keep=keep,
    )


def _inverse(rows: list[int], padding: list[bool], num_tokens: int, device: torch.device) -> torch.Tensor | None:
    """Each token's entry among `rows` (padding entries excluded), or the first padding entry for a token that
    has none; None when some token has neither."""
    entry = {row: e for e, (row, pad) in enumerate(zip(rows, padding, strict=True)) if not pad}  # one per token
    zero = next((e for e, pad in enumerate(padding) if pad), None)
    if zero is None and len(entry) < num_tokens:
        return None
    return torch.tensor([entry.get(t, zero) for t in range(num_tokens)], device=device)


def grouped_weights(
    lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int, groups: LoraGroups
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chunk's A [G, r, in] and B [G, r, out]: views of the stacks when they are read in place, else copies
    gathered by chunk slot (which a decode batch keeps across its steps: `AdapterLinear`)."""
    # narrow, not a[:, :rank]: this runs for every layer of every step, and tensor indexing costs ~10 us.
    a, b = lora_a.narrow(1, 0, rank), lora_b.narrow(1, 0, rank)  # [S, r, in], [S, r, out]
    if groups.slots is not None:
        a, b = a.index_select(0, groups.slots), b.index_select(0, groups.slots)
    return a, b


def grouped_lora_(y2: torch.Tensor, x2: torch.Tensor, a: torch.Tensor, b: torch.Tensor, groups: LoraGroups) -> None:
    """y2 [N, out] += each grouped token's LoRA delta, in place, with the chunks' weights a [G, r, in] and
    b [G, r, out] (`grouped_weights`). x2 [N, in] in the weights' dtype."""
    count, out = b.shape[0], b.shape[-1]
    if groups.identity:  # the tokens are the chunks, in order: no gather, no scatter
        z = torch.bmm(x2.view(count, groups.size, x2.shape[1]), a.transpose(1, 2))  # [G, k, r]
        y2.view(count, groups.size, out).baddbmm_(z, b if b.dtype == y2.dtype else b.to(y2.dtype))
        return
    xg = x2.index_select(0, groups.rows).view(count, groups.size, x2.shape[1])  # [G, k, in]
    z = torch.bmm(xg, a.transpose(1, 2))  # [G, k, r]
    if groups.padding is not None:
        z.masked_fill_(groups.padding, 0.0)  # not a multiply: an overflowed padding product must not leak NaN
    delta = torch.bmm(z, b).view(-1, out)  # [G * k, out]
    delta = delta if delta.dtype == y2.dtype else delta.to(y2.dtype)
    if groups.inverse is not None:  # a gather and an add: cheaper than index_add_'s scatter on the CPU
        y2.add_(delta.index_select(0, groups.inverse))
    else:
        y2.index_add_(0, groups.rows, delta)


def reference_lora(
    x2: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, token_slots: list[int]
) -> torch.Tensor:
    """The definition, one token at a time: delta[t] = (x[t] A_s^T) B_s^T for s = token_slots[t] (< 0: none)."""
    delta = torch.zeros(x2.shape[0], lora_b.shape[-1], dtype=lora_b.dtype, device=x2.device)
    for t, slot in enumerate(token_slots):
        if slot >= 0:
            delta[t] = (x2[t] @ lora_a[slot].t()) @ lora_b[slot]
    return delta
