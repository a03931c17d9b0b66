"""The op table the model calls. Each op runs its GPU kernel when its inputs are on CUDA and the kernel is
available (ops/cuda.py), else the torch reference (ops/*.py) — which stays the CPU path and the test oracle.

QWEN3NEXT_KERNELS=torch forces the references everywhere (used to compare GPU kernels against them).
`use(name=fn)` replaces an op outright (tests, experiments); `reset()` undoes it.
"""
from __future__ import annotations

import os

import torch

from . import attention as _attn
from . import conv1d as _conv
from . import cuda as _cuda
from . import gated_delta as _gdr
from . import moe as _moe

_overrides: dict = {}


_TORCH_ONLY = os.environ.get("QWEN3NEXT_KERNELS", "auto") == "torch"   # read once: compiled code cannot

# Kernels that pass their checks in Triton's CPU interpreter and compile for sm_90, but have not yet been run and
# timed on a GPU (no GPU was lent when they were written): the fused routing (ops/triton_moe.route) and the
# in-place Gated DeltaNet decode step (ops/triton_gdn.py). Off unless QWEN3NEXT_NEW_KERNELS=1; then
# `python benchmarks/check_gpu.py --only gdn_decode,moe_decode,e2e` checks and times them.
NEW_KERNELS = os.environ.get("QWEN3NEXT_NEW_KERNELS", "0") == "1"


def _gpu(x) -> bool:
    return x.is_cuda and not _TORCH_ONLY


def chunk_gated_delta_rule(q, k, v, g, beta, **kw):
    if "chunk_gated_delta_rule" in _overrides:
        return _overrides["chunk_gated_delta_rule"](q, k, v, g, beta, **kw)
    if _gpu(q) and _cuda.has_fla() and (not _needs_grad(q, k, v, g, beta) or _cuda.fla_backward_ok()):
        return _cuda.chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    return _gdr.chunk_gated_delta_rule(q, k, v, g, beta, **kw)


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def recurrent_gated_delta_rule(q, k, v, g, beta, **kw):
    if "recurrent_gated_delta_rule" in _overrides:
        return _overrides["recurrent_gated_delta_rule"](q, k, v, g, beta, **kw)
    if _gpu(q) and _cuda.has_fla():
        return _cuda.recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
    return _gdr.recurrent_gated_delta_rule(q, k, v, g, beta, **kw)


def gated_delta_decode(q, k, v, a, b, A_log, dt_bias, state, slots, fresh):
    """A decode step of the delta rule, each sequence's recurrent state updated in place in the pool."""
    if "gated_delta_decode" in _overrides:
        return _overrides["gated_delta_decode"](q, k, v, a, b, A_log, dt_bias, state, slots, fresh)
    if (NEW_KERNELS and _gpu(q) and _cuda.has_triton() and state.dtype == torch.float32
            and not _needs_grad(q, k, v, a, b)):
        from .custom_ops import gdn_decode
        return gdn_decode(q, k, v, a, b, A_log, dt_bias, state, slots, fresh, None)
    # gather the states, the recurrent kernel (fla's on GPU), scatter them back
    return _gdr.gated_delta_decode(q, k, v, a, b, A_log, dt_bias, state, slots, fresh,
                                   rule=recurrent_gated_delta_rule)


def experts_forward(x, gate_up, down, ids, weights):
    if "experts_forward" in _overrides:
        return _overrides["experts_forward"](x, gate_up, down, ids, weights)
    if _gpu(x) and _cuda.has_grouped_mm():
        if x.dtype == gate_up.dtype == torch.bfloat16 and (not _needs_grad(x, gate_up, down, weights)
                                                          or _cuda.grouped_mm_backward_ok()):
            return _cuda.experts_forward(x, gate_up, down, ids, weights)
        if (torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
                and _cuda.grouped_mm_backward_ok()):
            # training with fp32 master weights: the bf16 copies autocast would make for a matmul anyway
            bf = torch.bfloat16
            return _cuda.experts_forward(x.to(bf), gate_up.to(bf), down.to(bf), ids, weights.to(bf))
    return _moe.experts_forward(x, gate_up, down, ids, weights)


