"""Gated DeltaNet in Triton: a decode step in one kernel, and the prefill's input unpacking in one pass.

Decode step: gates, q/k l2-norm and the delta rule, with the fp32
recurrent state read from and written back to its slot of the state pool in place.

The unfused path gathers each sequence's state out of the pool, runs the recurrent kernel (which reads it and
writes a new one) and scatters the result back: six passes over 2 MiB per sequence and layer at 80B-A3B shapes
(32 value heads x 128 x 128 fp32), against two here, plus the launches of the gather, the scatter and the gate
arithmetic. Grid (sequence, value head, block of BV value columns); each program holds a [dk, BV] tile of the
state in registers:

    S <- exp(g) S;   u = beta (v - S^T k);   S <- S + k u^T;   o = S^T q
    (q, k l2-normalised, q scaled by dk^-1/2; g = -exp(A_log) softplus(a + dt_bias); beta = sigmoid(b))

The short conv before it is its own kernel (ops/triton_conv.causal_conv1d_step; q, k, v are views of its output).
With z and norm_weight, the kernel also applies Gated DeltaNet's gated RMSNorm (y = w * rms-normed(o) * silu(z), per value
head). The norm needs the whole head, which BV columns per program do not hold: each program stores its columns,
and the last of a head's programs to finish (ops/arrival.py) reads the head back and writes it normed. One
program per head (BV = dv, as until 2026-11-24) held a 128 x 128 fp32 tile in registers, 32 programs at one
sequence: that kernel ended ~8 us after the conv step before it (H100, benchmarks/profile_gpu.py --timeline).
Reference: ops/gated_delta.gated_delta_decode (+ ops/norm.gated_rms_norm).

Prefill: projection_gates makes beta and g from in_proj_ba's rows (the conv reads q, k, v out of in_proj_qkvz's rows
itself, the gated norm z); split_and_gate also unpacks in_proj_qkvz (grouped per key head in the checkpoint) into
the conv input and z (kernels.CONV_READS_QKVZ = False). Reference: ops/gdn_projections.py.

Both are checked by benchmarks/check_gpu.py and, in Triton's CPU interpreter, by tests/test_triton_kernels.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .arrival import arrive_last, counters
from .pdl import launch_pdl, wait_for_predecessor


@triton.jit
def _gated_norm_store(O_ROW, o, Z_ROW, NORM_W, cols, ok, eps, DV: tl.constexpr):
    """Store o [cols] (a whole head, in O's dtype) as w * rms-normed(o) * silu(z), rounded as the reference."""
    of = o.to(tl.float32)
    normed = (of * tl.rsqrt(tl.sum(of * of, 0) / DV + eps)).to(O_ROW.dtype.element_ty)
    z = tl.load(Z_ROW + cols, mask=ok, other=0.0).to(tl.float32)
    wn = (tl.load(NORM_W + cols, mask=ok, other=0.0) * normed).to(tl.float32)
    tl.store(O_ROW + cols, (wn * (z / (1.0 + tl.exp(-z)))).to(O_ROW.dtype.element_ty), mask=ok)


@triton.jit
def _gdn_decode_kernel(Q, K, V, A, B, A_LOG, DT_BIAS, STATE, SLOTS, FRESH, O, Z, NORM_W, COUNT, scale, eps,
                       stride_qs, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_as, stride_ag,
                       stride_bs, stride_bg, stride_ss, stride_sh, stride_os, stride_oh, stride_zs, stride_zg,
                       stride_zr, R: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, BDV: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    vb = tl.program_id(2)
    hk = h // R                                    # grouped value heads: value head h reads key head h // R
    kk = tl.arange(0, BK)
    vv = vb * BV + tl.arange(0, BV)
    k_ok = kk < DK
    v_ok = vv < DV
    # the state tile (the bulk of the bytes), its slot and the per-head parameters are read before waiting for
    # the conv step that makes q, k, v (ops/pdl.py)
    slot = tl.load(SLOTS + s).to(tl.int64)
    carry = tl.load(FRESH + s).to(tl.int32) == 0   # a fresh sequence starts from a zero state (FRESH: bool)
    ptr = STATE + slot * stride_ss + h * stride_sh + kk[:, None] * DV + vv[None, :]
    m = k_ok[:, None] & v_ok[None, :]
    S = tl.load(ptr, mask=m & carry, other=0.0)
    dt_bias = tl.load(DT_BIAS + h).to(tl.float32)
    decay = -tl.exp(tl.load(A_LOG + h).to(tl.float32))
    wait_for_predecessor(PDL)
    q = tl.load(Q + s * stride_qs + hk * stride_qh + kk, mask=k_ok, other=0.0).to(tl.float32)
    k = tl.load(K + s * stride_ks + hk * stride_kh + kk, mask=k_ok, other=0.0).to(tl.float32)
    v = tl.load(V + s * stride_vs + h * stride_vh + vv, mask=v_ok, other=0.0).to(tl.float32)
    q = q * tl.rsqrt(tl.sum(q * q, 0) + 1e-6) * scale
    k = k * tl.rsqrt(tl.sum(k * k, 0) + 1e-6)
    # a, b: [S, Hk, R] views (e.g. of in_proj_ba's grouped rows, read in place)
    a = tl.load(A + s * stride_as + hk * stride_ag + h % R).to(tl.float32) + dt_bias
    softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))        # torch's softplus (threshold 20)
    g = decay * softplus
    beta = tl.sigmoid(tl.load(B + s * stride_bs + hk * stride_bg + h % R).to(tl.float32))
    S = S * tl.exp(g)
    u = beta * (v - tl.sum(S * k[:, None], 0))
    S = S + k[:, None] * u[None, :]
    o = tl.sum(S * q[:, None], 0)
    tl.store(ptr, S, mask=m)
    o = o.to(O.dtype.element_ty)
    o_row = O + s * stride_os + h * stride_oh
    if not NORM:
        tl.store(o_row + vv, o, mask=v_ok)
    else:
        z_row = Z + s * stride_zs + hk * stride_zg + (h % R) * stride_zr
        if BV >= DV:                               # this program holds the whole head
            _gated_norm_store(o_row, o, z_row, NORM_W, vv, v_ok, eps, DV)
        else:
            tl.store(o_row + vv, o, mask=v_ok)
            if arrive_last(COUNT + s * tl.num_programs(1) + h, tl.num_programs(2)):
                cols = tl.arange(0, BDV)
                ok = cols < DV
                head = tl.load(o_row + cols, mask=ok, other=0.0, cache_modifier=".cg")
                _gated_norm_store(o_row, head, z_row, NORM_W, cols, ok, eps, DV)


