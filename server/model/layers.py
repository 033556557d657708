"""Adapter-aware layers: the base's linear layers wrapped once, reading per-token adapter slots per forward.

A wrapped layer computes ``y = o * base(x * i) + beta + delta(x)`` where the low-rank delta, the scales and the
bias delta depend on each token's device slot (see `deltaserve.adapters.weights`). The slot of every token is
described by the `LoraBatch` (low-rank part) and the `SlotBatch` (vectors, bottlenecks) that the model runner
puts in the shared `ForwardContext` before each forward; a forward with no adapter rows skips all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from deltaserve.adapters import Bottleneck, ModuleDelta
from deltaserve.server.kernels import triton_lora
from deltaserve.server.kernels.lora_ops import (
    PER_TOKEN_MAX_TOKENS,
    LoraGroups,
    grouped_lora_,
    grouped_weights,
    plan_groups,
)
from torch import nn
from transformers.activations import ACT2FN


@dataclass(frozen=True)
class LoraBatch:
    """Which tokens of one forward carry which LoRA device slot (see `deltaserve.server.kernels.lora_ops`).

    `rank` is the largest rank among the forward's slots; 0 means no token has an adapter of its own (only the
    merged adapter's correction below). Exactly one way of applying the deltas is set when rank > 0:
      single_slot   every token uses this slot (a prefill of one adapter): two dense GEMMs
      groups        tokens grouped by slot for two batched GEMMs (SGMV-style)
      token_slots   [N] each token's slot or -1, for the per-token Triton kernels on CUDA (BGMV-style)

    While an adapter is merged into the base weights (`unmerge_slot` >= 0, its device slot), tokens of the
    base or of other adapters subtract its delta again: y -= (x A_m^T) B_m on `unmerge_index` [K] (None:
    every token). Tokens of the merged adapter itself need nothing.
    """

    rank: int
    single_slot: int | None = None
    groups: LoraGroups | None = None
    token_slots: torch.Tensor | None = None
    unmerge_slot: int = -1
    unmerge_rank: int = 0
    unmerge_index: torch.Tensor | None = None


@dataclass(frozen=True)
class SlotBatch:
    """Each token's slot for the per-slot vectors and bottlenecks of one forward.

    index     [N]     the token's slot, or S (an identity row: ones / zeros) for tokens without an adapter
    vectors           some token's slot has scales or bias deltas (the linear layers apply their stacks)
    columns   [U]     the U distinct slots with bottleneck modules in this forward (None: none), which the
                      banks gather; `column_list` is the same on the host
    owned     [N, U]  True where a token's slot is column u (selected with torch.where, never multiplied:
                      another column's inf times 0 would be NaN in this token's row)
    """

    index: torch.Tensor
    vectors: bool
    columns: torch.Tensor | None = None
    column_list: tuple[int, ...] = ()
    owned: torch.Tensor | None = None


class ForwardContext:
    """Per-forward state shared by the wrapped layers; the model runner owns and sets it."""

    def __init__(self) -> None:
        self.lora: LoraBatch | None = None
        self.slots: SlotBatch | None = None  # set only when a slot in the forward has vectors or bottlenecks


class AdapterLinear(nn.Module):
    """A base linear layer plus a bank of LoRA device slots.

    Slots are preallocated, zero-padded stacks, slot-major so that the first r ranks of a slot are one
    contiguous block (see `deltaserve.server.kernels.lora_ops` for how a forward reads them):
      lora_a [S, R, in_features]
      lora_b [S, R, out_features]   (B transposed, scaling folded in)
    An empty slot or a padded rank contributes exactly zero, and loading an adapter is a copy into its
    slot, never an allocation in the step loop. Per-slot vectors live in [S + 1, features] stacks (created
    when an adapter first uses them) whose last row is the identity for tokens without an adapter:
      input_scale [S + 1, in], output_scale [S + 1, out] (ones), bias_delta [S + 1, out] (zeros)
    """

    def __init__(self, base: nn.Module, context: ForwardContext) -> None:
        super().__init__()
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self._context = context
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None
        self.input_scale: torch.Tensor | None = None
        self.output_scale: torch.Tensor | None = None
        self.bias_delta: torch.Tensor | None = None
        self._kept: tuple[LoraGroups, torch.Tensor, torch.Tensor] | None = None  # a decode batch's gathered A, B

    def allocate(
        self, delta: ModuleDelta, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        """Create the stacks `delta` needs the first time an adapter uses them here (at load time)."""
        if delta.lora_a is not None and self.lora_a is None:
            # lora_b first: forward() checks lora_a, so it never sees half-allocated stacks.
            self.lora_b = torch.zeros(num_slots, max_rank, self.out_features, dtype=dtype, device=device)
            self.lora_a = torch.zeros(num_slots, max_rank, self.in_features, dtype=dtype, device=device)
        rows = num_slots + 1
        if delta.input_scale is not None and self.input_scale is None:
            self.input_scale = torch.ones(rows, self.in_features, dtype=dtype, device=device)
        if delta.output_scale is not None and self.output_scale is None:
            self.output_scale = torch.ones(rows, self.out_features, dtype=dtype, device=device)
        if delta.bias_delta is not None and self.bias_delta is None:
            self.bias_delta = torch.zeros(rows, self.out_features, dtype=dtype, device=device)

    def write_slot(self, slot: int, delta: ModuleDelta | None) -> None:
        """Copy one adapter's parts (already on the device) into `slot`; the parts it lacks, and every part
        when `delta` is None, become the identity."""
        delta = delta or ModuleDelta()
        self._kept = None  # gathered copies never outlive a write (the slots of a kept batch are in use anyway)
        if self.lora_a is not None and self.lora_b is not None:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
            if delta.lora_a is not None:
                rank = delta.rank
                self.lora_a[slot, :rank].copy_(delta.lora_a)
                self.lora_b[slot, :rank].copy_(delta.lora_b_scaled.t())
        for stack, vector, identity in (
            (self.input_scale, delta.input_scale, 1.0),
            (self.output_scale, delta.output_scale, 1.0),
            (self.bias_delta, delta.bias_delta, 0.0),
        ):
            if stack is not None:
                stack[slot].copy_(vector) if vector is not None else stack[slot].fill_(identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slots, lora = self._context.slots, self._context.lora
        vectors = slots is not None and slots.vectors
        x_in = x
        if vectors and self.input_scale is not None:  # IA3 on a feed-forward layer: the base sees x * i
            x_in = (x.reshape(-1, self.in_features) * self.input_scale.index_select(0, slots.index)).view_as(x)
        y = self.base(x_in)
        adapters = lora is not None and self.lora_a is not None
        # y is the base layer's fresh output, so everything below works in place (mul_/addmm_/index_add_).
        y2 = y.view(-1, self.out_features)
        if adapters and lora.unmerge_slot >= 0:
            # The merged base computed (W + dW_m) x_in: take dW_m back out before any scale applies to W x_in.
            self._subtract_merged(self._rows(x_in), y2, lora)
        if vectors:
            self._apply_vectors(y, slots)
        if adapters and lora.rank > 0:
            self._add_lora(self._rows(x), y2, lora)
        return y

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as [tokens, in] in the stacks' dtype (a view when it already is)."""
        x2 = x.reshape(-1, self.in_features)
        return x2 if x2.dtype == self.lora_a.dtype else x2.to(self.lora_a.dtype)

    def _apply_vectors(self, y: torch.Tensor, slots: SlotBatch) -> None:
        """y = o * y + beta per token, in place (y is the base layer's fresh output)."""
        y2 = y.view(-1, self.out_features)
        if self.output_scale is not None:
            y2.mul_(self.output_scale.index_select(0, slots.index))
        if self.bias_delta is not None:
            y2.add_(self.bias_delta.index_select(0, slots.index))

    def _subtract_merged(self, x2: torch.Tensor, y2: torch.Tensor, lora: LoraBatch) -> None:
        a = self.lora_a[lora.unmerge_slot, : lora.unmerge_rank]  # [r, in]
        b = self.lora_b[lora.unmerge_slot, : lora.unmerge_rank].to(y2.dtype)  # [r, out]
        if lora.unmerge_index is None:
            y2.addmm_(x2 @ a.t(), b, alpha=-1)
        else:
            rows = x2.index_select(0, lora.unmerge_index)
            y2.index_add_(0, lora.unmerge_index, (rows @ a.t()) @ b, alpha=-1)

    def _add_lora(self, x2: torch.Tensor, y2: torch.Tensor, lora: LoraBatch) -> None:
        if lora.single_slot is not None:
            # y += (x A^T) B^T for one adapter: two dense GEMMs at the adapter's own rank.
            a = self.lora_a[lora.single_slot].narrow(0, 0, lora.rank)  # [r, in]
            b = self.lora_b[lora.single_slot].narrow(0, 0, lora.rank)  # [r, out]
            y2.addmm_(x2 @ a.t(), b if b.dtype == y2.dtype else b.to(y2.dtype))
        elif lora.token_slots is not None:
            triton_lora.lora_(y2, x2, self.lora_a, self.lora_b, lora.rank, lora.token_slots)
        else:
            grouped_lora_(y2, x2, *self._group_weights(lora.rank, lora.groups), lora.groups)

    def _group_weights(self, rank: int, groups: LoraGroups) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunks' A and B; a decode batch's gathered copies are kept until the batch changes, so that a step
        reads the weights once instead of copying them and reading the copy."""
        kept = self._kept
        if kept is not None and kept[0] is groups:
            return kept[1], kept[2]
        a, b = grouped_weights(self.lora_a, self.lora_b, rank, groups)
        self._kept = (groups, a, b) if groups.keep and groups.slots is not None else None
        return a, b


def _leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.leaky_relu(x)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A bottleneck's non-linearity by AdapterHub's name (transformers' activations, plus leakyrelu)."""
    name = name.lower()
    return _leaky_relu if name == "leakyrelu" else ACT2FN[name]


