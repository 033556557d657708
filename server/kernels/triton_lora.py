"""Per-token LoRA kernels in Triton (BGMV-style, as in Punica): every token reads its own slot's rows of the
slot-major stacks, so a decode step over many adapters needs no grouping and no copy of any weight.

  shrink: z[t, :r] = x[t] @ A[s_t, :r]^T          (fp32 accumulation)
  expand: y[t, n]  += z[t, :r] @ B[s_t, :r, n]     (in place, y's dtype)

Tokens with slot -1 are skipped. Triton is optional: `available()` says whether these kernels can run on a
CUDA device; every other case uses the grouped torch path of `deltaserve.server.kernels.lora_ops`. The tests run the
kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1), where `lora_` also accepts CPU tensors.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: no Triton, so no per-token kernels
    triton = None


@functools.cache
def available() -> bool:
    """Triton is installed and a CUDA device is present (the kernels are never picked otherwise)."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _shrink_kernel(
        x_ptr,
        a_ptr,
        z_ptr,
        slots_ptr,
        in_features,
        rank,
        stride_x,
        stride_a_slot,
        stride_a_rank,
        stride_z,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        token = tl.program_id(0)
        slot = tl.load(slots_ptr + token)
        # A token without a slot reads nothing: its bounds shrink to zero (and its z row is all zeros).
        in_limit = tl.where(slot >= 0, in_features, 0)
        slot = tl.maximum(slot, 0).to(tl.int64)
        ranks = tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start in range(0, in_features, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + token * stride_x + cols, mask=cols < in_limit, other=0.0)
            a_mask = (ranks[:, None] < rank) & (cols[None, :] < in_limit)
            a = tl.load(
                a_ptr + slot * stride_a_slot + ranks[:, None] * stride_a_rank + cols[None, :], mask=a_mask, other=0.0
            )
            acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(z_ptr + token * stride_z + ranks, acc, mask=ranks < rank)

    @triton.jit
    def _expand_kernel(
        z_ptr,
        b_ptr,
        y_ptr,
        slots_ptr,
        out_features,
        rank,
        stride_z,
        stride_b_slot,
        stride_b_rank,
        stride_y,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        token = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        slot = tl.load(slots_ptr + token)
        out_limit = tl.where(slot >= 0, out_features, 0)  # a token without a slot writes nothing
        slot = tl.maximum(slot, 0).to(tl.int64)
        ranks = tl.arange(0, BLOCK_R)
        z = tl.load(z_ptr + token * stride_z + ranks, mask=ranks < rank, other=0.0)
        b_mask = (ranks[:, None] < rank) & (cols[None, :] < out_limit)
        b_rows = b_ptr + slot * stride_b_slot + ranks[:, None] * stride_b_rank
        b = tl.load(b_rows + cols[None, :], mask=b_mask, other=0.0)
        delta = tl.sum(b.to(tl.float32) * z[:, None], axis=0)
        out_mask = cols < out_limit
        y = tl.load(y_ptr + token * stride_y + cols, mask=out_mask, other=0.0)
        tl.store(y_ptr + token * stride_y + cols, (y.to(tl.float32) + delta).to(y.dtype), mask=out_mask)


def lora_(
    y2: torch.Tensor,
    x2: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    rank: int,
    token_slots: torch.Tensor,
    block_k: int = 64,
    block_n: int = 128,
) -> None:
    """y2 [N, out] += (x2[t] A_s^T) B_s^T for each token t with slot s = token_slots[t] >= 0, in place.

    lora_a [S, R, in], lora_b [S, R, out] (slot-major stacks; rows are contiguous), x2 [N, in], token_slots
    [N] int32. Only the first `rank` ranks are read."""
    if triton is None:
        raise RuntimeError("the per-token LoRA kernels need Triton")
    tokens = x2.shape[0]
    in_features, out_features = lora_a.shape[-1], lora_b.shape[-1]
    if y2.stride(1) != 1:
        raise ValueError("the output's rows must be contiguous")
    x2 = x2.contiguous()
    block_r = max(16, triton.next_power_of_2(rank))
    z = torch.empty(tokens, rank, dtype=torch.float32, device=x2.device)
    _shrink_kernel[(tokens,)](
        x2,
        lora_a,
        z,
        token_slots,
        in_features,
        rank,
        x2.stride(0),
        lora_a.stride(0),
        lora_a.stride(1),
        z.stride(0),
        BLOCK_R=block_r,
        BLOCK_K=block_k,
    )
    grid = (tokens, triton.cdiv(out_features, block_n))
    _expand_kernel[grid](
        z,
        lora_b,
        y2,
        token_slots,
        out_features,
        rank,
        z.stride(0),
        lora_b.stride(0),
        lora_b.stride(1),
        y2.stride(0),
        BLOCK_R=block_r,
        BLOCK_N=block_n,
    )
