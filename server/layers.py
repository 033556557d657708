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

    Shapes (N = tokens in the forward, M = tokens with an adapter, U = distinct slots, R = max rank of
    those slots):
      token_index  [M]      rows of the flattened [N, in] input that carry an adapter
      active_slots [U]      the distinct slots, ascending
      slot_mask    [M, U*R] 1 where column block u belongs to row m's slot, else 0
    `single_slot` is set when every token of the forward uses one slot (a prefill): a dense path.
    """

    token_index: torch.Tensor | None
    active_slots: torch.Tensor | None
    slot_mask: torch.Tensor | None
    rank: int
    single_slot: int | None = None
    all_slots_active: bool = False


class ForwardContext:
    """Per-forward state shared by the wrapped layers; the model runner owns and sets it."""

    def __init__(self) -> None:
        self.lora: LoraBatch | None = None


class AdapterLinear(nn.Module):
    """A base linear layer plus a bank of LoRA device slots.

    Slots are preallocated stacks, zero-padded to the server's max rank, so an empty slot or a padded
    rank contributes exactly zero and loading an adapter is a copy, never an allocation in the step loop:
      lora_a [S, R, in_features]
      lora_b [S, R, out_features]   (B transposed, scaling folded in)
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
            self.lora_b = torch.zeros(num_slots, max_rank, self.out_features, dtype=dtype, device=device)
            self.lora_a = torch.zeros(num_slots, max_rank, self.in_features, dtype=dtype, device=device)

    def write_slot(self, slot: int, lora_a: torch.Tensor | None, lora_b_scaled: torch.Tensor | None) -> None:
        """Copy one adapter's A [r, in] and scaled B [out, r] into `slot`, or zero the slot when None."""
        if self.lora_a is None or self.lora_b is None:
            return
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if lora_a is not None and lora_b_scaled is not None:
            rank = lora_a.shape[0]
            self.lora_a[slot, :rank].copy_(lora_a)
            self.lora_b[slot, :rank].copy_(lora_b_scaled.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        lora = self._context.lora
        if lora is None or self.lora_a is None:
            return y
        return self._add_lora(x, y, lora)

    def _add_lora(self, x: torch.Tensor, y: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.lora_a.dtype)
        y2 = y.reshape(-1, self.out_features)
        if lora.single_slot is not None:
            # y += (x A^T) B^T for one adapter: two dense GEMMs at the adapter's own rank.
            a = self.lora_a[lora.single_slot, : lora.rank]  # [r, in]
            b = self.lora_b[lora.single_slot, : lora.rank]  # [r, out]
            return (y2 + (x2 @ a.t()) @ b).to(y.dtype).view_as(y)
        # Mixed slots: project every adapter row through all active slots' A at once, keep each row's own
        # block with the mask, and project back through the stacked B — two GEMMs, no loop over adapters.
        a, b = self._active_stacks(lora)  # [U*R, in], [U*R, out]
        rows = x2.index_select(0, lora.token_index)  # [M, in]
        delta = ((rows @ a.t()) * lora.slot_mask) @ b  # [M, out]
        return y2.index_add(0, lora.token_index, delta.to(y2.dtype)).view_as(y)

    def _active_stacks(self, lora: LoraBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if lora.all_slots_active and lora.rank == self.lora_a.shape[1]:
            a, b = self.lora_a, self.lora_b
        else:
            a = self.lora_a[:, : lora.rank].index_select(0, lora.active_slots)
            b = self.lora_b[:, : lora.rank].index_select(0, lora.active_slots)
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


def build_lora_batch(
    token_slots: list[int], slot_ranks: list[int], device: torch.device, dtype: torch.dtype, num_slots: int
) -> LoraBatch | None:
    """Describe a forward's adapter tokens (slot -1 = no adapter); None when no token has one."""
    index = [i for i, slot in enumerate(token_slots) if slot >= 0]
    if not index:
        return None
    slots = [token_slots[i] for i in index]
    active = sorted(set(slots))
    rank = max(slot_ranks[s] for s in active)
    if len(active) == 1 and len(index) == len(token_slots):
        return LoraBatch(None, None, None, rank=rank, single_slot=active[0])
    position = {slot: u for u, slot in enumerate(active)}
    owner = torch.tensor([position[s] for s in slots])  # [M]
    mask = (torch.arange(len(active))[None, :] == owner[:, None]).repeat_interleave(rank, dim=1)
    return LoraBatch(
        token_index=torch.tensor(index, device=device),
        active_slots=torch.tensor(active, device=device),
        slot_mask=mask.to(device=device, dtype=dtype),
        rank=rank,
        all_slots_active=len(active) == num_slots,
    )
