"""Softmax attention with GQA: a dense causal form (training, full forward) and a paged form (serving).

Paged KV: each attention layer owns k_pages / v_pages [num_pages, page_size, kv_heads, head_dim]; a sequence's
token at position p lives in page page_table[seq, p // page_size], row p % page_size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def write_kv(k_pages: torch.Tensor, v_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys/values k, v [N, Hkv, D] at flat rows slot_mapping [N] (= page * page_size + offset)."""
    k_pages.view(-1, *k_pages.shape[2:]).index_copy_(0, slot_mapping, k.to(k_pages.dtype))
    v_pages.view(-1, *v_pages.shape[2:]).index_copy_(0, slot_mapping, v.to(v_pages.dtype))


def paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor,
                    cu_seqlens: torch.Tensor, positions: torch.Tensor, context_lens: torch.Tensor,
                    scale: float, max_q_len: int, max_context_len: int) -> torch.Tensor:
    """Attention of packed queries q [N, Hq, D] (sequence i owns rows cu_seqlens[i]:cu_seqlens[i+1], at absolute
    `positions`) over each sequence's cached keys [0, context_lens[i]). A query at position p sees keys <= p.

    Sequences are padded to [S, max_q_len] queries and [S, max_context_len] keys so one SDPA call serves a mixed
    batch of prefill chunks and decode steps.
    """
    S = page_table.shape[0]
    N, Hq, D = q.shape
    ps = k_pages.shape[1]
    dev = q.device
    # key side: flat row of every (sequence, key position)
    kpos = torch.arange(max_context_len, device=dev)
    rows = page_table.gather(1, (kpos // ps).expand(S, -1).clamp_max(page_table.shape[1] - 1)) * ps + kpos % ps
    key_valid = kpos[None, :] < context_lens[:, None]                             # [S, Lk]
    rows = torch.where(key_valid, rows, torch.zeros_like(rows))
    kf = k_pages.view(-1, *k_pages.shape[2:])[rows]                               # [S, Lk, Hkv, D]
    vf = v_pages.view(-1, *v_pages.shape[2:])[rows]
    # query side: scatter packed rows into [S, Lq]
    q_lens = cu_seqlens[1:] - cu_seqlens[:-1]
    seq_of = torch.repeat_interleave(torch.arange(S, device=dev), q_lens)
    slot_in_seq = torch.arange(N, device=dev) - cu_seqlens[:-1][seq_of]
    qp = q.new_zeros(S, max_q_len, Hq, D)
    qp[seq_of, slot_in_seq] = q
    qpos = torch.full((S, max_q_len), -1, dtype=positions.dtype, device=dev)
    qpos[seq_of, slot_in_seq] = positions
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & key_valid[:, None, :]       # [S, Lq, Lk]
    mask = mask | (qpos[:, :, None] < 0)  # padded query rows: attend anywhere, result discarded (avoids NaN)
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), kf.transpose(1, 2).to(q.dtype),
                                         vf.transpose(1, 2).to(q.dtype), attn_mask=mask[:, None], scale=scale,
                                         enable_gqa=Hq != kf.shape[2])
    return out.transpose(1, 2)[seq_of, slot_in_seq]                               # [N, Hq, D]
