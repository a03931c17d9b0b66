"""Prefill attention through torch's scaled_dot_product_attention, its backend steered on CUDA.

For Qwen3-Next's heads (head_dim 256, GQA) torch 2.11 on an H100 picks cuDNN's attention: the fastest kernel we
have (13.1 ms for one layer's causal attention over 32K tokens, FlashAttention-2 27.8 ms), but cuDNN builds an
execution plan for every new shape: 43-61 ms the first time a prompt length appears, and for a later chunk's
boolean mask 64-75 ms (1.2-2.0 s for the first two) (benchmarks/attention_backends.py,
results/attention_backends_2026-11-24.json). A server sees new lengths all the time, and chunked prefill and the
MTP head's catch-up make new (queries, keys) pairs at every step. Steered:

- a chunk that starts its sequence (plain causal attention): FlashAttention below CUDNN_MIN_TOKENS tokens, which
  builds nothing (0.1-0.2 ms the first time; 0.06 ms at 1K tokens, where cuDNN's kernel saves 0.03 ms a layer);
  from CUDNN_MIN_TOKENS on, cuDNN with the length padded up to a multiple of CUDNN_BUCKET, so that plans exist for
  a few lengths only. The padding rows come after every real row: no causal query sees them.
- a later chunk (its queries are the last n of its keys): the bottom-right causal bias instead of a boolean mask,
  which torch runs with FlashAttention: no plan, no mask to read (6.4 ms against 8.7 ms for 4K queries over 32K
  keys with cuDNN and the mask).

CPU, autograd (training) and STEER["enabled"] = False keep torch's own choice with the same arguments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

# enabled: "auto" = on CUDA without autograd, True = also on CPU (tests), False = never
STEER = {"enabled": "auto", "cudnn_min_tokens": 4096, "cudnn_bucket": 1024}

_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]
_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _steered(q: torch.Tensor, *more: torch.Tensor) -> bool:
    on = STEER["enabled"]
    if on == "auto":
        on = q.is_cuda
    return bool(on) and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, *more)))


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, L, D], k/v [B, Hkv, L, D] -> [B, Hq, L, D]: each query sees the keys up to its own position."""
    gqa = q.shape[1] != k.shape[1]
    if not _steered(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    L = q.shape[2]
    if L < STEER["cudnn_min_tokens"]:
        with sdpa_kernel(_NO_CUDNN):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    pad = -L % STEER["cudnn_bucket"]
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    with sdpa_kernel(_CUDNN_FIRST):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return out[:, :, :L] if pad else out


def chunk_over_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, n, D] the last n positions of k/v [B, Hkv, ctx, D]: query i (position ctx - n + i) sees keys
    0..ctx - n + i (bottom-right causal) -> [B, Hq, n, D]."""
    n, ctx = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if not _steered(q, k, v):
        qpos = ctx - n + torch.arange(n, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    with sdpa_kernel(_NO_CUDNN):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, ctx), scale=scale,
                                              enable_gqa=gqa)
