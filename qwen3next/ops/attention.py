"""Softmax attention with GQA: a dense causal form (training, full forward) and a paged form (serving). Prefill
attention goes through ops/sdpa.py, which on CUDA picks torch's SDPA backend per chunk (no per-shape cuDNN plans).

Paged KV: each attention layer owns k_pages / v_pages [num_pages, page_size, kv_heads, head_dim]; a sequence's
token at position p lives in page page_table[seq, p // page_size], row p % page_size.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from . import sdpa


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]."""
    return sdpa.causal(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale).transpose(1, 2)


def write_kv(k_pages: torch.Tensor, v_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys/values k, v [N, Hkv, D] at flat rows slot_mapping [N] (= page * page_size + offset)."""
    k_pages.view(-1, *k_pages.shape[2:]).index_copy_(0, slot_mapping, k.to(k_pages.dtype))
    v_pages.view(-1, *v_pages.shape[2:]).index_copy_(0, slot_mapping, v.to(v_pages.dtype))


def paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, meta, scale: float,
                    k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of packed queries q [N, Hq, D] over each sequence's cached keys [0, context_lens[i]); a query at
    position p sees keys <= p. `meta` is a BatchMeta (page table, positions, token -> sequence maps). k, v
    [N, Hkv, D]: the keys and values of this step (already written to the pages), which a prefill chunk that
    starts a sequence attends to directly instead of gathering them back from the pages.

    Decode steps (one query per sequence) and uniform verification steps (a few per sequence) run as one padded
    SDPA call over gathered keys. Batches with prefill chunks run per sequence, so no [S, Lq, Lk] mask is ever
    built for long prompts.
    """
    if not (meta.is_decode or meta.is_verify):
        return _paged_prefill(q, k_pages, v_pages, meta, scale, k, v)
    S, Lq, Lk = meta.page_table.shape[0], meta.max_q_len, meta.max_context_len
    N, Hq, D = q.shape
    ps = k_pages.shape[1]
    dev = q.device
    # key side: the flat row of every (sequence, key position)
    kpos = torch.arange(Lk, device=dev)
    page_idx = (kpos // ps).clamp_max(meta.page_table.shape[1] - 1).expand(S, -1)
    rows = meta.page_table.gather(1, page_idx) * ps + kpos % ps
    key_valid = kpos[None, :] < meta.context_lens[:, None]                        # [S, Lk]
    rows = torch.where(key_valid, rows, torch.zeros_like(rows))
    kf = k_pages.view(-1, *k_pages.shape[2:])[rows]                               # [S, Lk, Hkv, D]
    vf = v_pages.view(-1, *v_pages.shape[2:])[rows]
    # query side: scatter packed rows into [S, Lq]
    qp = q.new_zeros(S, Lq, Hq, D)
    qp[meta.token_seq, meta.token_index] = q
    qpos = torch.full((S, Lq), -1, dtype=meta.positions.dtype, device=dev)
    qpos[meta.token_seq, meta.token_index] = meta.positions
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & key_valid[:, None, :]       # [S, Lq, Lk]
    mask = mask | (qpos[:, :, None] < 0)  # padded query rows: attend anywhere, result discarded (avoids NaN)
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), kf.transpose(1, 2).to(q.dtype),
                                         vf.transpose(1, 2).to(q.dtype), attn_mask=mask[:, None], scale=scale,
                                         enable_gqa=Hq != kf.shape[2])
    return out.transpose(1, 2)[meta.token_seq, meta.token_index]                  # [N, Hq, D]


def _paged_prefill(q, k_pages, v_pages, meta, scale, k_new=None, v_new=None):
    ps = k_pages.shape[1]
    flat_k, flat_v = k_pages.view(-1, *k_pages.shape[2:]), v_pages.view(-1, *v_pages.shape[2:])
    cu = [0, *itertools.accumulate(meta.q_lens)]                           # host copy: no device sync
    outs = []
    for i, (start, n) in enumerate(zip(meta.start_positions, meta.q_lens)):
        qi = q[cu[i]:cu[i + 1]].transpose(0, 1)[None]                        # [1, Hq, n, D]
        if start == 0 and k_new is not None:   # the whole context is this chunk: its own keys, no gather
            ki = k_new[cu[i]:cu[i + 1]].transpose(0, 1)[None].to(q.dtype)
            vi = v_new[cu[i]:cu[i + 1]].transpose(0, 1)[None].to(q.dtype)
        else:
            kpos = torch.arange(start + n, device=q.device)
            rows = meta.page_table[i].gather(0, kpos // ps) * ps + kpos % ps
            ki = flat_k[rows].transpose(0, 1)[None].to(q.dtype)             # [1, Hkv, ctx, D]
            vi = flat_v[rows].transpose(0, 1)[None].to(q.dtype)
        if start == 0:   # no cached prefix: plain causal attention
            o = sdpa.causal(qi, ki, vi, scale)
        else:            # a later chunk: queries at start..ctx-1 see keys 0..their own position
            o = sdpa.chunk_over_cache(qi, ki, vi, scale)
        outs.append(o[0].transpose(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
