"""Paged decode attention in Triton (flash-decoding): one query token per sequence reads its keys and values
straight from the KV pages — no gathered copy of the cache — split along the context so that even one sequence
keeps every SM busy; the splits are merged with their log-sum-exp weights.

Reference: ops.attention.paged_attention (decode branch); benchmarks/check_gpu.py compares the two.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_split_kernel(Q, K, V, PT, CTX, O, M, L, scale, stride_qs, stride_qh, stride_kr, stride_kh,
                         stride_pts, table_width, stride_os, stride_oh, stride_osp, stride_ms, stride_mh,
                         G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                         SPLITS: tl.constexpr):
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
    offs = tl.arange(0, PAGE)
    # this sequence's pages are dealt evenly to the SPLITS programs: the work follows its own context length,
    # not the batch's maximum, so a CUDA graph captured for the longest context costs nothing extra on short ones
    n_pages = tl.minimum((ctx + PAGE - 1) // PAGE, table_width)
    per_split = (n_pages + SPLITS - 1) // SPLITS
    first = split * per_split
    last = tl.minimum(first + per_split, n_pages)
    for pg in range(first, last):
        tok = pg * PAGE + offs
        valid = tok < ctx
        page_id = tl.load(PT + s * stride_pts + pg)
        rows = page_id * PAGE + offs
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
def _merge_kernel(O, M, L, OUT, Hq, stride_os, stride_oh, stride_osp, stride_ms, stride_mh, stride_outs,
                  stride_outh, SPLITS: tl.constexpr, BLOCK_SP: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr):
    """One (sequence, query head): softmax over all keys = sum_i exp(m_i - M) acc_i / sum_i exp(m_i - M) l_i,
    the partial outputs read CHUNK splits at a time (a whole [SPLITS, D] tile would not fit in registers)."""
    s = tl.program_id(0) // Hq
    h = tl.program_id(0) % Hq
    ms = M + s * stride_ms + h * stride_mh
    sp = tl.arange(0, BLOCK_SP)
    m = tl.load(ms + sp, mask=sp < SPLITS, other=float("-inf"))
    l = tl.load(L + s * stride_ms + h * stride_mh + sp, mask=sp < SPLITS, other=0.0)
    top = tl.max(m, 0)
    denom = tl.sum(l * tl.exp(m - top), 0)
    d = tl.arange(0, D)
    acc = tl.zeros([D], tl.float32)
    for c in range(0, SPLITS, CHUNK):
        spc = c + tl.arange(0, CHUNK)
        ok = spc < SPLITS
        w = tl.exp(tl.load(ms + spc, mask=ok, other=float("-inf")) - top)
        o = tl.load(O + s * stride_os + h * stride_oh + spc[:, None] * stride_osp + d[None, :], mask=ok[:, None],
                    other=0.0)
        acc += tl.sum(o * w[:, None], 0)
    tl.store(OUT + s * stride_outs + h * stride_outh + d, (acc / denom).to(OUT.dtype.element_ty))


def paged_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor,
                           context_lens: torch.Tensor, max_context_len: int, scale: float,
                           target_programs: int = 264) -> torch.Tensor:
    """q [S, Hq, D] (one token per sequence) -> [S, Hq, D]. `max_context_len` (a host int, an upper bound of
    context_lens) only sets the number of splits; each sequence's work follows its own context length."""
    S, Hq, D = q.shape
    num_pages, page, Hkv, _ = k_pages.shape
    G = Hq // Hkv
    pages_total = max(1, -(-max_context_len // page))
    splits = max(1, min(pages_total, -(-target_programs // (S * Hkv))))
    o = torch.empty(S, Hq, splits, D, device=q.device, dtype=torch.float32)
    m = torch.empty(S, Hq, splits, device=q.device, dtype=torch.float32)
    l_ = torch.empty_like(m)
    kf, vf = k_pages.view(-1, Hkv, D), v_pages.view(-1, Hkv, D)
    # the engine's int64 tables as they are: no conversion of a table as wide as the longest context in every
    # layer, and 64-bit row offsets (page id x page size x row stride passes 2^31 in a KV pool of a few GiB)
    pt, ctx = page_table.long(), context_lens.long()
    _decode_split_kernel[(S, Hkv, splits)](
        q, kf, vf, pt, ctx, o, m, l_, scale, q.stride(0), q.stride(1), kf.stride(0), kf.stride(1), pt.stride(0),
        pt.shape[1], o.stride(0), o.stride(1), o.stride(2), m.stride(0), m.stride(1),
        G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), D=D, PAGE=page, SPLITS=splits)
    # merge the splits in one kernel (as torch ops: ~8 small kernels in every attention layer of every step)
    out = torch.empty(S, Hq, D, device=q.device, dtype=q.dtype)
    _merge_kernel[(S * Hq,)](o, m, l_, out, Hq, o.stride(0), o.stride(1), o.stride(2), m.stride(0), m.stride(1),
                             out.stride(0), out.stride(1), SPLITS=splits, BLOCK_SP=triton.next_power_of_2(splits),
                             CHUNK=16, D=D)
    return out
