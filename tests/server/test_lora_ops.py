"""The mixed-adapter LoRA paths against the per-token definition, on random inputs.

Each case builds a real AdapterLinear over an nn.Linear, writes random adapters of different ranks into its
device slots, runs one forward through the path the batch shape selects (or a forced one), and compares with
base(x) + (x A_s^T) B_s^T computed one token at a time.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from deltaserve.adapters import ModuleDelta
from deltaserve.server.kernels.lora_ops import plan_groups, reference_lora
from deltaserve.server.model.layers import PAD_SLOT, AdapterLinear, ForwardContext, build_lora_batch
from torch import nn

NUM_SLOTS, MAX_RANK = 8, 16
SLOT_RANKS = [16, 4, 1, 0, 8, 16, 3, 0]  # rank 0: an empty slot


def make_layer(in_features: int, out_features: int, seed: int, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=True).to(device, dtype)
    context = ForwardContext()
    layer = AdapterLinear(base, context)
    for slot, rank in enumerate(SLOT_RANKS):
        if rank == 0:
            continue
        delta = ModuleDelta(
            lora_a=torch.randn(rank, in_features, dtype=dtype, device=device) * 0.2,
            lora_b_scaled=torch.randn(out_features, rank, dtype=dtype, device=device) * 0.2,
        )
        layer.allocate(delta, NUM_SLOTS, MAX_RANK, dtype, torch.device(device))
        layer.write_slot(slot, delta)
    return layer, context


def expected(layer: AdapterLinear, x: torch.Tensor, token_slots: list[int], merged_slot: int = -1) -> torch.Tensor:
    x2 = x.reshape(-1, layer.in_features)
    served = [s if s >= 0 and s != merged_slot else -1 for s in token_slots]
    y = layer.base(x2) + reference_lora(x2, layer.lora_a, layer.lora_b, served)
    if merged_slot >= 0:  # the base holds the merged delta, which only the merged adapter's tokens keep
        keep = [merged_slot if s in (merged_slot, PAD_SLOT) else -1 for s in token_slots]
        y = y + reference_lora(x2, layer.lora_a, layer.lora_b, keep)
    return y.view(*x.shape[:-1], -1)


def run(layer, context, x, token_slots, merged_slot=-1, **plan):
    context.lora = build_lora_batch(
        token_slots, SLOT_RANKS, x.device, NUM_SLOTS, merged_slot=merged_slot, per_token=plan.get("per_token")
    )
    if "chunk_size" in plan:  # force the grouping (a skewed split, or one token per chunk like BGMV)
        rows: dict[int, list[int]] = {}
        for row, slot in enumerate(token_slots):
            if slot >= 0 and SLOT_RANKS[slot] > 0:
                rows.setdefault(slot, []).append(row)
        groups = plan_groups(rows, NUM_SLOTS, x.device, len(token_slots), chunk_size=plan["chunk_size"])
        context.lora = type(context.lora)(rank=context.lora.rank, groups=groups)
    try:
        return layer(x), context.lora
    finally:
        context.lora = None


CASES = {
    "decode, every slot, two rows each": [s for s in range(NUM_SLOTS) for _ in range(2)],
    "decode, base rows between adapters": [0, -1, 5, -1, 1, 1, -1, 6],
    "one row": [2],
    "one row of a rank-1 adapter beside the base": [-1, 2],
    "skewed: one adapter owns most rows": [0] * 13 + [4, 6, 1],
    "few of many slots": [5, 6, 5, 5],
    "rows of empty slots only": [3, 7, -1],
    "prefill with padding": [0] * 5 + [PAD_SLOT] * 3 + [4] * 8 + [-1] * 6 + [PAD_SLOT] * 2,
}


@pytest.mark.parametrize("token_slots", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize(("in_features", "out_features"), [(48, 40), (33, 129)])
def test_grouped_path_equals_the_definition(token_slots, in_features, out_features):
    layer, context = make_layer(in_features, out_features, seed=len(token_slots))
    x = torch.randn(len(token_slots), in_features)
    y, batch = run(layer, context, x, token_slots)
    torch.testing.assert_close(y, expected(layer, x, token_slots), rtol=1e-5, atol=1e-5)
    if batch is not None and batch.rank > 0:
        one_adapter = len(set(token_slots)) == 1
        assert (batch.single_slot is not None) == one_adapter and (batch.groups is not None) != one_adapter


SERVED_SLOTS = [slot for slot, rank in enumerate(SLOT_RANKS) if rank > 0]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}  # rtol = atol, by dtype


def spread(kind: str, tokens: int, generator: torch.Generator) -> list[int]:
    """How rows spread over the adapters (and the base, -1): Punica's distributions."""
    choices = [-1, *SERVED_SLOTS]
    if kind == "distinct":
        return [choices[i % len(choices)] for i in range(tokens)]
    if kind == "uniform":
        return [choices[i] for i in torch.randint(len(choices), (tokens,), generator=generator).tolist()]
    if kind == "zipf":
        weights = torch.tensor([1 / (k + 1) ** 1.5 for k in range(len(choices))])
        return [choices[i] for i in torch.multinomial(weights, tokens, True, generator=generator).tolist()]
    if kind == "identical":
        return [SERVED_SLOTS[1]] * tokens
    return [SERVED_SLOTS[0]] * (tokens - tokens // 5) + [SERVED_SLOTS[-1]] * (tokens // 5)  # skewed


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("kind", ["distinct", "uniform", "zipf", "identical", "skewed"])
def test_spreads_sizes_and_dtypes(kind, tokens, dtype):
    generator = torch.Generator().manual_seed(tokens)
    token_slots = spread(kind, tokens, generator)
    layer, context = make_layer(40, 56, seed=tokens, dtype=dtype)
    x = torch.randn(tokens, 40, generator=generator).to(dtype)
    y, _ = run(layer, context, x, token_slots)
    x64, base = x.double(), layer.base
    served = [slot if slot >= 0 else -1 for slot in token_slots]
    reference = torch.nn.functional.linear(x64, base.weight.double(), base.bias.double()) + reference_lora(
        x64, layer.lora_a.double(), layer.lora_b.double(), served
    )
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(y.double(), reference, rtol=tolerance, atol=tolerance)


def test_all_tokens_of_one_adapter_use_the_dense_path():
    layer, context = make_layer(40, 24, seed=1)
    x = torch.randn(3, 7, 40)  # a prefill: three rows of seven tokens
    token_slots = [5] * 21
    y, batch = run(layer, context, x, token_slots)
    assert batch.single_slot == 5
    torch.testing.assert_close(y, expected(layer, x, token_slots), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 16])
