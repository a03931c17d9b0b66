"""The GPU kernels that torch.compile must treat as opaque calls, registered as torch custom ops.

A compiled decode layer (ops/fused.decode_compiled) fuses the small torch ops around these calls; the kernels
themselves (flash-linear-attention's fused recurrent delta rule, our Triton paged decode attention and KV write,
attention's q/k norm + rotation + KV write, decode MoE, routing and GDN decode step) are launched as they are. Each op has a "fake" implementation that only
states the output shapes, which is all the compiler needs. The decode MoE, routing, conv and GDN steps, the
one-row linear, the paged decode attention, the KV write and the q/k preparation also have a CPU kernel, the torch reference, so that
CPU tests can trace and run them inside a compiled decode layer. The implementations import their GPU libraries
lazily, so registering the ops costs nothing on CPU.
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
                           scale: float, gate: torch.Tensor | None = None) -> torch.Tensor:
    """ops/triton_attention.paged_decode_attention: q [S, Hq, D] -> [S, Hq, D] (times sigmoid(gate))."""
    from .triton_attention import paged_decode_attention as kernel
    return kernel(q, k_pages, v_pages, page_table, context_lens, max_context_len, scale, gate)


@paged_decode_attention.register_kernel("cpu")
def _(q, k_pages, v_pages, page_table, context_lens, max_context_len, scale, gate=None):
    """The torch reference, each row of q being one sequence's newest token (as the GPU kernel reads it)."""
    from types import SimpleNamespace
    from .attention import paged_attention as reference
    S = q.shape[0]
    rows = torch.arange(S)
    meta = SimpleNamespace(is_decode=True, is_verify=False, page_table=page_table, context_lens=context_lens,
                           max_q_len=1, max_context_len=max_context_len, token_seq=rows,
                           token_index=torch.zeros_like(rows), positions=context_lens - 1)
    out = reference(q, k_pages, v_pages, meta, scale)
    return out if gate is None else out * torch.sigmoid(gate)


@paged_decode_attention.register_fake
def _(q, k_pages, v_pages, page_table, context_lens, max_context_len, scale, gate=None):
    return torch.empty_like(q)


@torch.library.custom_op("qwen3next::write_kv", mutates_args=("k_pages", "v_pages"))
def write_kv(k_pages: torch.Tensor, v_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """ops/triton_attention.write_kv: new keys and values stored at their page rows, in place."""
    from .triton_attention import write_kv as kernel
    kernel(k_pages, v_pages, k, v, slot_mapping)


@write_kv.register_kernel("cpu")
def _(k_pages, v_pages, k, v, slot_mapping):
    from .attention import write_kv as reference
    reference(k_pages, v_pages, k, v, slot_mapping)


@torch.library.custom_op("qwen3next::qk_norm_rope_kv", mutates_args=("k_pages", "v_pages"))
def qk_norm_rope_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                    k_weight: torch.Tensor, eps: float, zero_centered: bool, cos: torch.Tensor, sin: torch.Tensor,
                    k_pages: torch.Tensor, v_pages: torch.Tensor,
                    slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ops/triton_rope.qk_norm_rope with the KV write: (q, k) normed and rotated, k and v stored in the pages."""
    from .triton_rope import qk_norm_rope as kernel
    return kernel(q, k, v, q_weight, k_weight, eps, zero_centered, cos, sin, k_pages, v_pages, slot_mapping)


@qk_norm_rope_kv.register_kernel("cpu")
def _(q, k, v, q_weight, k_weight, eps, zero_centered, cos, sin, k_pages, v_pages, slot_mapping):
    from .attention import write_kv
    from .rope import qk_norm_rope
    qo, ko = qk_norm_rope(q, k, q_weight, k_weight, eps, zero_centered, cos, sin)
    write_kv(k_pages, v_pages, ko, v, slot_mapping)
    return qo, ko


@qk_norm_rope_kv.register_fake
def _(q, k, v, q_weight, k_weight, eps, zero_centered, cos, sin, k_pages, v_pages, slot_mapping):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("qwen3next::moe_decode", mutates_args=())
def moe_decode(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
               shared_gate: torch.Tensor, shared_up: torch.Tensor, shared_down: torch.Tensor,
               shared_weight: torch.Tensor) -> torch.Tensor:
    """ops/triton_moe.moe_decode: x [T, H] -> per-slot expert outputs [T, k + 1, H] in fp32."""
    from .triton_moe import moe_decode as kernel
    return kernel(x, gate_up, down, ids, weights, shared_gate, shared_up, shared_down, shared_weight)


@moe_decode.register_kernel("cpu")
def _(x, gate_up, down, ids, weights, shared_gate, shared_up, shared_down, shared_weight):
    from .moe import moe_per_slot
    return moe_per_slot(x, gate_up, down, ids, weights, shared_gate, shared_up, shared_down, shared_weight)


@moe_decode.register_fake
def _(x, gate_up, down, ids, weights, shared_gate, shared_up, shared_down, shared_weight):
    acc = torch.promote_types(x.dtype, torch.float32)
    return x.new_empty(x.shape[0], ids.shape[1] + 1, x.shape[1], dtype=acc)


@torch.library.custom_op("qwen3next::route", mutates_args=())
def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ops/triton_moe.route: router logits [T, E] -> (weights [T, k], expert ids [T, k] int64)."""
    from .triton_moe import route as kernel
    return kernel(router_logits, top_k, norm_topk_prob)


@route.register_kernel("cpu")
def _(router_logits, top_k, norm_topk_prob):
    from .moe import route as reference
    w, ids = reference(router_logits, top_k, norm_topk_prob)
    return w.contiguous(), ids.contiguous()


@route.register_fake
def _(router_logits, top_k, norm_topk_prob):
    T = router_logits.shape[0]
    return router_logits.new_empty(T, top_k), router_logits.new_empty(T, top_k, dtype=torch.long)


@torch.library.custom_op("qwen3next::gdn_decode", mutates_args=("state",))
def gdn_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               A_log: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor, slots: torch.Tensor,
               fresh: torch.Tensor, scale: float | None, z: torch.Tensor | None = None,
               norm_weight: torch.Tensor | None = None, eps: float = 0.0, block_v: int | None = None) -> torch.Tensor:
    """ops/triton_gdn.gated_delta_decode: one token per sequence, the state pool updated in place; with z and
    norm_weight, its output through the gated RMSNorm; block_v: value columns per program."""
    from .triton_gdn import gated_delta_decode as kernel
    return kernel(q, k, v, a, b, A_log, dt_bias, state, slots, fresh, scale, z, norm_weight, eps, block_v)