# up to this many tokens, the MoE block runs as ops/triton_moe.py's two fused kernels (reading each selected
# expert once per token); above it, sorted grouped GEMMs read each hit expert once for all its tokens. H100,
# 80B-A3B shapes, both in CUDA graphs (benchmarks/check_gpu.py --only moe_decode): the fused kernels took 0.43x
# the grouped path's time at 1 token, 0.80x at 16, 0.89x at 64; larger batches were not measured.
MOE_DECODE_MAX_TOKENS = 64


def moe_decode_applies(x) -> bool:
    return ("moe_decode" in _overrides or (_gpu(x) and _cuda.has_triton() and x.shape[0] <= MOE_DECODE_MAX_TOKENS
                                           and not _needs_grad(x)))


def moe_decode(x, gate_up, down, ids, weights, shared_gate, shared_up, shared_down, shared_weight):
    """Routed experts plus the shared expert (weighted by shared_weight [T, 1]) for a few tokens -> [T, H]."""
    if "moe_decode" in _overrides:
        return _overrides["moe_decode"](x, gate_up, down, ids, weights, shared_gate, shared_up, shared_down,
                                        shared_weight)
    from .custom_ops import moe_decode as fused
    y = fused(x, gate_up, down, ids, weights, shared_gate, shared_up, shared_down, shared_weight)
    return y.sum(1, dtype=torch.float32).to(x.dtype)   # in a compiled layer this fuses with the residual add


def causal_conv1d(x, weight, initial_state=None, **kw):
    if "causal_conv1d" in _overrides:
        return _overrides["causal_conv1d"](x, weight, initial_state, **kw)
    # prefill chunks on GPU: fla's Triton conv (one kernel, varlen); a decode step stays in torch, where the
    # compiled decode layer fuses it with its neighbours
    if (_gpu(x) and x.shape[1] > 1 and not kw.get("output_all_states") and _cuda.has_fla()
            and not _needs_grad(x, weight)):
        return _cuda.causal_conv1d(x, weight, initial_state, **kw)
    return _conv.causal_conv1d(x, weight, initial_state, **kw)


def causal_attention(q, k, v, scale):
    if "causal_attention" in _overrides:
        return _overrides["causal_attention"](q, k, v, scale)
    return _attn.causal_attention(q, k, v, scale)   # SDPA: FlashAttention kernels on GPU


def paged_attention(q, k_pages, v_pages, meta, scale):
    if "paged_attention" in _overrides:
        return _overrides["paged_attention"](q, k_pages, v_pages, meta, scale)
    if _gpu(q) and (meta.is_decode or meta.is_verify) and _cuda.has_triton():
        from .custom_ops import paged_decode_attention
        if meta.is_decode:
            return paged_decode_attention(q, k_pages, v_pages, meta.page_table, meta.context_lens,
                                          meta.max_context_len, scale)
        # verification: every query token is its own "sequence" over its sequence's pages, seeing keys <= itself
        return paged_decode_attention(q, k_pages, v_pages, meta.page_table[meta.token_seq], meta.positions + 1,
                                      meta.max_context_len, scale)
    return _attn.paged_attention(q, k_pages, v_pages, meta, scale)


def write_kv(k_pages, v_pages, k, v, slot_mapping):
    return _attn.write_kv(k_pages, v_pages, k, v, slot_mapping)


def route(router_logits, top_k, norm_topk_prob):
    if "route" in _overrides:
        return _overrides["route"](router_logits, top_k, norm_topk_prob)
    if NEW_KERNELS and _gpu(router_logits) and _cuda.has_triton() and not _needs_grad(router_logits):
        from .custom_ops import route as fused       # softmax + top-k + renormalisation in one kernel
        return fused(router_logits, top_k, norm_topk_prob)
    return _moe.route(router_logits, top_k, norm_topk_prob)


_NAMES = {"chunk_gated_delta_rule", "recurrent_gated_delta_rule", "experts_forward", "causal_conv1d",
          "causal_attention", "paged_attention", "moe_decode", "route", "gated_delta_decode"}


def use(**ops) -> None:
    for name, fn in ops.items():
        if name not in _NAMES:
            raise KeyError(f"unknown op {name!r}; known: {sorted(_NAMES)}")
        _overrides[name] = fn


def reset() -> None:
    _overrides.clear()
