"""Adapter-aware layers: the base's linear layers wrapped once, reading per-token adapter slots per forward.

A wrapped layer computes ``y = base(x) + delta(x)`` where delta depends on each token's device slot. The
slot of every token is described by the `LoraBatch` that the model runner puts in the shared
`ForwardContext` before each forward; a forward with no adapter rows skips the delta entirely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LoraBatch:
    """Which tokens of one forward carry which LoRA device slot.

    Shapes (N = tokens in the forward, M = tokens with an adapter, C = slot columns used: all S slots, or
    the U distinct active ones, r = max rank of the active slots):
      token_index  [M]      rows of the flattened [N, in] input that carry an adapter (None: all N rows)
      column_slots [C]      the slots gathered from the stacks, or None for all S slots in order
      slot_mask    [M, r*C] 1 at columns k*C + c where column c is row m's slot, else 0 (rank-major)
    `single_slot` is set when every token of the forward uses one slot (a prefill): a dense path.
    `rank` 0 means no token has an adapter of its own (only the merged adapter's correction below).

    While an adapter is merged into the base weights (`unmerge_slot` >= 0, its device slot), tokens of the
    base or of other adapters subtract its delta again: y -= (x A_m^T) B_m on `unmerge_index` [K] (None:
    every token). Tokens of the merged adapter itself need nothing.
    """

    token_index: torch.Tensor | None
    column_slots: torch.Tensor | None
    slot_mask: torch.Tensor | None
    rank: int
    single_slot: int | None = None
    unmerge_slot: int = -1
    unmerge_rank: int = 0
    unmerge_index: torch.Tensor | None = None


class ForwardContext:
    """Per-forward state shared by the wrapped layers; the model runner owns and sets it."""

    def __init__(self) -> None:
        self.lora: LoraBatch | None = None


class AdapterLinear(nn.Module):
    """A base linear layer plus a bank of LoRA device slots.

    Slots are preallocated, zero-padded stacks, rank-major so that the first r ranks of every slot are one
    contiguous block (no copy when a batch uses all slots):
      lora_a [R, S, in_features]
      lora_b [R, S, out_features]   (B transposed, scaling folded in)
    An empty slot or a padded rank contributes exactly zero, and loading an adapter is a copy into its
    slot, never an allocation in the step loop.
    """

    def __init__(self, base: nn.Module, context: ForwardContext) -> None:
        super().__init__()
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self._context = context
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None

    def allocate(self, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device) -> None:
        """Create the slot stacks the first time an adapter targets this layer (at load time)."""
        if self.lora_a is None:
            # lora_b first: forward() checks lora_a, so it never sees half-allocated stacks.
            self.lora_b = torch.zeros(max_rank, num_slots, self.out_features, dtype=dtype, device=device)
            self.lora_a = torch.zeros(max_rank, num_slots, self.in_features, dtype=dtype, device=device)

    def write_slot(self, slot: int, lora_a: torch.Tensor | None, lora_b_scaled: torch.Tensor | None) -> None:
        """Copy one adapter's A [r, in] and scaled B [out, r] into `slot`, or zero the slot when None."""
        if self.lora_a is None or self.lora_b is None:
            return
        self.lora_a[:, slot].zero_()
        self.lora_b[:, slot].zero_()
        if lora_a is not None and lora_b_scaled is not None:
            rank = lora_a.shape[0]
            self.lora_a[:rank, slot].copy_(lora_a)
            self.lora_b[:rank, slot].copy_(lora_b_scaled.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        lora = self._context.lora
        if lora is None or self.lora_a is None:
            return y
        # y is the base layer's fresh output, so deltas are added in place (addmm_/index_add_).
        x2 = x.reshape(-1, self.in_features).to(self.lora_a.dtype)
        y2 = y.view(-1, self.out_features)
        if lora.unmerge_slot >= 0:
            self._subtract_merged(x2, y2, lora)
        if lora.rank > 0:
            self._add_lora(x2, y2, lora)
        return y

    def _subtract_merged(self, x2: torch.Tensor, y2: torch.Tensor, lora: LoraBatch) -> None:
        a = self.lora_a[: lora.unmerge_rank, lora.unmerge_slot]  # [r, in]
        b = self.lora_b[: lora.unmerge_rank, lora.unmerge_slot].to(y2.dtype)  # [r, out]
        if lora.unmerge_index is None:
            y2.addmm_(x2 @ a.t(), b, alpha=-1)
        else:
            rows = x2.index_select(0, lora.unmerge_index)
            y2.index_add_(0, lora.unmerge_index, (rows @ a.t()) @ b, alpha=-1)

    def _add_lora(self, x2: torch.Tensor, y2: torch.Tensor, lora: LoraBatch) -> None:
        if lora.single_slot is not None:
            # y += (x A^T) B^T for one adapter: two dense GEMMs at the adapter's own rank.
            a = self.lora_a[: lora.rank, lora.single_slot]  # [r, in]
            b = self.lora_b[: lora.rank, lora.single_slot]  # [r, out]
            y2.addmm_(x2 @ a.t(), b.to(y2.dtype))
            return
        # Mixed slots: project every adapter row through all used slots' A at once, keep each row's own
        # block with the mask, and project back through the stacked B — two GEMMs, no loop over adapters.
        a, b = self._slot_columns(lora)  # [r*C, in], [r*C, out]
        if lora.token_index is None:  # every token carries an adapter (a decode step of adapter rows)
            y2.addmm_((x2 @ a.t()) * lora.slot_mask, b.to(y2.dtype))
            return
        rows = x2.index_select(0, lora.token_index)  # [M, in]
        delta = ((rows @ a.t()) * lora.slot_mask) @ b  # [M, out]
        y2.index_add_(0, lora.token_index, delta.to(y2.dtype))

    def _slot_columns(self, lora: LoraBatch) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_a[: lora.rank], self.lora_b[: lora.rank]  # contiguous views [r, S, *]
        if lora.column_slots is not None:  # few of many slots are used: gather them (a small copy)
            a, b = a.index_select(1, lora.column_slots), b.index_select(1, lora.column_slots)
        return a.reshape(-1, self.in_features), b.reshape(-1, self.out_features)


def wrap_linear_layers(model: nn.Module, context: ForwardContext) -> dict[str, AdapterLinear]:
    """Replace every nn.Linear (bitsandbytes' 4/8-bit layers subclass it) with an AdapterLinear, once."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    wrapped: dict[str, AdapterLinear] = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = AdapterLinear(module, context)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped


PAD_SLOT = -2  # padding tokens of a prefill: no work at all


def build_lora_batch(
    token_slots: list[int],
    slot_ranks: list[int],
    device: torch.device,
    dtype: torch.dtype,
    num_slots: int,
    merged_slot: int = -1,
) -> LoraBatch | None:
    """Describe a forward's adapter tokens (slot -1 = no adapter, PAD_SLOT = padding); None when no
    token needs adapter work. `merged_slot` is the slot of the adapter merged into the base, if any.

    When at least half of the slots are in use, the layers read all S slots in place (extra compute on the
    unused ones, no copy); otherwise they gather only the used slots.
    """
    index = [i for i, slot in enumerate(token_slots) if slot >= 0 and slot != merged_slot]
    unmerge = [i for i, slot in enumerate(token_slots) if slot != merged_slot and slot != PAD_SLOT]
    if merged_slot < 0 or not unmerge:
        correction = {}
    else:
        every = len(unmerge) == len(token_slots)
        correction = dict(
            unmerge_slot=merged_slot,
            unmerge_rank=slot_ranks[merged_slot],
            unmerge_index=None if every else torch.tensor(unmerge, device=device),
        )
    if not index:
        return LoraBatch(None, None, None, rank=0, **correction) if correction else None
    slots = [token_slots[i] for i in index]
    active = sorted(set(slots))
    rank = max(slot_ranks[s] for s in active)
    if len(active) == 1 and len(index) == len(token_slots):
        return LoraBatch(None, None, None, rank=rank, single_slot=active[0], **correction)
    gather = 2 * len(active) < num_slots
    columns = active if gather else list(range(num_slots))
    position = {slot: c for c, slot in enumerate(columns)}
    owner = torch.tensor([position[s] for s in slots])  # [M]
    one_hot = torch.arange(len(columns))[None, :] == owner[:, None]  # [M, C]
    return LoraBatch(
        token_index=None if len(index) == len(token_slots) else torch.tensor(index, device=device),
        column_slots=torch.tensor(active, device=device) if gather else None,
        slot_mask=one_hot.repeat(1, rank).to(device=device, dtype=dtype),  # column k*C + c
        rank=rank,
        **correction,
    )
