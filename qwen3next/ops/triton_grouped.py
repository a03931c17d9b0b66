"""The elementwise steps around the grouped expert GEMMs (ops/cuda.experts_forward) as one Triton pass each.

At a 4K-token prefill of Qwen3-Next-80B-A3B the grouped path has 40,960 (token, expert) rows. In plain torch
the weighted SwiGLU between the GEMMs is three kernels with two bf16 intermediates, and the combine after them
gathers every row back to token order (a 168 MB copy) before an fp32 sum over each token's k rows. Here:

  weighted_swiglu  h [M, 2I] -> silu(h[:, :I]) * h[:, I:] * w[:, None]  (fp32 inside, rounded once)
  combine          y [M, H], inverse [N * k] -> out[t] = sum_j y[inverse[t * k + j]]  (fp32 sum, no gathered copy;
                   without inverse the rows are already in (token, slot) order, as ops/triton_experts.py writes them);
                   optionally + sigmoid(g) * shared expert + residual: the rest of the MoE block and the layer's
                   residual add (a sigmoid, a product and two sums over [tokens, hidden] as torch ops)

Reference: ops/cuda._weighted_swiglu and _combine; tests/test_triton_kernels.py compares them in Triton's CPU
interpreter, benchmarks/check_gpu.py on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .pdl import INTERPRETED


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
def _rounded(x, DT: tl.constexpr):
    """fp32 x rounded to the nearest value of DT (ties to even), kept in fp32. For bf16 by integer arithmetic: as
    casts (fp32 -> bf16 -> fp32) LLVM turned a product and the sum after it into one bf16 fma, rounding once where
    torch rounds twice (H100, Triton 3.6, 2026-11-24); finite inputs."""
    if DT == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    return x.to(DT).to(tl.float32)


@triton.jit
def _torch_sigmoid(x, PRECISE: tl.constexpr):
    """sigmoid as torch's CUDA kernel computes it: CUDA's expf and a correctly rounded division (tl.sigmoid uses
    an approximate division; whether that alone changes a bf16 gate was not measured apart from the fma above)."""
    if PRECISE:
        return tl.math.div_rn(1.0, 1.0 + libdevice.exp(-x))
    return tl.sigmoid(x)       # Triton's CPU interpreter has no libdevice


@triton.jit
def _combine_kernel(Y, INV, Out, SH, SG, RES, stride_y, stride_o, stride_sh, stride_sg, stride_r, K: tl.constexpr,
                    H: tl.constexpr, BLOCK_H: tl.constexpr, GATHER: tl.constexpr = True,
                    SHARED: tl.constexpr = False, RESIDUAL: tl.constexpr = False, PRECISE: tl.constexpr = True):
    t = tl.program_id(0)
    t64 = t.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for j in tl.static_range(K):
        if GATHER:
            row = tl.load(INV + t * K + j).to(tl.int64)
        else:                           # the rows are already in (token, slot) order
            row = t64 * K + j
        acc += tl.load(Y + row * stride_y + cols, mask=ok, other=0.0).to(tl.float32)
    dt = Out.dtype.element_ty
    out = _rounded(acc, dt)
    # then the MoE block's shared expert behind its sigmoid gate, and the residual, each step rounded as the torch
    # ops (y + sigmoid(g) * shared, then residual + that) round, so the result is theirs bit for bit
    if SHARED:
        gate = _rounded(_torch_sigmoid(tl.load(SG + t64 * stride_sg).to(tl.float32), PRECISE), dt)
        sh = _rounded(gate * tl.load(SH + t64 * stride_sh + cols, mask=ok, other=0.0).to(tl.float32), dt)
        out = _rounded(out + sh, dt)
    if RESIDUAL:
        out = _rounded(tl.load(RES + t64 * stride_r + cols, mask=ok, other=0.0).to(tl.float32) + out, dt)
    out = out.to(dt)
    tl.store(Out + t64 * stride_o + cols, out, mask=ok)


def weighted_swiglu(h: torch.Tensor, w: torch.Tensor, inter: int) -> torch.Tensor:
    M = h.shape[0]
    out = torch.empty(M, inter, dtype=h.dtype, device=h.device)
    ROWS, BLOCK_I = 16, min(256, triton.next_power_of_2(inter))
    _swiglu_kernel[(triton.cdiv(M, ROWS), triton.cdiv(inter, BLOCK_I))](
        h, w.contiguous(), out, M, h.stride(0), out.stride(0), I=inter, ROWS=ROWS, BLOCK_I=BLOCK_I, num_warps=4)
    return out


def combine(y: torch.Tensor, inverse: torch.Tensor | None, k: int, shared: torch.Tensor | None = None,
            shared_logit: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum_j y[inverse[t * k + j]], or sum_j y[t * k + j] with inverse None (rows in (token, slot) order);
    with `shared` [N, H] and `shared_logit` [N, 1], plus sigmoid(shared_logit) * shared (the shared expert behind
    its gate), and with `residual` [N, H], plus it: a MoE block and the residual add after it in one pass."""
    N, H = y.shape[0] // k, y.shape[-1]
    out = torch.empty(N, H, dtype=y.dtype, device=y.device)
    BLOCK_H = min(1024, triton.next_power_of_2(H))
    gather = inverse is not None
    sh = shared if shared is not None else y
    sg = shared_logit.reshape(N, -1) if shared is not None else y
    res = residual.reshape(N, H) if residual is not None else y
    for t in (sh, res):
        if t.stride(-1) != 1:
            raise ValueError("the shared expert's output and the residual must have unit stride in hidden")
    _combine_kernel[(N, triton.cdiv(H, BLOCK_H))](y, inverse.contiguous() if gather else y, out, sh, sg, res,
                                                   y.stride(0), out.stride(0), sh.stride(0), sg.stride(0),
                                                   res.stride(0), K=k, H=H, BLOCK_H=BLOCK_H, GATHER=gather,
                                                   SHARED=shared is not None, RESIDUAL=residual is not None,
                                                   PRECISE=not INTERPRETED, num_warps=4)
    return out
