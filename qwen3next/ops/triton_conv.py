"""Gated DeltaNet's causal depthwise conv1d over packed prefill chunks, in Triton (with SiLU, carried state).

flash-linear-attention's conv kernel is as fast on the GPU, but its Python wrapper costs the host ~0.5 ms per call
(H100 machine, benchmarks/host_overhead.py, 2026-11-23) while the kernel runs ~0.07 ms at 4K tokens: a 4K prefill
is host-bound, and this is the largest share of it we can remove. Two launches: the conv (grid: token blocks x
channel blocks; each token finds its sequence and in-sequence index in BatchMeta's token maps, and reads the K-1
inputs before a sequence's first token from the carried state), and the final state of each sequence.

Reference: ops/conv1d.causal_conv1d (the state of a sequence is its last K-1 inputs per channel, oldest first);
tests/test_triton_kernels.py runs both in Triton's CPU interpreter, benchmarks/check_gpu.py on the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_pdl, wait_for_predecessor


@triton.jit
def _source_column(cols, GROUPED: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, RDV: tl.constexpr):
    """The input column of conv channel `cols`: itself, or (GROUPED) its place in a whole in_proj_qkvz row, grouped
    per key head: [q_g | k_g | v_g | z_g] for each g, while the channels are [all q | all k | all v]."""
    if GROUPED:
        part = tl.where(cols < HK * DK, 0, tl.where(cols < 2 * HK * DK, 1, 2))
        off = cols - part * HK * DK
        width = tl.where(part == 2, RDV, DK)
        return (off // width) * (2 * DK + 2 * RDV) + tl.where(part == 2, 2 * DK, part * DK) + off % width
    return cols


# N (tokens) is not specialised on: Triton compiles a kernel anew for each class of an integer argument (divisible
# by 16 or not), which a server's new prompt lengths would otherwise hit (~1 s each, H100)
@triton.jit(do_not_specialize=["N"])
def _conv_kernel(X, W, H0, SEQ, IDX, Y, N, C, stride_x, stride_y, stride_hs, K: tl.constexpr, BT: tl.constexpr,
                 BC: tl.constexpr, HAS_H0: tl.constexpr, ACT: tl.constexpr, SPLIT: tl.constexpr, CQ: tl.constexpr,
                 NORM_QK: tl.constexpr, GROUPED: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr,
                 RDV: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    r_ok = rows < N
    c_ok = (cols < C)[None, :]
    src_cols = _source_column(cols, GROUPED, HK, DK, RDV)
    seq = tl.load(SEQ + rows, mask=r_ok, other=0).to(tl.int64)
    idx = tl.load(IDX + rows, mask=r_ok, other=0)
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for j in tl.static_range(K):
        m = idx - (K - 1) + j                                  # in-sequence index of the input this tap reads
        src = (rows - (K - 1) + j).to(tl.int64)
        v = tl.load(X + src[:, None] * stride_x + src_cols[None, :], mask=(r_ok & (m >= 0))[:, None] & c_ok,
                    other=0.0)
        v = v.to(tl.float32)
        if HAS_H0:                                             # before the chunk: the carried state
            h = tl.load(H0 + seq[:, None] * stride_hs + cols[None, :] * (K - 1) + (K - 1 + m)[:, None],
                        mask=(r_ok & (m < 0))[:, None] & c_ok, other=0.0)
            v += h.to(tl.float32)
        w = tl.load(W + cols * K + j, mask=cols < C, other=0.0).to(tl.float32)
        acc += v * w[None, :]
    if ACT:
        acc = acc * tl.sigmoid(acc)
    if NORM_QK:   # this block is one whole q or k head (BC = head_dim): l2-normalised per token, in fp32
        if tl.program_id(1) * BC < 2 * CQ:
            acc = acc * tl.rsqrt(tl.sum(acc * acc, 1) + 1e-6)[:, None]
    if SPLIT:   # Y = [q (N x CQ) | k (N x CQ) | v (N x (C - 2 CQ))], each part row-major on its own
        part = (cols >= CQ).to(tl.int64) + (cols >= 2 * CQ).to(tl.int64)
        width = tl.where(part == 2, C - 2 * CQ, CQ).to(tl.int64)
        at = part * N * CQ + rows.to(tl.int64)[:, None] * width[None, :] + (cols - part * CQ)[None, :]
    else:
        at = rows.to(tl.int64)[:, None] * stride_y + cols[None, :]
    tl.store(Y + at, acc.to(Y.dtype.element_ty), mask=r_ok[:, None] & c_ok)


@triton.jit
def _final_state_kernel(X, H0, CU, OUT, C, stride_x, stride_hs, stride_os, K: tl.constexpr, BC: tl.constexpr,
                        HAS_H0: tl.constexpr, GROUPED: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr,
                        RDV: tl.constexpr):
    s = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = cols < C
    src_cols = _source_column(cols, GROUPED, HK, DK, RDV)
    start = tl.load(CU + s)
    n = tl.load(CU + s + 1) - start
    for p in tl.static_range(K - 1):
        m = n - (K - 1) + p                                    # in-sequence index of the state's entry p
        v = tl.load(X + (start + m).to(tl.int64) * stride_x + src_cols, mask=c_ok & (m >= 0), other=0.0)
        v = v.to(OUT.dtype.element_ty)
        if HAS_H0:
            h = tl.load(H0 + s.to(tl.int64) * stride_hs + cols * (K - 1) + (K - 1 + m), mask=c_ok & (m < 0),
                        other=0.0)
            v += h.to(OUT.dtype.element_ty)
        tl.store(OUT + s.to(tl.int64) * stride_os + cols * (K - 1) + p, v, mask=c_ok)


def _checked_layout(qkvz_layout, width: int, C: int):
    """(hk, dk, r dv) of x's rows (whole in_proj_qkvz rows), or (1, 1, 1) for plain [.., C] rows; checked
    against x's row width and the conv's C channels."""
    if qkvz_layout is None:
        if width != C:
            raise ValueError(f"x has {width} channels, the conv weight {C}")
        return 1, 1, 1
    hk, dk, rdv = qkvz_layout
    if width != hk * (2 * dk + 2 * rdv) or C != hk * (2 * dk + rdv):
        raise ValueError(f"qkvz rows of width {width} and {C} conv channels do not fit the layout "
                         f"(hk, dk, r dv) = {tuple(qkvz_layout)}")
    return hk, dk, rdv


def l2norm_fits(split_qk: int, head: int) -> bool:
    """Whether the conv can l2-normalise q and k itself: one program's channel block is one whole head."""
    return head & (head - 1) == 0 and head <= 256 and split_qk % head == 0


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor,
                  token_seq: torch.Tensor, token_index: torch.Tensor, activation: bool = True,
                  split_qk: int | None = None, l2norm_head: int | None = None, qkvz_layout=None):
    """x [1, N, C] (sequences packed by cu_seqlens [S+1]), weight [C, K], initial_state [S, C, K-1] or None;
    token_seq / token_index [N]: each token's sequence and index within it. Same results as ops/conv1d's
    causal_conv1d with cu_seqlens: (y [1, N, C] in x's dtype, final state [S, C, K-1] in weight's dtype).
    `qkvz_layout` = (hk, dk, r dv): x holds whole in_proj_qkvz rows [1, N, hk (2 dk + 2 r dv)] (grouped per key
    head, ops/gdn_projections.py), read in place: the C = hk (2 dk + r dv) channels are its q, k, v columns, so
    no pass unpacks them first (that copy took as long as the conv: 70 vs 63 us per layer at 4K tokens, H100).
    `split_qk` = Cq: y comes as [q, k, v], the channels [0, Cq), [Cq, 2 Cq) and the rest, each a contiguous
    [1, N, C_i] (Gated DeltaNet's q, k, v as flash-linear-attention's chunk kernel wants them: the views of one
    [N, C] output cost three copies, 0.27 ms per 4 layers at 4K tokens on an H100). `l2norm_head` = d (with
    split_qk, a power of two dividing Cq): q and k come l2-normalised over each head of d channels
    (ops/gated_delta.l2norm), so the delta rule need not (fla's l2norm kernel autotunes 25 configurations for
    every new bucket of token counts: 12.8 s in the first 32K prompt through 8K chunks, H100)."""
    _, N, width = x.shape
    C, K = weight.shape
    S = cu_seqlens.numel() - 1
    hk, dk, rdv = _checked_layout(qkvz_layout, width, C)
    x2 = x[0] if x[0].stride(-1) == 1 else x[0].contiguous()
    w = weight.contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    y = torch.empty(N, C, device=x.device, dtype=x.dtype)
    final = torch.empty(S, C, K - 1, device=x.device, dtype=weight.dtype)
    if split_qk is not None and not 0 < 2 * split_qk < C:
        raise ValueError(f"split_qk must leave channels for v: 0 < 2 * {split_qk} < {C}")
    BT, BC = 16, 128
    if l2norm_head is not None:
        if split_qk is None or not l2norm_fits(split_qk, l2norm_head):
            raise ValueError(f"l2norm_head must be a power of two <= 256 dividing split_qk, got {l2norm_head} / "
                             f"{split_qk}")
        BC = l2norm_head
    layout = dict(GROUPED=qkvz_layout is not None, HK=hk, DK=dk, RDV=rdv)
    _conv_kernel[(triton.cdiv(N, BT), triton.cdiv(C, BC))](
        x2, w, x2 if h0 is None else h0, token_seq, token_index, y, N, C, x2.stride(0), y.stride(0),
        0 if h0 is None else h0.stride(0), K=K, BT=BT, BC=BC, HAS_H0=h0 is not None, ACT=activation,
        SPLIT=split_qk is not None, CQ=split_qk or 0, NORM_QK=l2norm_head is not None, **layout, num_warps=4)
    _final_state_kernel[(S, triton.cdiv(C, 256))](
        x2, x2 if h0 is None else h0, cu_seqlens, final, C, x2.stride(0), 0 if h0 is None else h0.stride(0),
        final.stride(0), K=K, BC=256, HAS_H0=h0 is not None, **layout, num_warps=4)
    if split_qk is None:
        return y[None], final
    flat, cq = y.view(-1), split_qk
    return [flat[:N * cq].view(1, N, cq), flat[N * cq:2 * N * cq].view(1, N, cq),
            flat[2 * N * cq:].view(1, N, C - 2 * cq)], final


