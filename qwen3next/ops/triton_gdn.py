"""One Gated DeltaNet decode step in one Triton kernel: gates, q/k l2-norm and the delta rule, with the fp32
recurrent state read from and written back to its slot of the state pool in place.

The unfused path gathers each sequence's state out of the pool, runs the recurrent kernel (which reads it and
writes a new one) and scatters the result back: six passes over 2 MiB per sequence and layer at 80B-A3B shapes
(32 value heads x 128 x 128 fp32), against two here, plus the launches of the gather, the scatter and the gate
arithmetic. Grid (sequence, value head, block of BV value columns); each program holds a [dk, BV] tile of the
state in registers:

    S <- exp(g) S;   u = beta (v - S^T k);   S <- S + k u^T;   o = S^T q
    (q, k l2-normalised, q scaled by dk^-1/2; g = -exp(A_log) softplus(a + dt_bias); beta = sigmoid(b))

The short conv before it and the gated RMSNorm after it stay in the compiled decode layer (ops/fused.py), which
fuses them with their neighbours. Reference: ops/gated_delta.gated_delta_decode; checked by
benchmarks/check_gpu.py and, in Triton's CPU interpreter, by tests/test_triton_kernels.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gdn_decode_kernel(Q, K, V, A, B, A_LOG, DT_BIAS, STATE, SLOTS, FRESH, O, scale,
                       stride_qs, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_as,
                       stride_ss, stride_sh, stride_os, stride_oh,
                       R: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    vb = tl.program_id(2)
    hk = h // R                                    # grouped value heads: value head h reads key head h // R
    kk = tl.arange(0, BK)
    vv = vb * BV + tl.arange(0, BV)
    k_ok = kk < DK
    v_ok = vv < DV
    q = tl.load(Q + s * stride_qs + hk * stride_qh + kk, mask=k_ok, other=0.0).to(tl.float32)
    k = tl.load(K + s * stride_ks + hk * stride_kh + kk, mask=k_ok, other=0.0).to(tl.float32)
    v = tl.load(V + s * stride_vs + h * stride_vh + vv, mask=v_ok, other=0.0).to(tl.float32)
    q = q * tl.rsqrt(tl.sum(q * q, 0) + 1e-6) * scale
    k = k * tl.rsqrt(tl.sum(k * k, 0) + 1e-6)
    a = tl.load(A + s * stride_as + h).to(tl.float32) + tl.load(DT_BIAS + h).to(tl.float32)
    softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))        # torch's softplus (threshold 20)
    g = -tl.exp(tl.load(A_LOG + h).to(tl.float32)) * softplus
    beta = tl.sigmoid(tl.load(B + s * stride_as + h).to(tl.float32))
    slot = tl.load(SLOTS + s).to(tl.int64)
    carry = tl.load(FRESH + s) == 0                # a fresh sequence starts from a zero state
    ptr = STATE + slot * stride_ss + h * stride_sh + kk[:, None] * DV + vv[None, :]
    m = k_ok[:, None] & v_ok[None, :]
    S = tl.load(ptr, mask=m & carry, other=0.0)
    S = S * tl.exp(g)
    u = beta * (v - tl.sum(S * k[:, None], 0))
    S = S + k[:, None] * u[None, :]
    o = tl.sum(S * q[:, None], 0)
    tl.store(ptr, S, mask=m)
    tl.store(O + s * stride_os + h * stride_oh + vv, o.to(O.dtype.element_ty), mask=v_ok)


def gated_delta_decode(q, k, v, a, b, A_log, dt_bias, state, slots, fresh, scale=None):
    """Same contract as ops/gated_delta.gated_delta_decode (state updated in place)."""
    S, Hk, dk = q.shape
    Hv, dv = v.shape[1], v.shape[2]
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("the recurrent state pool must be contiguous fp32")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k, v must be contiguous in their last dimension")
    a, b = a.contiguous(), b.contiguous()
    o = torch.empty(S, Hv, dv, device=v.device, dtype=v.dtype)
    BV = min(32, triton.next_power_of_2(dv))
    _gdn_decode_kernel[(S, Hv, triton.cdiv(dv, BV))](
        q, k, v, a, b, A_log, dt_bias, state, slots, fresh.to(torch.int8), o,
        dk ** -0.5 if scale is None else scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), a.stride(0),
        state.stride(0), state.stride(1), o.stride(0), o.stride(1),
        R=Hv // Hk, DK=dk, DV=dv, BK=triton.next_power_of_2(dk), BV=BV, num_warps=4)
    return o
