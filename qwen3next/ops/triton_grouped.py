"""The elementwise steps around the grouped expert GEMMs (ops/cuda.experts_forward) as one Triton pass each.

At a 4K-token prefill of Qwen3-Next-80B-A3B the grouped path has 40,960 (token, expert) rows. In plain torch
the weighted SwiGLU between the GEMMs is three kernels with two bf16 intermediates, and the combine after them
gathers every row back to token order (a 168 MB copy) before an fp32 sum over each token's k rows. Here:

  weighted_swiglu  h [M, 2I] -> silu(h[:, :I]) * h[:, I:] * w[:, None]  (fp32 inside, rounded once)
  combine          y [M, H], inverse [N * k] -> out[t] = sum_j y[inverse[t * k + j]]  (fp32 sum, no gathered copy;
                   without inverse the rows are already in (token, slot) order, as ops/triton_experts.py writes them)

Reference: ops/cuda._weighted_swiglu and _combine; tests/test_triton_kernels.py compares them in Triton's CPU
interpreter, benchmarks/check_gpu.py on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_kernel(Hin, Wt, Out, M, stride_h, stride_o, I: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_I: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < M)[:, None] & (cols < I)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    g = tl.load(Hin + r64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(Hin + r64 * stride_h + I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(Wt + rows, mask=rows < M, other=0.0).to(tl.float32)[:, None]
    y = g * tl.sigmoid(g) * u * w
    tl.store(Out + r64 * stride_o + cols[None, :], y.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(Y, INV, Out, stride_y, stride_o, K: tl.constexpr, H: tl.constexpr, BLOCK_H: tl.constexpr,
                    GATHER: tl.constexpr = True):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_H], tl.float32)
    for j in tl.static_range(K):
        if GATHER:
            row = tl.load(INV + t * K + j).to(tl.int64)
        else:                           # the rows are already in (token, slot) order
            row = t.to(tl.int64) * K + j
        acc += tl.load(Y + row * stride_y + cols, mask=cols < H, other=0.0).to(tl.float32)
    tl.store(Out + t.to(tl.int64) * stride_o + cols, acc.to(Out.dtype.element_ty), mask=cols < H)


def weighted_swiglu(h: torch.Tensor, w: torch.Tensor, inter: int) -> torch.Tensor:
    M = h.shape[0]
    out = torch.empty(M, inter, dtype=h.dtype, device=h.device)
    ROWS, BLOCK_I = 16, min(256, triton.next_power_of_2(inter))
    _swiglu_kernel[(triton.cdiv(M, ROWS), triton.cdiv(inter, BLOCK_I))](
        h, w.contiguous(), out, M, h.stride(0), out.stride(0), I=inter, ROWS=ROWS, BLOCK_I=BLOCK_I, num_warps=4)
    return out


def combine(y: torch.Tensor, inverse: torch.Tensor | None, k: int) -> torch.Tensor:
    """out[t] = sum_j y[inverse[t * k + j]], or sum_j y[t * k + j] with inverse None (rows in (token, slot) order)."""
    N, H = y.shape[0] // k, y.shape[-1]
    out = torch.empty(N, H, dtype=y.dtype, device=y.device)
    BLOCK_H = min(1024, triton.next_power_of_2(H))
    gather = inverse is not None
    _combine_kernel[(N, triton.cdiv(H, BLOCK_H))](y, inverse.contiguous() if gather else y, out, y.stride(0),
                                                   out.stride(0), K=k, H=H, BLOCK_H=BLOCK_H, GATHER=gather,
                                                   num_warps=4)
    return out