# value columns per program; 32: a [128, 32] fp32 state tile per program, 128 programs per sequence at 80B-A3B
DECODE_BLOCK_V = 32


def gated_delta_decode(q, k, v, a, b, A_log, dt_bias, state, slots, fresh, scale=None, z=None, norm_weight=None,
                       eps=0.0, block_v=None):
    """Same contract as ops/gated_delta.gated_delta_decode (state updated in place); a, b [S, Hv] or
    [S, Hk, Hv / Hk] views with unit stride in the last dimension (read where they are). With z and norm_weight
    the output is Gated DeltaNet's gated RMSNorm of it, ops/norm.gated_rms_norm(o, z, norm_weight, eps), applied
    in the same kernel; z [S, Hv, dv] or [S, Hk, Hv / Hk, dv] (e.g. a view of in_proj_qkvz's rows). The custom op
    qwen3next::gdn_decode has this signature."""
    S, Hk, dk = q.shape
    Hv, dv = v.shape[1], v.shape[2]
    R = Hv // Hk
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("the recurrent state pool must be contiguous fp32")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k, v must be contiguous in their last dimension")
    a, b = (t.reshape(S, Hk, R) if t.dim() == 2 else t for t in (a, b))
    a, b = (t if t.stride(-1) == 1 else t.contiguous() for t in (a, b))
    o = torch.empty(S, Hv, dv, device=v.device, dtype=v.dtype)
    norm = z is not None
    if not norm:
        z, norm_weight = o, o                                        # never read
        zs = (0, 0, 0)
    else:
        z = z.reshape(S, Hk, R, dv) if z.dim() == 3 else z          # a view for the checkpoint's grouped rows
        if z.shape != (S, Hk, R, dv) or z.stride(-1) != 1:
            raise ValueError(f"the norm's gate must be [S, Hv, dv] = {(S, Hv, dv)} with unit stride in dv, got "
                             f"{tuple(z.shape)}")
        zs = (z.stride(0), z.stride(1), z.stride(2))
    BV = min(block_v or DECODE_BLOCK_V, triton.next_power_of_2(dv))
    n_vb = triton.cdiv(dv, BV)
    count = counters(q.device, "gdn_decode", S * Hv) if norm and n_vb > 1 else o    # o: never touched
    pdl = launch_pdl(q)
    _gdn_decode_kernel[(S, Hv, n_vb)](
        q, k, v, a, b, A_log, dt_bias, state, slots, fresh, o, z, norm_weight, count,  # fresh read as bool
        dk ** -0.5 if scale is None else scale, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), state.stride(0), state.stride(1), o.stride(0), o.stride(1), *zs,
        R=R, DK=dk, DV=dv, BK=triton.next_power_of_2(dk), BV=BV, BDV=triton.next_power_of_2(dv), NORM=norm,
        PDL=pdl, num_warps=8 if BV >= 128 else 4, launch_pdl=pdl)
    return o


