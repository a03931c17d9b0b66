"""The GPU kernels that torch.compile must treat as opaque calls, registered as torch custom ops.

A compiled decode layer (ops/fused.decode_compiled) fuses the small torch ops around these calls; the kernels
themselves (flash-linear-attention's fused recurrent delta rule, our Triton paged decode attention) are launched
as they are. Each op has a "fake" implementation that only states the output shapes, which is all the compiler
needs. The implementations import their GPU libraries lazily, so registering the ops costs nothing on CPU.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("qwen3next::gdn_recurrent", mutates_args=())
def gdn_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  initial_state: torch.Tensor | None, scale: float | None,
                  use_qk_l2norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's fused recurrent gated delta rule on [B, T, H, d] inputs -> (o like v, final state fp32 [B, Hv, dk, dv])."""
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_rec
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    o, s = fla_rec(q.contiguous(), k.contiguous(), v.contiguous(), g=g.float().contiguous(),
                   beta=beta.to(q.dtype).contiguous(), scale=scale, initial_state=initial_state,
                   output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm)
    return o.to(v.dtype), s


@gdn_recurrent.register_fake
def _(q, k, v, g, beta, initial_state, scale, use_qk_l2norm):
    B, _, Hv, dv = v.shape
    return torch.empty_like(v), v.new_empty(B, Hv, k.shape[-1], dv, dtype=torch.float32)


@torch.library.custom_op("qwen3next::paged_decode_attention", mutates_args=())
def paged_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           page_table: torch.Tensor, context_lens: torch.Tensor, max_context_len: int,
                           scale: float) -> torch.Tensor:
    """ops/triton_attention.paged_decode_attention: q [S, Hq, D] -> [S, Hq, D]."""
    from .triton_attention import paged_decode_attention as kernel
    return kernel(q, k_pages, v_pages, page_table, context_lens, max_context_len, scale)


@paged_decode_attention.register_fake
def _(q, k_pages, v_pages, page_table, context_lens, max_context_len, scale):
    return torch.empty_like(q)
