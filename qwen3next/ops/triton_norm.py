"""The RMS norms of ops/norm.py as one Triton kernel each: one read of x (and of the gate), one write.

As plain torch ops an RMSNorm is ~7 kernels over fp32 copies of x (upcast, square, mean, rsqrt, two products,
cast): at a 4K-token prefill of Qwen3-Next-80B-A3B ~0.1 ms per norm, against ~0.01 ms for the one pass here.
Used on the eager GPU path (prefill chunks); compiled decode layers keep the torch form, which Inductor fuses with
its neighbours. The rounding steps of the reference are kept: the normalised x is cast to x's dtype before a
plain or gated weight multiplies it, and the product is rounded once more before the gate (exact in fp32).

Reference: ops/norm.py; tests/test_triton_kernels.py runs both in Triton's CPU interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ZERO_CENTERED, PLAIN, GATED = 0, 1, 2


@triton.jit
def _rms_norm_kernel(X, Wt, G, Y, RES, SUM, n_rows, stride_x, stride_g, stride_gg, stride_gr, stride_y, stride_r,
                     stride_s, eps, N: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, MODE: tl.constexpr,
                     ADD: tl.constexpr, GG: tl.constexpr, GR: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if ADD:   # the residual sum first, rounded to x's dtype as `x + h` is, stored, then normed
        x = (x.to(tl.float32) + tl.load(RES + r64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32))
        x = x.to(SUM.dtype.element_ty)
        tl.store(SUM + r64 * stride_s + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    w = tl.load(Wt + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    inv = tl.rsqrt(tl.sum(x * x, 1) / N + eps)
    y = x * inv[:, None]
    if MODE == 0:
        y = y * (1.0 + w)
    else:
        y = w * y.to(Y.dtype.element_ty).to(tl.float32)
        if MODE == 2:
            # gate row i at [i // (GG GR), (i // GR) % GG, i % GR] of a [T, GG, GR, N] view (z inside qkvz rows)
            g_at = (r64 // (GG * GR)) * stride_g + ((r64 // GR) % GG) * stride_gg + (r64 % GR) * stride_gr
            z = tl.load(G + g_at + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = y.to(Y.dtype.element_ty).to(tl.float32) * (z * tl.sigmoid(z))
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _gate_rows(gate: torch.Tensor, n: int):
    """gate as rows of n -> (tensor, (row, group, in-group strides), (groups, rows per group)). A [..., G, R, n]
    view that does not flatten to rows (z inside in_proj_qkvz's rows, ops/gdn_projections.z_view) is read in place
    instead of copied."""
    try:
        flat = gate.view(-1, n)
        if flat.stride(1) == 1:
            return flat, (flat.stride(0), 0, 0), (1, 1)
    except RuntimeError:                  # the layout does not flatten to rows
        pass
    if gate.dim() >= 4 and gate.stride(-1) == 1:
        try:
            g4 = gate.view(-1, *gate.shape[-3:])
            return g4, (g4.stride(0), g4.stride(1), g4.stride(2)), (g4.shape[1], g4.shape[2])
        except RuntimeError:
            pass
    flat = gate.reshape(-1, n).contiguous()
    return flat, (flat.stride(0), 0, 0), (1, 1)


def _launch(x, weight, gate, eps: float, mode: int, residual=None):
    N = x.shape[-1]
    x2 = _rows(x, N)
    g2, g_strides, g_groups = _gate_rows(gate, N) if gate is not None else (x2, (x2.stride(0), 0, 0), (1, 1))
    if g2.numel() != x2.numel():
        raise ValueError(f"the gate has {g2.numel()} elements, x {x2.numel()}")
    r2 = _rows(residual, N) if residual is not None else x2
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if residual is not None else y
    BLOCK_N = triton.next_power_of_2(N)
    ROWS = max(1, min(64, 4096 // BLOCK_N))
    grid = (triton.cdiv(x2.shape[0], ROWS),)
    _rms_norm_kernel[grid](x2, weight, g2, y, r2, s, x2.shape[0], x2.stride(0), *g_strides, y.stride(0),
                           r2.stride(0), s.stride(0), eps, N=N, BLOCK_N=BLOCK_N, ROWS=ROWS, MODE=mode,
                           ADD=residual is not None, GG=g_groups[0], GR=g_groups[1],
                           num_warps=8 if BLOCK_N >= 2048 else 4)
    return y.view(x.shape) if residual is None else (s.view(x.shape), y.view(x.shape))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool) -> torch.Tensor:
    return _launch(x, weight, None, eps, ZERO_CENTERED if zero_centered else PLAIN)


def add_rms_norm(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool):
    """(x + h, rms_norm(x + h)) in one pass: a decoder layer's residual add and the norm after it (the add alone
    was a torch kernel over [tokens, hidden] in every layer of a prefill)."""
    return _launch(x, weight, None, eps, ZERO_CENTERED if zero_centered else PLAIN, residual=h)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, weight, gate, eps, GATED)
