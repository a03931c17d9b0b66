"""Gated softmax attention (Qwen3-Next) and plain attention (dense Qwen3): GQA, per-head q/k RMSNorm applied
before a partial rotary embedding, and in Qwen3-Next an elementwise sigmoid gate on the output.

q_proj rows are interleaved per head: head h owns [query (D) | gate (D)]."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..ops import kernels
from .linear import Linear, project
from .cache import BatchMeta, KVPages
from .norm import RMSNorm
from .rope import apply_rope


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.gated = cfg.attn_output_gate
        self.scale = self.head_dim ** -0.5
        zc = cfg.model_type == "qwen3_next"
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim * (2 if self.gated else 1), bias=bias)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, zero_centered=zc)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, zero_centered=zc)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVPages | None = None,
                meta: BatchMeta | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)      # one launch at batch 1 on GPU
        q = q.view(B, T, self.n_heads, -1)
        gate = None
        if self.gated:
            q, gate = q.split(self.head_dim, dim=-1)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        qn, kn = self.q_norm, self.k_norm
        if B == 1:  # packed rows (every cached batch): q/k norms, rotation and the KV write, one pass on GPU
            pages = () if kv is None else (kv.k, kv.v, meta.slot_mapping)
            q, k = kernels.qk_norm_rope(q[0], k[0], v[0], qn.weight, kn.weight, qn.eps, qn.zero_centered,
                                        cos.reshape(T, -1), sin.reshape(T, -1), *pages)
            q, k = q[None], k[None]
        else:
            q, k = apply_rope(qn(q), cos, sin), apply_rope(kn(k), cos, sin)
        if kv is None:
            out = kernels.causal_attention(q, k, v, self.scale)
            if gate is not None:
                out = out * torch.sigmoid(gate)
        else:  # packed batch (B == 1): the new keys are stored; attend over each sequence's pages (and gate)
            out = kernels.paged_attention(q[0], kv.k, kv.v, meta, self.scale,
                                          gate=None if gate is None else gate[0], k=k[0], v=v[0])[None]
        return self.o_proj(out.reshape(B, T, -1))