def test_any_chunking_gives_the_same_result(chunk_size):
    layer, context = make_layer(40, 24, seed=2)
    token_slots = [0] * 9 + [1, 4, -1, 5, 5, 6, 2]
    x = torch.randn(len(token_slots), 40)
    y, _ = run(layer, context, x, token_slots, chunk_size=chunk_size)
    torch.testing.assert_close(y, expected(layer, x, token_slots), rtol=1e-5, atol=1e-5)


def test_merged_adapter_is_taken_back_out_of_other_rows():
    layer, context = make_layer(40, 24, seed=3)
    merged = 0
    token_slots = [0, 0, -1, 4, 5, PAD_SLOT, 0, 1]
    x = torch.randn(len(token_slots), 40)
    reference = expected(layer, x, token_slots, merged_slot=merged)  # from the unmerged weights
    weight = layer.base.weight.data
    original = weight.clone()
    weight += layer.lora_b[merged].t() @ layer.lora_a[merged]  # what merging the slot-0 adapter does
    try:
        y, _ = run(layer, context, x, token_slots, merged_slot=merged)
    finally:
        weight.copy_(original)
    rows = [i for i, s in enumerate(token_slots) if s != PAD_SLOT]
    torch.testing.assert_close(y[rows], reference[rows], rtol=1e-5, atol=1e-5)


def test_plan_reads_the_stacks_in_place_when_most_slots_are_used():
    rows = {slot: [slot] for slot in range(6)}
    groups = plan_groups(rows, NUM_SLOTS, torch.device("cpu"), 6)
    assert groups.slots is None and groups.size == 1  # slots 6 and 7 become all-padding chunks
    assert groups.padding is not None and groups.padding.view(-1).tolist() == [False] * 6 + [True] * 2
    few = plan_groups({5: [0, 1], 6: [2]}, NUM_SLOTS, torch.device("cpu"), 3)
    assert few.slots.tolist() == [5, 6] and few.size == 2


@pytest.mark.parametrize(
    ("token_slots", "path"),
    [
        ([1, 1, 5, 5, 6, 6], "in place"),  # the tokens are the chunks, in order (as the engine orders a decode)
        ([0, -1, 5, -1, 1, 1, -1, 6], "gather"),  # base tokens read a zeroed padding entry
        ([6, 5, 6, 5], "gather"),  # every token has an entry, out of order
        ([5, 5, -1, 6, 6], "index_add"),  # a base token and no padding entry to point it at
    ],
)
def test_each_way_back_to_the_tokens_equals_the_definition(token_slots, path):
    layer, context = make_layer(40, 24, seed=5)
    x = torch.randn(len(token_slots), 40)
    y, batch = run(layer, context, x, token_slots)
    groups = batch.groups
    taken = "in place" if groups.identity else ("gather" if groups.inverse is not None else "index_add")
    assert taken == path
    torch.testing.assert_close(y, expected(layer, x, token_slots), rtol=1e-5, atol=1e-5)