# A bottleneck's input x = a h + b r by its input mode (see deltaserve.adapters.weights.BOTTLENECK_INPUTS).
_INPUT_READS = {"block_output": (True, False), "with_residual": (True, True), "residual": (False, True)}  # (h, r)


class BottleneckBank:
    """The bottleneck modules of every device slot at one site (one decoder layer's attention or output).

    Slot-major stacks, created when an adapter first places a bottleneck here:
      down [S, M, hidden], down_bias [S, M], up [S, M, hidden] (up transposed, scaling folded in),
      up_bias [S + 1, hidden] (last row zero, for tokens without an adapter)
    A forward gathers the blocks of the bottleneck slots it uses, projects every token through their down
    matrices at once, keeps each token's own block (torch.where on `owned`), and projects back through the stacked up
    matrices: no loop over adapters. Each slot reads x = a_s h + b_s r (h: the block's output, r: its
    input): Houlsby (1, 0), Pfeiffer (1, 1), parallel (0, 1).
    """

    def __init__(self, hidden_size: int) -> None:
        self.hidden_size = hidden_size
        self.down: torch.Tensor | None = None
        self.down_bias: torch.Tensor | None = None
        self.up: torch.Tensor | None = None
        self.up_bias: torch.Tensor | None = None
        self.reads: torch.Tensor | None = None  # [2, S, 1] bool: whether each slot reads h, and r
        self.activations: list[str | None] = []  # per slot, host side
        self.input_modes: list[str] = []  # per slot, host side

    def allocate(self, num_slots: int, max_size: int, dtype: torch.dtype, device: torch.device) -> None:
        if self.down is not None:
            return
        hidden = self.hidden_size
        self.activations = [None] * num_slots
        self.input_modes = ["block_output"] * num_slots
        self.reads = torch.zeros(2, num_slots, 1, dtype=torch.bool, device=device)
        self.reads[0] = True
        self.up_bias = torch.zeros(num_slots + 1, hidden, dtype=dtype, device=device)
        self.up = torch.zeros(num_slots, max_size, hidden, dtype=dtype, device=device)
        self.down_bias = torch.zeros(num_slots, max_size, dtype=dtype, device=device)
        self.down = torch.zeros(num_slots, max_size, hidden, dtype=dtype, device=device)  # last: delta() checks it

    def write_slot(self, slot: int, module: Bottleneck | None) -> None:
        if self.down is None:
            return
        for stack in (self.down[slot], self.down_bias[slot], self.up[slot], self.up_bias[slot]):
            stack.zero_()
        self.activations[slot] = None if module is None else module.activation
        self.input_modes[slot] = "block_output" if module is None else module.input_mode
        self.reads[:, slot, 0] = torch.tensor(_INPUT_READS[self.input_modes[slot]])
        if module is None:
            return
        size = module.down.shape[0]
        self.down[slot, :size].copy_(module.down)
        self.down_bias[slot, :size].copy_(module.down_bias)
        self.up[slot, :size].copy_(module.up.t())
        self.up_bias[slot].copy_(module.up_bias)

    def delta(self, h: torch.Tensor, r: torch.Tensor, slots: SlotBatch) -> torch.Tensor | None:
        """A(x) for each token's own slot (zero for tokens without one); None when no slot of the forward has a
        bottleneck here. h: the block's output, r: its input (the residual stream), both [..., hidden]. Only
        the forward's bottleneck slots are read (gathered when they are not all of them)."""
        if self.down is None or not any(self.activations[c] is not None for c in slots.column_list):
            return None
        num_slots, size, hidden = self.down.shape
        columns = slots.column_list
        gather = len(columns) < num_slots
        pick = (lambda t: t.index_select(0, slots.columns)) if gather else (lambda t: t)
        down, up, down_bias = pick(self.down), pick(self.up), pick(self.down_bias)  # [U, m, D], [U, m]
        down_t = down.view(-1, hidden).t()  # [D, U*m]
        z = (h.reshape(-1, hidden) @ down_t).view(-1, len(columns), size)
        if any(self.input_modes[c] != "block_output" for c in columns):
            reads = self.reads.index_select(1, slots.columns) if gather else self.reads  # [2, U, 1]
            from_residual = (r.reshape(-1, hidden) @ down_t).view_as(z)
            z = torch.where(reads[0], z, 0.0) + torch.where(reads[1], from_residual, 0.0)
        z = self._activate(z + down_bias, [self.activations[c] for c in columns])
        z = torch.where(slots.owned[:, :, None], z, 0.0)
        bias = self.up_bias.index_select(0, slots.index)
        return torch.addmm(bias, z.view(-1, len(columns) * size), up.view(-1, hidden)).view_as(h)

    @staticmethod
    def _activate(z: torch.Tensor, activations: list[str | None]) -> torch.Tensor:
        names = {name for name in activations if name is not None}
        if len(names) == 1:
            return activation(names.pop())(z)
        for name in names:  # columns with different non-linearities: one pass per non-linearity, not per adapter
            owned = torch.tensor([a == name for a in activations], device=z.device)
            z = torch.where(owned[None, :, None], activation(name)(z), z)
        return z


