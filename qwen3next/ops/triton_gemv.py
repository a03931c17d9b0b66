"""One-row linear layer (y = x Wᵀ for a single token) as a Triton matrix-vector product.

A batch-1 decode step multiplies one row by every projection matrix. cuBLAS picks GEMM tiles built for many rows:
on the H100 (benchmarks/tune_decode_kernels.py, 80B-A3B shapes, in CUDA graphs, 2026-11-23) its one-row products
reached 0.13-0.85 of the copy bandwidth (router 5.5 us, k/v_proj 5.4 us, out_proj 10.9 us) where this kernel, two
output rows per program and 2048 columns per step, reached 0.32-0.93 (2.2, 2.1, 7.7 us): ~11 us per layer.

Reference: torch.nn.functional.linear; tests/test_triton_kernels.py compares them in Triton's interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(X, W, Y, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)      # reduced once at the end: no shuffles inside the loop
    for k0 in range(0, K, BLOCK_K):
        c = k0 + cols
        c_ok = c < K
        x = tl.load(X + c, mask=c_ok, other=0.0).to(tl.float32)
        w = tl.load(W + rows[:, None].to(tl.int64) * stride_w + c[None, :], mask=row_ok[:, None] & c_ok[None, :],
                    other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(Y + rows, tl.sum(acc, 1).to(Y.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] holding one row; weight [N, K] -> [..., N] in x's dtype (fp32 accumulation)."""
    K = x.shape[-1]
    N = weight.shape[0]
    if x.numel() != K or weight.shape[1] != K:
        raise ValueError(f"gemv: wants one row of {weight.shape[1]} features, got x of shape {tuple(x.shape)}")
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    xr = x.reshape(K).contiguous()
    y = torch.empty(x.shape[:-1] + (N,), device=x.device, dtype=x.dtype)
    BLOCK_N, BLOCK_K = 2, min(2048, triton.next_power_of_2(K))
    _gemv_kernel[(triton.cdiv(N, BLOCK_N),)](xr, weight, y, N, K, weight.stride(0), BLOCK_N=BLOCK_N,
                                             BLOCK_K=BLOCK_K, num_warps=8)
    return y
