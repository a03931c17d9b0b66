"""Attention's input preparation in Triton: the rotary table of a step, and q/k norm + rotation + KV write in one
pass.

rotary_cos_sin: cos and sin of positions x inverse frequencies as one kernel. In torch it is nine (a cast, a
product, a concat, cos, sin, two scalings, two casts): ~12 us at the head of every batch-1 decode step on an H100
(benchmarks/profile_gpu.py --timeline, 2026-11-24), the same again in each MTP draft. Triton's cos and sin are
CUDA's precise ones (libdevice's __nv_cosf / __nv_sinf, no .approx instructions in the PTX), as torch's are.

qk_norm_rope: per head, q and k RMS-normed (zero-centred or plain weight, rounded to the input dtype as the
reference rounds), the first R dims rotated (rotate-half), and, given the KV pages, the new keys and values stored
at their slots. Grid (token block, head), heads ordered q, k, v (v only copied to its pages). As torch ops this
was two norms, ~12 elementwise kernels over q and k (slices, a negation, two concats, products, sums) and the
KV write: in a batch-1 decode step seven kernels between the q/k/v projection and the attention (Inductor fused
the rest), ~6 us per attention layer; in a 32K-token prefill ~2.5 ms of concats and products per attention layer.
The rotation is computed in fp32 from the rounded normed values and rounded once (as Inductor's fused kernels do;
the eager reference rounds after each product: they differ by at most an ulp of the output dtype).

References: ops/rope.py (rotary_cos_sin, qk_norm_rope) and ops/attention.write_kv; benchmarks/check_gpu.py
compares them on the GPU, tests/triton_interpreter_checks.py in Triton's CPU interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_pdl, wait_for_predecessor


# token counts are not specialised on (each new class, e.g. divisible by 16 or not, would compile the kernel again
# inside a user's request: ops/triton_experts.py)
@triton.jit(do_not_specialize=["N"])
def _rotary_kernel(POS, INV_FREQ, COS, SIN, N, scaling, stride_c, stride_s, HALF: tl.constexpr,
                   BHALF: tl.constexpr, BT: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    j = tl.arange(0, BHALF)
    ok = (t < N)[:, None] & (j < HALF)[None, :]
    pos = tl.load(POS + t, mask=t < N, other=0).to(tl.float32)
    freqs = pos[:, None] * tl.load(INV_FREQ + j, mask=j < HALF, other=0.0)[None, :]
    c = (tl.cos(freqs) * scaling).to(COS.dtype.element_ty)
    s = (tl.sin(freqs) * scaling).to(SIN.dtype.element_ty)
    t64 = t.to(tl.int64)[:, None]
    for half in tl.static_range(2):            # the table is [freqs | freqs]: each value stored twice
        tl.store(COS + t64 * stride_c + half * HALF + j[None, :], c, mask=ok)
        tl.store(SIN + t64 * stride_s + half * HALF + j[None, :], s, mask=ok)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype):
    """Same contract as ops/rope.rotary_cos_sin: positions [..., T] -> cos, sin [..., T, 2 * len(inv_freq)]."""
    half = inv_freq.numel()
    pos = positions.reshape(-1)
    N = pos.numel()
    cos = torch.empty(N, 2 * half, device=positions.device, dtype=dtype)
    sin = torch.empty_like(cos)
    if N:
        BT = 16
        _rotary_kernel[(triton.cdiv(N, BT),)](pos, inv_freq, cos, sin, N, float(scaling), cos.stride(0),
                                              sin.stride(0), HALF=half, BHALF=triton.next_power_of_2(half), BT=BT,
                                              num_warps=1 if N <= BT else 4)
    shape = (*positions.shape, 2 * half)
    return cos.view(shape), sin.view(shape)


@triton.jit
def _normed(X, rows, cols, ok, inv, W, ZERO_CENTERED: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Columns `cols` of the rows at X (fp32), times 1/rms `inv`, weighted as ops/norm.rms_norm does, rounded."""
    x = tl.load(X + rows[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32) * inv[:, None]
    w = tl.load(W + cols).to(tl.float32)[None, :]
    if ZERO_CENTERED:
        return (x * (1.0 + w)).to(OUT_DTYPE).to(tl.float32)
    return (w * x.to(OUT_DTYPE).to(tl.float32)).to(OUT_DTYPE).to(tl.float32)


@triton.jit(do_not_specialize=["N"])
def _qk_norm_rope_kernel(Q, K, V, WQ, WK, COS, SIN, QO, KO, KP, VP, SLOTS, N, eps,
                         sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sc_t, ss_t, sqo_t, sqo_h, sko_t, sko_h, sp_r, sp_h,
                         HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
                         ZERO_CENTERED: tl.constexpr, WRITE: tl.constexpr, BT: tl.constexpr, PDL: tl.constexpr):
    """Grid (token block, head): heads [0, HQ) are q's, [HQ, HQ + HKV) k's, the rest (with WRITE) v's."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    h = tl.program_id(1)
    t_ok = t < N
    t64 = t.to(tl.int64)
    d = tl.arange(0, D)
    ok = t_ok[:, None] & (d < D)[None, :]
    wait_for_predecessor(PDL)                  # q, k, v are the projection's output, launched just before
    if WRITE:
        slot = tl.load(SLOTS + t, mask=t_ok, other=0).to(tl.int64)
        if h >= HQ + HKV:                      # a value head: to its pages as it is
            hv = h - HQ - HKV
            v = tl.load(V + t64[:, None] * sv_t + hv * sv_h + d[None, :], mask=ok)
            tl.store(VP + slot[:, None] * sp_r + hv * sp_h + d[None, :], v.to(VP.dtype.element_ty), mask=ok)
            return
    is_q = h < HQ
    if is_q:
        rows = t64 * sq_t + h * sq_h
        src = Q
        wt = WQ
    else:
        rows = t64 * sk_t + (h - HQ) * sk_h
        src = K
        wt = WK
    x = tl.load(src + rows[:, None] + d[None, :], mask=ok, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
    dtype = QO.dtype.element_ty
    y = _normed(src, rows, d, ok, inv, wt, ZERO_CENTERED, dtype)
    # rotate-half over the first R dims: out = y * cos + (-y[d + R/2] if d < R/2 else y[d - R/2]) * sin
    half: tl.constexpr = R // 2
    in_rot = d < R
    partner = tl.where(d < half, d + half, tl.where(in_rot, d - half, d))
    yp = _normed(src, rows, partner, ok, inv, wt, ZERO_CENTERED, dtype)
    rk = tl.where(in_rot, d, 0)
    cos = tl.load(COS + t64[:, None] * sc_t + rk[None, :], mask=ok & in_rot[None, :], other=1.0).to(tl.float32)
    sin = tl.load(SIN + t64[:, None] * ss_t + rk[None, :], mask=ok & in_rot[None, :], other=0.0).to(tl.float32)
    sign = tl.where(d < half, -1.0, 1.0)[None, :]
    out = tl.where(in_rot[None, :], y * cos + sign * yp * sin, y).to(dtype)
    if is_q:
        tl.store(QO + t64[:, None] * sqo_t + h * sqo_h + d[None, :], out, mask=ok)
    else:
        hk = h - HQ
        tl.store(KO + t64[:, None] * sko_t + hk * sko_h + d[None, :], out, mask=ok)
        if WRITE:
            tl.store(KP + slot[:, None] * sp_r + hk * sp_h + d[None, :], out.to(KP.dtype.element_ty), mask=ok)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, q_weight: torch.Tensor,
                 k_weight: torch.Tensor, eps: float, zero_centered: bool, cos: torch.Tensor, sin: torch.Tensor,
                 k_pages: torch.Tensor | None = None, v_pages: torch.Tensor | None = None,
                 slot_mapping: torch.Tensor | None = None):
    """ops/rope.qk_norm_rope on q [N, Hq, D], k [N, Hkv, D] (views with unit stride in D, e.g. of the q projection's
    rows with their gates between heads), cos / sin [N, R]; returns (q, k) new [N, H, D] tensors. With the pages,
    also ops/attention.write_kv(k_pages, v_pages, rotated k, v, slot_mapping), in place."""
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    R = cos.shape[-1]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or (v is not None and v.stride(-1) != 1):
        raise ValueError("q, k, v must have unit stride in head_dim")
    if D & (D - 1) or R % 2 or R > D or cos.shape != (N, R) or sin.shape != (N, R):
        raise ValueError(f"head_dim {D} must be a power of two and cos / sin [{N}, R] with R even, <= head_dim; got "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    cos, sin = (c if c.stride(-1) == 1 else c.contiguous() for c in (cos, sin))
    qo = torch.empty(N, Hq, D, device=q.device, dtype=q.dtype)
    ko = torch.empty(N, Hkv, D, device=k.device, dtype=k.dtype)
    write = k_pages is not None
    if write:
        if not (k_pages.is_contiguous() and v_pages.is_contiguous() and k_pages.stride() == v_pages.stride()):
            raise ValueError("the K and V pages must be contiguous pools of one shape")
        pages = k_pages.view(-1, Hkv, D)
        sp = (pages.stride(0), pages.stride(1))
    else:
        k_pages = v_pages = slot_mapping = ko                          # never touched
        v = k
        sp = (0, 0)
    if N == 0:
        return qo, ko
    BT = 1 if N <= 64 else 16            # a decode step: one token per program, every head its own program
    pdl = launch_pdl(q)
    _qk_norm_rope_kernel[(triton.cdiv(N, BT), Hq + Hkv + (Hkv if write else 0))](
        q, k, v, q_weight, k_weight, cos, sin, qo, ko, k_pages, v_pages, slot_mapping, N, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), *sp, HQ=Hq, HKV=Hkv, D=D, R=R,
        ZERO_CENTERED=zero_centered, WRITE=write, BT=BT, PDL=pdl, num_warps=1 if BT == 1 and D <= 256 else 4,
        launch_pdl=pdl)
    return qo, ko
