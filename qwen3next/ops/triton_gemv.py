"""One-row linear layer (y = x Wᵀ for a single token) as a Triton matrix-vector product.

A batch-1 decode step multiplies one row by every projection matrix. cuBLAS picks GEMM tiles built for many rows:
on the H100 (benchmarks/tune_decode_kernels.py, 80B-A3B shapes, in CUDA graphs, 2026-11-23) its one-row products
reached 0.13-0.85 of the copy bandwidth (router 5.5 us, k/v_proj 5.4 us, out_proj 10.9 us) where this kernel, two
output rows per program and 2048 columns per step, reached 0.32-0.93 (2.2, 2.1, 7.7 us): ~11 us per layer.

gemv_multi runs up to three projections of the same row in one launch (attention's q, k, v: 16.1 against 18.5 us
as three launches on the H100; GDN's qkvz and ba: no gain, 20.4 us either way).

Reference: torch.nn.functional.linear; tests/test_triton_kernels.py compares them in Triton's interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_pdl, wait_for_predecessor


@triton.jit
def _rows_dot_x(X, W, Y, row0, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Y[row0 : row0 + BLOCK_N] = W[those rows] @ X (rows past N masked). The first block of weights is read
    before waiting for the kernel that writes X (ops/pdl.py): with K <= BLOCK_K that is all of them."""
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = W + rows[:, None].to(tl.int64) * stride_w
    cols = tl.arange(0, BLOCK_K)
    c_ok = cols < K
    w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
    wait_for_predecessor(PDL)
    x = tl.load(X + cols, mask=c_ok, other=0.0).to(tl.float32)
    acc = w.to(tl.float32) * x[None, :]                  # reduced once at the end: no shuffles inside the loop
    for k0 in range(BLOCK_K, K, BLOCK_K):
        c = k0 + cols
        c_ok = c < K
        x = tl.load(X + c, mask=c_ok, other=0.0).to(tl.float32)
        w = tl.load(w_rows + c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(Y + rows, tl.sum(acc, 1).to(Y.dtype.element_ty), mask=row_ok)


@triton.jit
def _gemv_kernel(X, W, Y, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    _rows_dot_x(X, W, Y, tl.program_id(0) * BLOCK_N, N, K, stride_w, BLOCK_N, BLOCK_K, PDL)


@triton.jit
def _gemv3_kernel(X, W1, W2, W3, Y, N1, N2, N3, K, stride_w1, stride_w2, stride_w3, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Up to three matrices that share the input row in one launch: the programs are dealt to W1's row blocks,
    then W2's, then W3's, and Y = [W1 x | W2 x | W3 x]."""
    pid = tl.program_id(0)
    b1 = tl.cdiv(N1, BLOCK_N)
    b2 = tl.cdiv(N2, BLOCK_N)
    if pid < b1:
        _rows_dot_x(X, W1, Y, pid * BLOCK_N, N1, K, stride_w1, BLOCK_N, BLOCK_K, PDL)
    elif pid < b1 + b2:
        _rows_dot_x(X, W2, Y + N1, (pid - b1) * BLOCK_N, N2, K, stride_w2, BLOCK_N, BLOCK_K, PDL)
    else:
        _rows_dot_x(X, W3, Y + N1 + N2, (pid - b1 - b2) * BLOCK_N, N3, K, stride_w3, BLOCK_N, BLOCK_K, PDL)


def _one_row(x: torch.Tensor, weights) -> tuple[torch.Tensor, list[torch.Tensor]]:
    K = x.shape[-1]
    for w in weights:
        if x.numel() != K or w.shape[1] != K:
            raise ValueError(f"gemv: wants one row of {w.shape[1]} features, got x of shape {tuple(x.shape)}")
    return x.reshape(K).contiguous(), [w if w.stride(1) == 1 else w.contiguous() for w in weights]


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] holding one row; weight [N, K] -> [..., N] in x's dtype (fp32 accumulation)."""
    K, N = x.shape[-1], weight.shape[0]
    xr, (weight,) = _one_row(x, [weight])
    y = torch.empty(x.shape[:-1] + (N,), device=x.device, dtype=x.dtype)
    BLOCK_N, BLOCK_K = 2, min(2048, triton.next_power_of_2(K))
    pdl = launch_pdl(x)
    _gemv_kernel[(triton.cdiv(N, BLOCK_N),)](xr, weight, y, N, K, weight.stride(0), BLOCK_N=BLOCK_N,
                                             BLOCK_K=BLOCK_K, PDL=pdl, num_warps=8, launch_pdl=pdl)
    return y


def gemv_multi(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """x [..., K] holding one row; 1-3 weights [N_i, K] -> [..., sum N_i] = the products side by side, in one
    launch (a layer's projections of the same input: GDN's qkvz and ba, attention's q, k and v)."""
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"gemv_multi takes 1 to 3 weights, got {len(weights)}")
    K = x.shape[-1]
    xr, ws = _one_row(x, weights)
    ns = [w.shape[0] for w in ws] + [0] * (3 - len(ws))
    ws = ws + [ws[0]] * (3 - len(ws))                   # unused slots: never read (no programs)
    y = torch.empty(x.shape[:-1] + (sum(ns),), device=x.device, dtype=x.dtype)
    BLOCK_N, BLOCK_K = 2, min(2048, triton.next_power_of_2(K))
    grid = (sum(triton.cdiv(n, BLOCK_N) for n in ns),)
    pdl = launch_pdl(x)
    _gemv3_kernel[grid](xr, *ws, y, *ns, K, *(w.stride(0) for w in ws), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                        PDL=pdl, num_warps=8, launch_pdl=pdl)
    return y