@gdn_decode.register_kernel("cpu")
def _(q, k, v, a, b, A_log, dt_bias, state, slots, fresh, scale, z=None, norm_weight=None, eps=0.0, block_v=None):
    from .gated_delta import gated_delta_decode as reference
    from .norm import gated_rms_norm
    o = reference(q, k, v, a, b, A_log, dt_bias, state, slots, fresh, scale)
    return o if z is None else gated_rms_norm(o, z.reshape(o.shape), norm_weight, eps)


@gdn_decode.register_fake
def _(q, k, v, a, b, A_log, dt_bias, state, slots, fresh, scale, z=None, norm_weight=None, eps=0.0, block_v=None):
    return torch.empty_like(v)


@torch.library.custom_op("qwen3next::gdn_verify", mutates_args=("state",))
def gdn_verify(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               A_log: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor, slots: torch.Tensor,
               fresh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ops/triton_gdn.gated_delta_verify: T tokens per sequence, the state after each returned, the pool updated."""
    from .triton_gdn import gated_delta_verify as kernel
    return kernel(q, k, v, a, b, A_log, dt_bias, state, slots, fresh)


@gdn_verify.register_kernel("cpu")
def _(q, k, v, a, b, A_log, dt_bias, state, slots, fresh):
    from .gated_delta import gated_delta_verify as reference
    o, states = reference(q, k, v, a, b, A_log, dt_bias, state, slots, fresh)
    return o, states.float()


@gdn_verify.register_fake
def _(q, k, v, a, b, A_log, dt_bias, state, slots, fresh):
    S, T, Hv, dv = v.shape      # outputs are contiguous whatever v's strides (the conv leaves it channels-first)
    return v.new_empty(S, T, Hv, dv), v.new_empty(S, T, Hv, q.shape[-1], dv, dtype=torch.float32)


@torch.library.custom_op("qwen3next::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ops/triton_gemv.gemv: one row x [..., K] times weight [N, K]ᵀ -> [..., N]."""
    from .triton_gemv import gemv as kernel
    return kernel(x, weight)


@gemv.register_kernel("cpu")
def _(x, weight):
    return torch.nn.functional.linear(x, weight)


@gemv.register_fake
def _(x, weight):
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


@torch.library.custom_op("qwen3next::gemv_multi", mutates_args=())
def gemv_multi(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """ops/triton_gemv.gemv_multi: one row x [..., K] times 1-3 weights [N_i, K]ᵀ -> [..., sum N_i]."""
    from .triton_gemv import gemv_multi as kernel
    return kernel(x, weights)


@gemv_multi.register_kernel("cpu")
def _(x, weights):
    return torch.cat([torch.nn.functional.linear(x, w) for w in weights], dim=-1)


@gemv_multi.register_fake
def _(x, weights):
    return x.new_empty(x.shape[:-1] + (sum(w.shape[0] for w in weights),))


@torch.library.custom_op("qwen3next::conv_step", mutates_args=("state",))
def conv_step(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, slots: torch.Tensor,
              fresh: torch.Tensor, activation: bool = True, qkvz_layout: list[int] | None = None) -> torch.Tensor:
    """ops/triton_conv.causal_conv1d_step: a decode step of the short conv, the state pool updated in place."""
    from .triton_conv import causal_conv1d_step as kernel
    return kernel(x, weight, state, slots, fresh, activation, qkvz_layout)


@conv_step.register_kernel("cpu")
def _(x, weight, state, slots, fresh, activation=True, qkvz_layout=None):
    from .conv1d import causal_conv1d_step as reference
    return reference(x, weight, state, slots, fresh, activation, qkvz_layout)


@conv_step.register_fake
def _(x, weight, state, slots, fresh, activation=True, qkvz_layout=None):
    return x.new_empty(x.shape[0], weight.shape[0])