def test_a_decode_batch_keeps_its_gathered_weights_until_a_slot_is_written():
    layer, context = make_layer(40, 24, seed=6)
    token_slots = [5, 6, 5]  # few of many slots: the chunks' weights are gathered copies
    x = torch.randn(len(token_slots), 40)
    context.lora = build_lora_batch(token_slots, SLOT_RANKS, x.device, NUM_SLOTS, keep=True)
    try:
        first = layer(x)
        kept = layer._kept
        assert kept is not None and kept[0] is context.lora.groups
        assert torch.equal(layer(x), first) and layer._kept is kept  # the next step reuses the copies
        fresh = ModuleDelta(lora_a=torch.randn(SLOT_RANKS[6], 40), lora_b_scaled=torch.randn(24, SLOT_RANKS[6]))
        layer.write_slot(6, fresh)
        assert layer._kept is None  # a write drops them: the next forward reads the new weights
        torch.testing.assert_close(layer(x), expected(layer, x, token_slots), rtol=1e-5, atol=1e-5)
    finally:
        context.lora = None


def test_plan_cuts_a_skewed_prefill_into_balanced_chunks():
    rows = {0: list(range(40)), 3: [40], 4: [41]}
    groups = plan_groups(rows, NUM_SLOTS, torch.device("cpu"), 42)
    assert groups.size == 14  # ceil(42 / 3): 3 chunks of slot 0, one each of slots 3 and 4
    assert groups.slots.tolist() == [0, 0, 0, 3, 4]
    assert (~groups.padding).sum().item() == 42


def test_plan_pads_a_skewed_decode_batch_rather_than_reading_a_slot_twice():
    rows = {0: list(range(14)), 3: [14], 4: [15]}  # 14 rows: cutting them would read slot 0's weights again
    groups = plan_groups(rows, NUM_SLOTS, torch.device("cpu"), 16)
    assert groups.size == 14 and groups.slots.tolist() == [0, 3, 4]
    assert (~groups.padding).sum().item() == 16


def test_an_overflowing_adapter_does_not_leak_into_other_rows():
    layer, context = make_layer(40, 24, seed=4)
    layer.lora_a[4, :8] = 3e38  # finite weights whose products overflow
    token_slots = [4, 0, 0, 0, -1, 1]  # slot 4's chunk is padded with a repeat of its own row
    x = torch.randn(len(token_slots), 40)
    y, _ = run(layer, context, x, token_slots)
    good = [1, 2, 3, 4, 5]
    assert torch.isfinite(y[good]).all()
    torch.testing.assert_close(y[good], expected(layer, x, token_slots)[good], rtol=1e-5, atol=1e-5)


TRITON = importlib.util.find_spec("triton") is not None

INTERPRETER_CHECK = textwrap.dedent(
    """
    import torch
    from deltaserve.server.kernels import triton_lora
    from deltaserve.server.kernels.lora_ops import reference_lora

    torch.manual_seed(0)
    for tokens, in_features, out_features, rank, slots in [(16, 48, 40, 16, 8), (5, 33, 129, 3, 4), (1, 64, 20, 8, 2)]:
        a = torch.zeros(slots, 16, in_features)
        b = torch.zeros(slots, 16, out_features)
        a[:, :rank] = torch.randn(slots, rank, in_features)
        b[:, :rank] = torch.randn(slots, rank, out_features)
        token_slots = torch.randint(-1, slots, (tokens,), dtype=torch.int32)
        x = torch.randn(tokens, in_features)
        y = torch.randn(tokens, out_features)
        want = y + reference_lora(x, a, b, token_slots.tolist())
        triton_lora.lora_(y, x, a, b, rank, token_slots, block_k=16, block_n=32)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
    print("ok")
    """
)


@pytest.mark.skipif(not TRITON, reason="Triton is not installed (pip install triton runs the kernels interpreted)")
def test_triton_kernels_in_the_interpreter():
    """The per-token kernels' indexing, run by Triton's CPU interpreter (it must be enabled before import)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", INTERPRETER_CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_kernels_equal_the_grouped_path_on_cuda(dtype):
    from deltaserve.server.kernels import triton_lora

    if not triton_lora.available():
        pytest.skip("Triton is not installed")
    layer, context = make_layer(256, 384, seed=5, dtype=dtype, device="cuda")
    token_slots = [s for s in range(NUM_SLOTS) for _ in range(4)] + [-1, -1, 2]
    x = torch.randn(len(token_slots), 256, device="cuda", dtype=dtype)
    per_token, batch = run(layer, context, x, token_slots, per_token=True)
    assert batch.token_slots is not None
    grouped, batch = run(layer, context, x, token_slots, per_token=False)
    assert batch.groups is not None
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(per_token, grouped, **tolerance)
    torch.testing.assert_close(per_token.float(), expected(layer, x, token_slots).float(), **tolerance)