# ---- speculative verification: T tokens per sequence, the state after each kept ---------------------------------
@triton.jit
def _gdn_verify_kernel(Q, K, V, A, B, A_LOG, DT_BIAS, STATE, SLOTS, FRESH, O, STEPS, scale, T,
                       sq_s, sq_t, sq_h, sk_s, sk_t, sk_h, sv_s, sv_t, sv_h, sa_s, sa_t, sb_s, sb_t, ss_s, ss_h,
                       so_s, so_t, so_h, st_s, st_t, st_h, R: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, PDL: tl.constexpr):
    """Grid (sequence, value head, block of BV value columns): the decode kernel's update, T times, with the
    [dk, BV] state tile kept in registers between tokens and stored after each into STEPS [S, T, Hv, dk, dv]."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    vb = tl.program_id(2)
    hk = h // R
    kk = tl.arange(0, BK)
    vv = vb * BV + tl.arange(0, BV)
    k_ok = kk < DK
    v_ok = vv < DV
    m = k_ok[:, None] & v_ok[None, :]
    tile = kk[:, None] * DV + vv[None, :]
    slot = tl.load(SLOTS + s).to(tl.int64)
    carry = tl.load(FRESH + s).to(tl.int32) == 0
    ptr = STATE + slot * ss_s + h * ss_h + tile
    S = tl.load(ptr, mask=m & carry, other=0.0)
    dt_bias = tl.load(DT_BIAS + h).to(tl.float32)
    decay = -tl.exp(tl.load(A_LOG + h).to(tl.float32))
    wait_for_predecessor(PDL)
    s64 = s.to(tl.int64)
    for t in range(T):
        q = tl.load(Q + s64 * sq_s + t * sq_t + hk * sq_h + kk, mask=k_ok, other=0.0).to(tl.float32)
        k = tl.load(K + s64 * sk_s + t * sk_t + hk * sk_h + kk, mask=k_ok, other=0.0).to(tl.float32)
        v = tl.load(V + s64 * sv_s + t * sv_t + h * sv_h + vv, mask=v_ok, other=0.0).to(tl.float32)
        q = q * tl.rsqrt(tl.sum(q * q, 0) + 1e-6) * scale
        k = k * tl.rsqrt(tl.sum(k * k, 0) + 1e-6)
        a = tl.load(A + s64 * sa_s + t * sa_t + h).to(tl.float32) + dt_bias
        softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))    # torch's softplus (threshold 20)
        beta = tl.sigmoid(tl.load(B + s64 * sb_s + t * sb_t + h).to(tl.float32))
        S = S * tl.exp(decay * softplus)
        u = beta * (v - tl.sum(S * k[:, None], 0))
        S = S + k[:, None] * u[None, :]
        o = tl.sum(S * q[:, None], 0)
        tl.store(O + s64 * so_s + t * so_t + h * so_h + vv, o.to(O.dtype.element_ty), mask=v_ok)
        tl.store(STEPS + s64 * st_s + t * st_t + h * st_h + tile, S, mask=m)
    tl.store(ptr, S, mask=m)


def gated_delta_verify(q, k, v, a, b, A_log, dt_bias, state, slots, fresh, scale=None):
    """Same contract as ops/gated_delta.gated_delta_verify: q, k [S, T, Hk, dk], v [S, T, Hv, dv] (views; copied
    where the last dimension is strided), a, b [S, T, Hv]; returns o [S, T, Hv, dv] and the fp32 states
    [S, T, Hv, dk, dv], the pool's slots updated to the last. Replaces the torch recurrence, whose 2T matrix-vector
    products read each state from memory again (H100 profile of a verification, 2026-11-24)."""
    S, T, Hk, dk = q.shape
    Hv, dv = v.shape[2], v.shape[3]
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("the recurrent state pool must be contiguous fp32")
    # the torch conv of a verification step leaves its output channels-first: a copy of a few tokens
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    a, b = (t.reshape(S, T, Hv) for t in (a, b))
    a, b = (t if t.stride(-1) == 1 else t.contiguous() for t in (a, b))
    o = torch.empty(S, T, Hv, dv, device=v.device, dtype=v.dtype)
    steps = torch.empty(S, T, Hv, dk, dv, device=v.device, dtype=torch.float32)
    BV = min(DECODE_BLOCK_V, triton.next_power_of_2(dv))
    pdl = launch_pdl(q)
    _gdn_verify_kernel[(S, Hv, triton.cdiv(dv, BV))](
        q, k, v, a, b, A_log, dt_bias, state, slots, fresh, o, steps, dk ** -0.5 if scale is None else scale, T,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), a.stride(0), a.stride(1), b.stride(0), b.stride(1), state.stride(0), state.stride(1),
        o.stride(0), o.stride(1), o.stride(2), steps.stride(0), steps.stride(1), steps.stride(2),
        R=Hv // Hk, DK=dk, DV=dv, BK=triton.next_power_of_2(dk), BV=BV, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return o, steps


# ---- prefill: the input projections unpacked and gated in one pass ---------------------------------------------
@triton.jit
def _split_gate_kernel(QKVZ, BA, A_LOG, DT_BIAS, MIXED, Z, BETA, G, N, stride_x, stride_ba, stride_m, stride_z,
                       stride_b, stride_g, HK: tl.constexpr, DK: tl.constexpr, R: tl.constexpr, RDV: tl.constexpr,
                       BT: tl.constexpr, BDK: tl.constexpr, BRDV: tl.constexpr, BR: tl.constexpr,
                       UNPACK: tl.constexpr):
    """Grid (token blocks of BT, key-head group g): turns the group's r (b, a) pairs into beta and g and, with
    UNPACK, copies its q, k, v into [all q | all k | all v] and z into [Hv dv]."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    grp = tl.program_id(1)
    ok = rows < N
    r64 = rows.to(tl.int64)[:, None]
    if UNPACK:
        src = QKVZ + r64 * stride_x + grp * (2 * DK + 2 * RDV)
        dst = MIXED + r64 * stride_m
        ck = tl.arange(0, BDK)[None, :]
        mk = ok[:, None] & (ck < DK)
        tl.store(dst + grp * DK + ck, tl.load(src + ck, mask=mk), mask=mk)
        tl.store(dst + HK * DK + grp * DK + ck, tl.load(src + DK + ck, mask=mk), mask=mk)
        cv = tl.arange(0, BRDV)[None, :]
        mv = ok[:, None] & (cv < RDV)
        tl.store(dst + 2 * HK * DK + grp * RDV + cv, tl.load(src + 2 * DK + cv, mask=mv), mask=mv)
        tl.store(Z + r64 * stride_z + grp * RDV + cv, tl.load(src + 2 * DK + RDV + cv, mask=mv), mask=mv)
    cr = tl.arange(0, BR)[None, :]
    mr = ok[:, None] & (cr < R)
    b = tl.load(BA + r64 * stride_ba + grp * 2 * R + cr, mask=mr, other=0.0).to(tl.float32)
    a = tl.load(BA + r64 * stride_ba + grp * 2 * R + R + cr, mask=mr, other=0.0).to(tl.float32)
    head = grp * R + cr
    a = a + tl.load(DT_BIAS + head, mask=cr < R, other=0.0).to(tl.float32)
    softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))        # torch's softplus (threshold 20)
    g = -tl.exp(tl.load(A_LOG + head, mask=cr < R, other=0.0).to(tl.float32)) * softplus
    tl.store(BETA + r64 * stride_b + head, tl.sigmoid(b).to(BETA.dtype.element_ty), mask=mr)
    tl.store(G + r64 * stride_g + head, g, mask=mr)