def build_slot_batch(
    token_slots: list[int],
    num_slots: int,
    vector_slots: set[int],
    bottleneck_slots: set[int],
    device: torch.device,
) -> SlotBatch | None:
    """Describe a forward's per-slot vectors and bottlenecks (padding and adapter-less tokens -> the identity
    row S); None when no token's slot has either."""
    active = {slot for slot in token_slots if slot >= 0}
    vectors = bool(active & vector_slots)
    columns = sorted(active & bottleneck_slots)
    if not vectors and not columns:
        return None
    index = torch.tensor([slot if slot >= 0 else num_slots for slot in token_slots], device=device)
    if not columns:
        return SlotBatch(index=index, vectors=vectors)
    position = {slot: c for c, slot in enumerate(columns)}
    owner = torch.tensor([position.get(slot, -1) for slot in token_slots])
    owned = (owner[:, None] == torch.arange(len(columns))[None, :]).to(device=device)
    return SlotBatch(
        index=index,
        vectors=vectors,
        columns=torch.tensor(columns, device=device),
        column_list=tuple(columns),
        owned=owned,
    )


def wrap_linear_layers(
    model: nn.Module, context: ForwardContext, own_contexts: dict[str, ForwardContext] | None = None
) -> dict[str, AdapterLinear]:
    """Replace every nn.Linear (bitsandbytes' 4/8-bit layers subclass it) with an AdapterLinear, once. Each reads
    `context`, or its own from `own_contexts` by module name (the LM head, which sees other positions than the
    body)."""
    own_contexts = own_contexts or {}
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    wrapped: dict[str, AdapterLinear] = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = AdapterLinear(module, own_contexts.get(name, context))
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped


