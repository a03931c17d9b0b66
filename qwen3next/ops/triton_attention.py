"""Paged decode attention in Triton (flash-decoding), and the KV-cache write.

Decode: one query token per sequence reads its keys and values straight from the KV pages — no gathered copy of
the cache — split along the context so that even one sequence keeps every SM busy; the splits are merged with
their log-sum-exp weights, and the attention output gate (out * sigmoid(gate)) is applied in the merge.

KV write: the new keys and values stored at their slots, in place, one kernel for both. (Written as index_copy_
inside the compiled decode layer, it was six kernels per attention layer, 16 us at 4K, and the step's time grew
with the cache: +102 us per attention layer from 4K to 32K, now +20 us, the extra keys' read time; H100, 2026-11-23.)

References: ops.attention.paged_attention (decode branch) and ops.attention.write_kv; benchmarks/check_gpu.py
compares them on the GPU, tests/triton_interpreter_checks.py in Triton's CPU interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_pdl, wait_for_predecessor

# Block shape of the split kernel: BLOCK_N keys per inner step (at most a page), the warps, the software-pipeline
# stages, and how many programs a step aims for (the splits follow from it). `benchmarks/tune_decode_kernels.py
# --only attention` swept 108 shapes (H100, 2026-11-23, benchmarks/results/tune_attention_2026-11-23.json) at
# 4K / 32K tokens, batch 1 / 16, 80B-A3B and Qwen3-32B heads: this one is within 11% of the best in every case
# and 3% on average; at batch 1 and 32K it reads the cache at 1.6x the copy time (35.6 vs 22.4 us).
DECODE_CONFIG = {"block_n": 64, "num_warps": 4, "num_stages": 2, "programs": 264}


@triton.jit
def _decode_split_kernel(Q, K, V, PT, CTX, O, M, L, scale, stride_qs, stride_qh, stride_kr, stride_kh,
                         stride_pts, table_width, stride_os, stride_oh, stride_osp, stride_ms, stride_mh,
                         SPLITS, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                         BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """Grid (sequence, kv head, split): the G query heads of one kv head against one split's keys."""
    wait_for_predecessor(PDL)     # the newest key was written by the kernel just before
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(CTX + s)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    g_ok = g < G
    q = tl.load(Q + s * stride_qs + (kvh * G + g)[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    offs = tl.arange(0, BLOCK_N)
    # this sequence's key blocks are dealt evenly to the SPLITS programs: the work follows its own context length,
    # not the batch's maximum, so a CUDA graph captured for the longest context costs nothing extra on short ones
    n_blocks = tl.minimum((ctx + BLOCK_N - 1) // BLOCK_N, table_width * (PAGE // BLOCK_N))
    per_split = (n_blocks + SPLITS - 1) // SPLITS
    first = split * per_split
    last = tl.minimum(first + per_split, n_blocks)
    for blk in range(first, last):
        start = blk * BLOCK_N
        tok = start + offs
        valid = tok < ctx
        page_id = tl.load(PT + s * stride_pts + start // PAGE)
        rows = page_id * PAGE + start % PAGE + offs
        k = tl.load(K + rows[:, None] * stride_kr + kvh * stride_kh + d[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)       # a split past the context sees no keys
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        v = tl.load(V + rows[:, None] * stride_kr + kvh * stride_kh + d[None, :], mask=valid[:, None], other=0.0)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = m_new
    h = kvh * G + g
    tl.store(O + s * stride_os + h[:, None] * stride_oh + split * stride_osp + d[None, :], acc, mask=g_ok[:, None])
    tl.store(M + s * stride_ms + h * stride_mh + split, m, mask=g_ok)
    tl.store(L + s * stride_ms + h * stride_mh + split, l, mask=g_ok)


@triton.jit
def _merge_kernel(O, M, L, GATE, OUT, Hq, stride_os, stride_oh, stride_osp, stride_ms, stride_mh, stride_gs,
                  stride_gh, stride_outs, stride_outh, SPLITS: tl.constexpr, BLOCK_SP: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GATE: tl.constexpr, PDL: tl.constexpr):
    """Grid (sequence x query head, block of BLOCK_D columns): softmax over all keys =
    sum_i exp(m_i - M) acc_i / sum_i exp(m_i - M) l_i, the partial outputs read CHUNK splits at a time; then the
    output gate. Several column blocks per head keep more SMs reading than one program per head did."""
    wait_for_predecessor(PDL)
    s = tl.program_id(0) // Hq
    h = tl.program_id(0) % Hq
    ms = M + s * stride_ms + h * stride_mh
    sp = tl.arange(0, BLOCK_SP)
    m = tl.load(ms + sp, mask=sp < SPLITS, other=float("-inf"))
    l = tl.load(L + s * stride_ms + h * stride_mh + sp, mask=sp < SPLITS, other=0.0)
    top = tl.max(m, 0)
    denom = tl.sum(l * tl.exp(m - top), 0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c in range(0, SPLITS, CHUNK):
        spc = c + tl.arange(0, CHUNK)
        ok = spc < SPLITS
        w = tl.exp(tl.load(ms + spc, mask=ok, other=float("-inf")) - top)
        o = tl.load(O + s * stride_os + h * stride_oh + spc[:, None] * stride_osp + d[None, :], mask=ok[:, None],
                    other=0.0)
        acc += tl.sum(o * w[:, None], 0)
    out = acc / denom
    if HAS_GATE:
        out = out * tl.sigmoid(tl.load(GATE + s * stride_gs + h * stride_gh + d).to(tl.float32))
    tl.store(OUT + s * stride_outs + h * stride_outh + d, out.to(OUT.dtype.element_ty))


def paged_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor,
                           context_lens: torch.Tensor, max_context_len: int, scale: float,
                           gate: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """q [S, Hq, D] (one token per sequence) -> [S, Hq, D], times sigmoid(gate [S, Hq, D]) when a gate is given.
    `max_context_len` (a host int, an upper bound of context_lens) only sets the number of splits; each
    sequence's work follows its own context length. `config` overrides DECODE_CONFIG (the tuning sweep)."""
    cfg = {**DECODE_CONFIG, **(config or {})}
    S, Hq, D = q.shape
    num_pages, page, Hkv, _ = k_pages.shape
    G = Hq // Hkv
    block_n = min(cfg["block_n"], page)
    if page % block_n or D & (D - 1):
        raise ValueError(f"paged decode attention needs a power-of-two head_dim and block_n | page size "
                         f"(head_dim {D}, page {page}, block_n {block_n})")
    if gate is not None and (gate.shape != q.shape or gate.stride(-1) != 1):
        raise ValueError(f"the output gate must be [S, Hq, D] = {tuple(q.shape)} with unit stride in D, got "
                         f"{tuple(gate.shape)} strides {gate.stride()}")
    blocks_total = max(1, -(-max_context_len // block_n))
    splits = max(1, min(blocks_total, -(-cfg["programs"] // (S * Hkv))))
    o = torch.empty(S, Hq, splits, D, device=q.device, dtype=torch.float32)
    m = torch.empty(S, Hq, splits, device=q.device, dtype=torch.float32)
    l_ = torch.empty_like(m)
    kf, vf = k_pages.view(-1, Hkv, D), v_pages.view(-1, Hkv, D)
    # the engine's int64 tables as they are: no conversion of a table as wide as the longest context in every
    # layer, and 64-bit row offsets (page id x page size x row stride passes 2^31 in a KV pool of a few GiB)
    pt, ctx = page_table.long(), context_lens.long()
    pdl = launch_pdl(q)
    _decode_split_kernel[(S, Hkv, splits)](
        q, kf, vf, pt, ctx, o, m, l_, scale, q.stride(0), q.stride(1), kf.stride(0), kf.stride(1), pt.stride(0),
        pt.shape[1], o.stride(0), o.stride(1), o.stride(2), m.stride(0), m.stride(1), splits,
        G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), D=D, PAGE=page, BLOCK_N=block_n,
        PDL=pdl, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], launch_pdl=pdl)
    # merge the splits (and gate) in one kernel (as torch ops: ~8 small kernels in every attention layer)
    out = torch.empty(S, Hq, D, device=q.device, dtype=q.dtype)
    # [64 splits x 32 columns] per step: the profile of the version reading 16 x 256 (one program per head) put the
    # merge at 6 us (4K) and 11 us (32K) per layer, latency of its serial chunks rather than bytes (1-2 MB)
    block_d, block_sp = min(D, 32), triton.next_power_of_2(splits)
    g_ = gate if gate is not None else out          # not read without a gate
    _merge_kernel[(S * Hq, D // block_d)](
        o, m, l_, g_, out, Hq, o.stride(0), o.stride(1), o.stride(2), m.stride(0), m.stride(1), g_.stride(0),
        g_.stride(1), out.stride(0), out.stride(1), SPLITS=splits, BLOCK_SP=block_sp, CHUNK=min(64, block_sp),
        BLOCK_D=block_d, HAS_GATE=gate is not None, PDL=pdl, launch_pdl=pdl)
    return out


@triton.jit
def _write_kv_kernel(KN, VN, KP, VP, SLOTS, stride_kn, stride_kh, stride_vn, stride_vh, stride_pr, stride_ph,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """Grid (new token, kv head): its key and value rows copied to flat row SLOTS[token] of the pages."""
    wait_for_predecessor(PDL)
    n = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(SLOTS + n).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    k = tl.load(KN + n * stride_kn + h * stride_kh + d, mask=ok)
    v = tl.load(VN + n * stride_vn + h * stride_vh + d, mask=ok)
    tl.store(KP + row * stride_pr + h * stride_ph + d, k.to(KP.dtype.element_ty), mask=ok)
    tl.store(VP + row * stride_pr + h * stride_ph + d, v.to(VP.dtype.element_ty), mask=ok)


def write_kv(k_pages: torch.Tensor, v_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Same contract as ops.attention.write_kv: k, v [N, Hkv, D] stored at flat rows slot_mapping [N], in place."""
    N, Hkv, D = k.shape
    if not (k_pages.is_contiguous() and v_pages.is_contiguous() and k_pages.stride() == v_pages.stride()):
        raise ValueError("the K and V pages must be contiguous pools of one shape")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("new keys and values must be contiguous in head_dim")
    if N == 0:
        return
    kf = k_pages.view(-1, Hkv, D)
    pdl = launch_pdl(k)
    _write_kv_kernel[(N, Hkv)](k, v, k_pages, v_pages, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
                               v.stride(1), kf.stride(0), kf.stride(1), D=D, BLOCK_D=triton.next_power_of_2(D),
                               PDL=pdl, num_warps=1 if D <= 256 else 4, launch_pdl=pdl)
