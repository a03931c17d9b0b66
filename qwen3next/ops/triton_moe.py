"""The sparse MoE block of a decode step in two Triton kernels: routed experts + shared expert, reading only the
selected experts' weights, with no sort, gather or grouping.

With a few tokens (a decode or verification step), each (token, expert) pair is a matrix-vector product, bound by
reading the expert's weights. The grouped-GEMM path (ops/cuda.experts_forward) needs ~10 kernels around its two
GEMMs (argsort, counts, cumsum, gathers, inverse permutation, combine) and its GEMM tiles, sized for many rows,
reach about half the memory bandwidth on one row. Here:

  up kernel    grid (T * S, I / BLOCK_I): for the pair (token t, slot s) — s < k a routed expert, s == k the shared
               one — gate and up rows of that expert times x[t], silu(gate) * up * weight -> h [T, S, I] (fp32)
  down kernel  grid (T * S, H / BLOCK_N): the expert's down rows times h[t, s] -> y [T, S, H] (fp32)

and the caller sums y over S (inside a compiled decode layer that sum fuses with the residual add). The weight of
the shared slot is sigmoid(shared_expert_gate(x)), computed by the caller. The routed and shared intermediate
sizes may differ (programs past a slot's size return at once).

Reference: the routed experts of ops/moe.experts_forward plus the shared MLP; benchmarks/check_gpu.py compares
them on the GPU and tests/test_triton_kernels.py in Triton's CPU interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _up_kernel(X, IDS, W, SW, GU, SG, SU, Hbuf, stride_x, stride_e, stride_gu, stride_s, stride_h,
               K: tl.constexpr, S: tl.constexpr, I: tl.constexpr, IS: tl.constexpr, H: tl.constexpr,
               BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr):
    pair = tl.program_id(0)
    blk = tl.program_id(1)
    t = pair // S
    slot = pair % S
    n_rows = I + (IS - I) * (slot >= K).to(tl.int32)     # the slot's intermediate size
    if slot < K:
        e = tl.load(IDS + t * K + slot).to(tl.int64)
        g_base = GU + e * stride_e
        u_base = g_base + I * stride_gu
        row_stride = stride_gu
        w = tl.load(W + t * K + slot).to(tl.float32)
    else:                       # the shared expert
        g_base = SG
        u_base = SU
        row_stride = stride_s
        w = tl.load(SW + t).to(tl.float32)
    if blk * BLOCK_I >= n_rows:
        return
    rows = blk * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_H)
    acc_g = tl.zeros([BLOCK_I], tl.float32)
    acc_u = tl.zeros([BLOCK_I], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        c = h0 + cols
        c_ok = c < H
        x = tl.load(X + t * stride_x + c, mask=c_ok, other=0.0).to(tl.float32)
        m = row_ok[:, None] & c_ok[None, :]
        wg = tl.load(g_base + rows[:, None] * row_stride + c[None, :], mask=m, other=0.0).to(tl.float32)
        wu = tl.load(u_base + rows[:, None] * row_stride + c[None, :], mask=m, other=0.0).to(tl.float32)
        acc_g += tl.sum(wg * x[None, :], 1)
        acc_u += tl.sum(wu * x[None, :], 1)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u * w
    tl.store(Hbuf + pair * stride_h + rows, h, mask=row_ok)


@triton.jit
def _down_kernel(Hbuf, IDS, D, SD, Y, stride_h, stride_de, stride_dr, stride_sr, stride_y,
                 K: tl.constexpr, S: tl.constexpr, I: tl.constexpr, IS: tl.constexpr, KMAX: tl.constexpr,
                 H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pair = tl.program_id(0)
    blk = tl.program_id(1)
    t = pair // S
    slot = pair % S
    n_inner = I + (IS - I) * (slot >= K).to(tl.int32)
    if slot < K:
        e = tl.load(IDS + t * K + slot).to(tl.int64)
        base = D + e * stride_de
        row_stride = stride_dr
    else:
        base = SD
        row_stride = stride_sr
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < H
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, KMAX, BLOCK_K):    # KMAX = max(I, IS), a constant bound; the mask stops at n_inner
        c = k0 + cols
        c_ok = c < n_inner
        h = tl.load(Hbuf + pair * stride_h + c, mask=c_ok, other=0.0)
        wd = tl.load(base + rows[:, None] * row_stride + c[None, :], mask=row_ok[:, None] & c_ok[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(wd * h[None, :], 1)
    tl.store(Y + pair * stride_y + rows, acc, mask=row_ok)


def moe_decode(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
               weights: torch.Tensor, shared_gate: torch.Tensor | None = None,
               shared_up: torch.Tensor | None = None, shared_down: torch.Tensor | None = None,
               shared_weight: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H]; gate_up [E, 2I, H]; down [E, H, I]; ids, weights [T, k]; optional shared expert (gate and up
    [Is, H], down [H, Is], weight [T, 1]) -> per-slot outputs [T, k (+1), H] in fp32, to be summed over dim 1."""
    T, Hd = x.shape
    K = ids.shape[1]
    inter = down.shape[-1]
    shared = shared_gate is not None
    S = K + (1 if shared else 0)
    inter_s = shared_gate.shape[0] if shared else inter
    # ids, weights and the shared weight are read as they come (any int / float dtype): a cast or a concat here
    # would be one more small kernel per layer in every decode step
    x = x.contiguous()
    gate_up, down = gate_up.contiguous(), down.contiguous()
    ids, w = ids.contiguous(), weights.contiguous()
    if shared:
        sw = shared_weight.reshape(T).contiguous()
        sg, su, sd = shared_gate.contiguous(), shared_up.contiguous(), shared_down.contiguous()
    else:
        sw, sg, su, sd = w, gate_up, gate_up, gate_up       # never read: every slot is routed
    width = max(inter, inter_s)
    h = torch.empty(T * S, width, device=x.device, dtype=torch.float32)
    y = torch.empty(T * S, Hd, device=x.device, dtype=torch.float32)
    # block shapes from benchmarks/tune_decode_kernels.py (H100, 80B-A3B shapes, 2026-11-23): few rows per program
    # (more programs in flight) won; up at 1 token 21.7 -> 17.9 us, at 4 tokens 63.0 -> 57.9 us
    BLOCK_I, BLOCK_H = 4, (256 if T == 1 else 1024)
    _up_kernel[(T * S, triton.cdiv(width, BLOCK_I))](
        x, ids, w, sw, gate_up, sg, su, h, x.stride(0), gate_up.stride(0), gate_up.stride(1), sg.stride(0), h.stride(0),
        K=K, S=S, I=inter, IS=inter_s, H=Hd, BLOCK_I=BLOCK_I, BLOCK_H=BLOCK_H, num_warps=4)
    BLOCK_N, BLOCK_K = (8 if T == 1 else 16), 256
    _down_kernel[(T * S, triton.cdiv(Hd, BLOCK_N))](
        h, ids, down, sd, y, h.stride(0), down.stride(0), down.stride(1), sd.stride(0), y.stride(0),
        K=K, S=S, I=inter, IS=inter_s, KMAX=width, H=Hd, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=8)
    return y.view(T, S, Hd)