PAD_SLOT = -2  # padding tokens of a prefill: no work at all


def build_lora_batch(
    token_slots: list[int],
    slot_ranks: list[int],
    device: torch.device,
    num_slots: int,
    merged_slot: int = -1,
    per_token: bool | None = None,
    keep: bool = False,
) -> LoraBatch | None:
    """Describe a forward's adapter tokens (slot -1 = no adapter, PAD_SLOT = padding); None when no
    token needs adapter work. `merged_slot` is the slot of the adapter merged into the base, if any.
    `per_token` picks the Triton per-token kernels (default: on CUDA with Triton, for small forwards). `keep`:
    the batch serves many forwards (a decode batch), so the layers keep weights gathered for it."""
    # Tokens whose slot has a low-rank part (prefix-only or IA3-only adapters have rank 0: no LoRA work).
    slot_rows: dict[int, list[int]] = {}
    for row, slot in enumerate(token_slots):
        if slot >= 0 and slot != merged_slot and slot_ranks[slot] > 0:
            slot_rows.setdefault(slot, []).append(row)
    correction = _merge_correction(token_slots, slot_ranks, device, merged_slot)
    if not slot_rows:
        return LoraBatch(rank=0, **correction) if correction else None
    rank = max(slot_ranks[slot] for slot in slot_rows)
    if len(slot_rows) == 1 and len(next(iter(slot_rows.values()))) == len(token_slots):
        return LoraBatch(rank=rank, single_slot=next(iter(slot_rows)), **correction)
    if per_token is None:
        per_token = device.type == "cuda" and len(token_slots) <= PER_TOKEN_MAX_TOKENS and triton_lora.available()
    if per_token:
        served = [slot if slot in slot_rows else -1 for slot in token_slots]
        return LoraBatch(rank=rank, token_slots=torch.tensor(served, device=device, dtype=torch.int32), **correction)
    groups = plan_groups(slot_rows, num_slots, device, len(token_slots), keep=keep)
    return LoraBatch(rank=rank, groups=groups, **correction)


def _merge_correction(token_slots: list[int], slot_ranks: list[int], device: torch.device, merged_slot: int) -> dict:
    """The LoraBatch fields that take a merged adapter's delta back out of every other real token."""
    unmerge = [i for i, slot in enumerate(token_slots) if slot != merged_slot and slot != PAD_SLOT]
    if merged_slot < 0 or not unmerge:
        return {}
    every = len(unmerge) == len(token_slots)
    return dict(
        unmerge_slot=merged_slot,
        unmerge_rank=slot_ranks[merged_slot],
        unmerge_index=None if every else torch.tensor(unmerge, device=device),
    )