# ---- a decode step: one token per sequence, the conv state updated in place in the state pool ------------------
# In a compiled decode layer the torch form of this step (gather the states, mask fresh ones, the K-tap dot
# product, scatter the new states) became ~7 small kernels per Gated DeltaNet layer (Inductor materialises q, k and v
# separately for the custom op after it); here it is one, and q, k, v are views of its output.

@triton.jit
def _conv_step_kernel(X, W, STATE, SLOTS, FRESH, Y, C, stride_x, stride_y, stride_ss, K: tl.constexpr,
                      BK: tl.constexpr, BC: tl.constexpr, ACT: tl.constexpr, GROUPED: tl.constexpr,
                      HK: tl.constexpr, DK: tl.constexpr, RDV: tl.constexpr, PDL: tl.constexpr):
    s = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = cols < C
    src = _source_column(cols, GROUPED, HK, DK, RDV)     # GROUPED: X holds whole in_proj_qkvz rows
    j = tl.arange(0, BK)                                       # state column: the input j - (K - 1) steps back
    slot = tl.load(SLOTS + s).to(tl.int64)
    carry = tl.load(FRESH + s).to(tl.int32) == 0               # a fresh sequence starts from a zero state
    base = STATE + slot * stride_ss + cols[:, None] * (K - 1)
    old = tl.load(base + j[None, :], mask=c_ok[:, None] & (j < K - 1)[None, :] & carry, other=0.0)
    nxt = tl.load(base + j[None, :] + 1, mask=c_ok[:, None] & (j + 1 < K - 1)[None, :] & carry, other=0.0)
    w_old = tl.load(W + cols[:, None] * K + j[None, :], mask=c_ok[:, None] & (j < K - 1)[None, :], other=0.0)
    w_new = tl.load(W + cols * K + (K - 1), mask=c_ok, other=0.0)
    wait_for_predecessor(PDL)          # the state and weights above are read early; x is the projection just made
    x = tl.load(X + s * stride_x + src, mask=c_ok, other=0.0).to(W.dtype.element_ty)    # the reference rounds
    acc = tl.sum(old.to(W.dtype.element_ty).to(tl.float32) * w_old.to(tl.float32), 1)
    acc += x.to(tl.float32) * w_new.to(tl.float32)
    if ACT:
        acc = acc / (1.0 + tl.exp(-acc))                       # SiLU
    tl.store(Y + s * stride_y + cols, acc.to(Y.dtype.element_ty), mask=c_ok)
    new = tl.where((j == K - 2)[None, :], x[:, None].to(STATE.dtype.element_ty), nxt)
    tl.debug_barrier()            # every read of this slot's old state happens before any write of the new one
    tl.store(base + j[None, :], new, mask=c_ok[:, None] & (j < K - 1)[None, :])


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, slots: torch.Tensor,
                       fresh: torch.Tensor, activation: bool = True, qkvz_layout=None) -> torch.Tensor:
    """Same contract as ops/conv1d.causal_conv1d_step: x [S, C] (or whole in_proj_qkvz rows with `qkvz_layout`
    (hk, dk, r dv), read in place), weight [C, K], state pool [N, C, K-1] (updated in place), slots [S], fresh [S]
    bool -> y [S, C] in x's dtype."""
    S = x.shape[0]
    C, K = weight.shape
    if not state.is_contiguous() or not weight.is_contiguous():
        raise ValueError("the conv state pool and the conv weight must be contiguous")
    if K < 2:
        raise ValueError(f"conv kernel width must be at least 2, got {K}")
    hk, dk, rdv = _checked_layout(qkvz_layout, x.shape[1], C)
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(S, C, device=x.device, dtype=x.dtype)
    BC = 256
    pdl = launch_pdl(x)
    _conv_step_kernel[(S, triton.cdiv(C, BC))](x, weight, state, slots, fresh, y, C, x.stride(0), y.stride(0),
                                               state.stride(0), K=K, BK=triton.next_power_of_2(K - 1), BC=BC,
                                               ACT=activation, GROUPED=qkvz_layout is not None, HK=hk, DK=dk,
                                               RDV=rdv, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return y