@triton.jit
def _route_kernel(LOGITS, W, IDS, stride_l, E: tl.constexpr, K: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_K: tl.constexpr, NORM: tl.constexpr):
    t = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    z = tl.load(LOGITS + t * stride_l + e, mask=e < E, other=float("-inf")).to(tl.float32)
    p = tl.exp(z - tl.max(z, 0))
    p = p / tl.sum(p, 0)                              # softmax over all experts, fp32
    kk = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_K], tl.float32)
    top_i = tl.zeros([BLOCK_K], tl.int32)
    for j in tl.static_range(K):                     # k rounds of "take the largest, then hide it"
        best = tl.argmax(p, 0)
        top_w = tl.where(kk == j, tl.max(p, 0), top_w)
        top_i = tl.where(kk == j, best, top_i)
        p = tl.where(e == best, -1.0, p)
    if NORM:
        top_w = top_w / tl.sum(top_w, 0)             # the padding entries are 0
    tl.store(W + t * K + kk, top_w.to(W.dtype.element_ty), mask=kk < K)
    tl.store(IDS + t * K + kk, top_i.to(IDS.dtype.element_ty), mask=kk < K)


def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """ops/moe.route in one kernel (softmax, top-k, renormalisation; torch's top-k alone is two kernels and
    ~12 us at one token): router_logits [T, E] -> (weights [T, k] in the logits' dtype, expert ids [T, k] int64)."""
    T, E = router_logits.shape
    logits = router_logits.contiguous()
    # the kernel stores in the output dtypes itself: casts afterwards would be two more kernels per decode layer
    w = torch.empty(T, top_k, device=logits.device, dtype=router_logits.dtype)
    ids = torch.empty(T, top_k, device=logits.device, dtype=torch.int64)
    _route_kernel[(T,)](logits, w, ids, logits.stride(0), E=E, K=top_k, BLOCK_E=triton.next_power_of_2(E),
                        BLOCK_K=triton.next_power_of_2(top_k), NORM=norm_topk_prob,
                        num_warps=1)   # one warp: its reductions need no barriers; 5.3 -> 3.9 us at 1 token (H100)
    return w, ids
