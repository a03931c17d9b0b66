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

from .pdl import launch_pdl, wait_for_predecessor


@triton.jit
def _up_kernel(X, IDS, W, SW, GU, SG, SU, Hbuf, stride_x, stride_e, stride_gu, stride_s, stride_h,
               K: tl.constexpr, S: tl.constexpr, I: tl.constexpr, IS: tl.constexpr, H: tl.constexpr,
               BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    pair = tl.program_id(0)
    blk = tl.program_id(1)
    wait_for_predecessor(PDL)      # the expert ids are the routing's, launched just before: nothing to read early
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
    # one row per program: products summed across steps and reduced once at the end (no shuffles in the loop);
    # several rows: reduced in every step (with [4, 1024] accumulators the bench's 64-sequence step took 9.2
    # against 8.6 ms per 8 layers, H100, 2026-11-23)
    acc_g = tl.zeros([BLOCK_I, BLOCK_H if BLOCK_I == 1 else 1], tl.float32)
    acc_u = tl.zeros([BLOCK_I, BLOCK_H if BLOCK_I == 1 else 1], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        c = h0 + cols
        c_ok = c < H
        x = tl.load(X + t * stride_x + c, mask=c_ok, other=0.0).to(tl.float32)
        m = row_ok[:, None] & c_ok[None, :]
        wg = tl.load(g_base + rows[:, None] * row_stride + c[None, :], mask=m, other=0.0).to(tl.float32)
        wu = tl.load(u_base + rows[:, None] * row_stride + c[None, :], mask=m, other=0.0).to(tl.float32)
        if BLOCK_I == 1:
            acc_g += wg * x[None, :]
            acc_u += wu * x[None, :]
        else:
            acc_g += tl.sum(wg * x[None, :], 1, keep_dims=True)
            acc_u += tl.sum(wu * x[None, :], 1, keep_dims=True)
    g_ = tl.sum(acc_g, 1)
    h = g_ / (1.0 + tl.exp(-g_)) * tl.sum(acc_u, 1) * w
    tl.store(Hbuf + pair * stride_h + rows, h, mask=row_ok)


@triton.jit
def _down_kernel(Hbuf, IDS, D, SD, Y, stride_h, stride_de, stride_dr, stride_sr, stride_y,
                 K: tl.constexpr, S: tl.constexpr, I: tl.constexpr, IS: tl.constexpr, KMAX: tl.constexpr,
                 H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pair = tl.program_id(0)
    blk = tl.program_id(1)
    t = pair // S
    slot = pair % S
    n_inner = I + (IS - I) * (slot >= K).to(tl.int32)
    # the ids were written by the routing kernel, two launches back: finished once this kernel runs (ops/pdl.py),
    # so the first block of the expert's down rows is read before waiting for h (the up kernel's output)
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
    c_ok = cols < n_inner
    wd = tl.load(base + rows[:, None] * row_stride + cols[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
    wait_for_predecessor(PDL)
    h = tl.load(Hbuf + pair * stride_h + cols, mask=c_ok, other=0.0)
    acc = wd.to(tl.float32) * h[None, :]          # reduced once after the loop
    for k0 in range(BLOCK_K, KMAX, BLOCK_K):    # KMAX = max(I, IS), a constant bound; the mask stops at n_inner
        c = k0 + cols
        c_ok = c < n_inner
        h = tl.load(Hbuf + pair * stride_h + c, mask=c_ok, other=0.0)
        w_next = tl.load(base + rows[:, None] * row_stride + c[None, :], mask=row_ok[:, None] & c_ok[None, :],
                         other=0.0)
        acc += w_next.to(tl.float32) * h[None, :]
    tl.store(Y + pair * stride_y + rows, tl.sum(acc, 1), mask=row_ok)


# Block shapes from benchmarks/tune_decode_kernels.py --only moe. One token (H100, 80B-A3B shapes, 2026-11-23,
# benchmarks/results/tune_moe_2026-11-23.json): one row of gate and up per program, 1024 columns per step (17.4 us
# = 0.90 of the copy rate, against 19.7 us for the earlier 4 x 256); down 8 x 512 (9.2 against 9.5 us). Above one
# token the one-row shape made the bench's 64-sequence step slower (9.48 against 8.68 ms per 8 layers); there the
# up kernel's 4 rows x 2048 columns and both kernels with 2 warps (H200 sweep at 4 / 16 / 64 tokens,
# benchmarks/results/tune_decode_h200_2026-11-24.json): at 64 tokens 433 / 214 us against 545 / 274 us for
# 4 x 1024 / 4 warps and 16 x 256 / 8 warps (1.26x / 1.28x), at 16 tokens 138 / 70 against 142 / 71, at 4 equal.
# False: those earlier shapes above one token (benchmarks/ab_decode.py --switch moe-blocks)
WIDE_MULTI_TOKEN_BLOCKS = True


def decode_blocks(T: int):
    """((BLOCK_I, BLOCK_H, warps) of the up kernel, (BLOCK_N, BLOCK_K, warps) of the down kernel) at T tokens."""
    if T == 1:
        return (1, 1024, 4), (8, 512, 8)
    return ((4, 2048, 2), (16, 256, 2)) if WIDE_MULTI_TOKEN_BLOCKS else ((4, 1024, 4), (16, 256, 8))


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
    (BLOCK_I, BLOCK_H, up_warps), (BLOCK_N, BLOCK_K, down_warps) = decode_blocks(T)
    pdl = launch_pdl(x)
    _up_kernel[(T * S, triton.cdiv(width, BLOCK_I))](
        x, ids, w, sw, gate_up, sg, su, h, x.stride(0), gate_up.stride(0), gate_up.stride(1), sg.stride(0), h.stride(0),
        K=K, S=S, I=inter, IS=inter_s, H=Hd, BLOCK_I=BLOCK_I, BLOCK_H=BLOCK_H, PDL=pdl, num_warps=up_warps,
        launch_pdl=pdl)
    _down_kernel[(T * S, triton.cdiv(Hd, BLOCK_N))](
        h, ids, down, sd, y, h.stride(0), down.stride(0), down.stride(1), sd.stride(0), y.stride(0),
        K=K, S=S, I=inter, IS=inter_s, KMAX=width, H=Hd, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PDL=pdl,
        num_warps=down_warps, launch_pdl=pdl)
    return y.view(T, S, Hd)


@triton.jit
def _route_kernel(LOGITS, W, IDS, stride_l, E: tl.constexpr, K: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_K: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    wait_for_predecessor(PDL)
    z = tl.load(LOGITS + t * stride_l + e, mask=e < E, other=float("-inf")).to(tl.float32)
    p = tl.exp(z - tl.max(z, 0))                      # softmax numerators in (0, 1]; padding 0
    # one key per expert: the numerator's bits (ordered like the values, as they are >= 0) above the reversed
    # index, so ONE max per round finds the largest value and, among equal ones, the lowest index (as argmax did;
    # max + argmax were two reductions per round)
    key = (p.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK_E - 1 - e).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_K], tl.float32)
    top_i = tl.zeros([BLOCK_K], tl.int32)
    for j in tl.static_range(K):                     # k rounds of "take the largest, then hide it"
        best = tl.max(key, 0)
        top_w = tl.where(kk == j, (best >> 32).to(tl.int32).to(tl.float32, bitcast=True), top_w)
        top_i = tl.where(kk == j, BLOCK_E - 1 - (best & 0xFFFFFFFF).to(tl.int32), top_i)
        key = tl.where(key == best, -1, key)
    # with renormalisation the softmax denominator cancels; without it, divide by the sum over all experts
    top_w = top_w / tl.sum(top_w, 0) if NORM else top_w / tl.sum(p, 0)      # the padding entries are 0
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
    pdl = launch_pdl(logits)
    _route_kernel[(T,)](logits, w, ids, logits.stride(0), E=E, K=top_k, BLOCK_E=triton.next_power_of_2(E),
                        BLOCK_K=triton.next_power_of_2(top_k), NORM=norm_topk_prob, PDL=pdl, launch_pdl=pdl,
                        num_warps=1)   # one warp: its reductions need no barriers; 5.3 -> 3.9 us at 1 token (H100)
    return w, ids