def _launch_split_gate(qkvz, ba, A_log, dt_bias, hk: int, dk: int, r: int, dv: int, unpack: bool):
    N = ba.shape[0]
    if ba.stride(-1) != 1 or (unpack and qkvz.stride(-1) != 1):
        raise ValueError("the projections must be contiguous in their last dimension")
    hv = hk * r
    dev, dt = ba.device, ba.dtype
    mixed = torch.empty(N, 2 * hk * dk + hv * dv, device=dev, dtype=qkvz.dtype) if unpack else None
    z = torch.empty(N, hv, dv, device=dev, dtype=qkvz.dtype) if unpack else None
    beta = torch.empty(N, hv, device=dev, dtype=dt)
    g = torch.empty(N, hv, device=dev, dtype=torch.float32)
    BT = 16 if unpack else 64
    _split_gate_kernel[(triton.cdiv(N, BT), hk)](
        qkvz if unpack else ba, ba, A_log, dt_bias, mixed if unpack else beta, z if unpack else beta, beta, g, N,
        qkvz.stride(0) if unpack else 0, ba.stride(0), mixed.stride(0) if unpack else 0,
        z.stride(0) if unpack else 0, beta.stride(0), g.stride(0), HK=hk, DK=dk, R=r, RDV=r * dv, BT=BT,
        BDK=triton.next_power_of_2(dk), BRDV=triton.next_power_of_2(r * dv), BR=triton.next_power_of_2(r),
        UNPACK=unpack, num_warps=4)
    return mixed, z, beta, g


def split_and_gate(qkvz, ba, A_log, dt_bias, hk: int, dk: int, r: int, dv: int):
    """Same contract as ops/gdn_projections.split_and_gate. Replaces ~15 torch ops (four strided copies, a concat,
    the gate arithmetic in fp32) with one launch that reads the projections once and writes each output once."""
    return _launch_split_gate(qkvz, ba, A_log, dt_bias, hk, dk, r, dv, unpack=True)


def projection_gates(ba, A_log, dt_bias, hk: int, r: int):
    """Same contract as ops/gdn_projections.projection_gates: beta, g (fp32) [N, Hv] from in_proj_ba's rows alone
    (the prefill conv reads q, k, v straight out of the qkvz rows: ops/triton_conv.causal_conv1d qkvz_layout)."""
    _, _, beta, g = _launch_split_gate(None, ba, A_log, dt_bias, hk, 1, r, 1, unpack=False)
    return beta, g
