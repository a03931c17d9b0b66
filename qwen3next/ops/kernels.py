"""The op table the model calls. Each op runs its GPU kernel when its inputs are on CUDA and the kernel is
available (ops/cuda.py), else the torch reference (ops/*.py) — which stays the CPU path and the test oracle.

QWEN3NEXT_KERNELS=torch forces the references everywhere (used to compare GPU kernels against them).
`use(name=fn)` replaces an op outright (tests, experiments); `reset()` undoes it.
"""
from __future__ import annotations

import importlib
import os

import torch

from . import attention as _attn
from . import conv1d as _conv
from . import cuda as _cuda
from . import gated_delta as _gdr
from . import gdn_projections as _proj
from . import moe as _moe
from . import norm as _norm
from . import rope as _rope

_overrides: dict = {}


_TORCH_ONLY = os.environ.get("QWEN3NEXT_KERNELS", "auto") == "torch"   # read once: compiled code cannot

# Fused step kernels: the routing as one kernel (ops/triton_moe.route: softmax, top-k, renormalisation) and the
# Gated DeltaNet decode step as one kernel updating each state in place (ops/triton_gdn.py). H100, 80B-A3B shapes,
# in CUDA graphs (benchmarks/check_gpu.py --only gdn_decode,moe_decode, 2026-11-23): the GDN step 1.46x / 6.9x /
# 5.2x faster than gather + fla's recurrent kernel + scatter at 1 / 16 / 64 sequences (1.04x its bandwidth floor
# at 16), the routing 1.8x (1 token) to 3.6x (4096 tokens) faster than torch's softmax + topk. Also the conv of a
# GDN decode step (ops/triton_conv.causal_conv1d_step), one-row projections (ops/triton_gemv.py) and the KV write
# of decode steps (ops/triton_attention.write_kv).
# QWEN3NEXT_FUSED_STEP_KERNELS=0 falls back to the unfused paths.
FUSED_STEP_KERNELS = os.environ.get("QWEN3NEXT_FUSED_STEP_KERNELS", "1") != "0"

# Elementwise work of the eager GPU path (prefill chunks) as one Triton pass each: the RMS norms
# (ops/triton_norm.py), the glue around the grouped expert GEMMs (ops/triton_grouped.py), Gated DeltaNet's input
# split and gates (ops/triton_gdn.py) and its short conv over packed chunks (ops/triton_conv.py). Compiled decode
# layers trace the torch forms, which Inductor fuses with their neighbours. QWEN3NEXT_FUSED_ELEMENTWISE=0 keeps
# the torch ops.
FUSED_ELEMENTWISE = os.environ.get("QWEN3NEXT_FUSED_ELEMENTWISE", "1") != "0"


def _gpu(x) -> bool:
    return x.is_cuda and not _TORCH_ONLY


# GPU kernels are called through their custom ops (ops/custom_ops.py: opaque to the compiler) only inside
# torch.compile; eagerly, their Triton launchers are called directly: the custom-op wrapper checks its outputs on
# every call, ~0.1-0.25 ms of host time each, which a host-bound 4K prefill pays in every layer (H100 machine,
# benchmarks/host_overhead.py, 2026-11-23).
def _gpu_kernel(op: str, module: str, fn: str):
    if torch.compiler.is_compiling():
        from . import custom_ops
        return getattr(custom_ops, op)
    return getattr(importlib.import_module(f".{module}", __package__), fn)


def chunk_gated_delta_rule(q, k, v, g, beta, **kw):
    if "chunk_gated_delta_rule" in _overrides:
        return _overrides["chunk_gated_delta_rule"](q, k, v, g, beta, **kw)
    if _gpu(q) and _cuda.has_fla() and (not _needs_grad(q, k, v, g, beta) or _cuda.fla_backward_ok()):
        return _cuda.chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    return _gdr.chunk_gated_delta_rule(q, k, v, g, beta, **kw)


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _step_kernel_applies(x, *more) -> bool:
    """A decode-step kernel (FUSED_STEP_KERNELS) may run: x on CUDA, Triton present, no gradient wanted."""
    return FUSED_STEP_KERNELS and _gpu(x) and _cuda.has_triton() and not _needs_grad(x, *more)


def recurrent_gated_delta_rule(q, k, v, g, beta, **kw):
    if "recurrent_gated_delta_rule" in _overrides:
        return _overrides["recurrent_gated_delta_rule"](q, k, v, g, beta, **kw)
    if _gpu(q) and _cuda.has_fla():
        return _cuda.recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
    return _gdr.recurrent_gated_delta_rule(q, k, v, g, beta, **kw)


# The GDN decode kernel applies the gated norm itself for steps of up to this many sequences, its value columns
# spread over several programs, the last of a head's programs to finish norming the head (ops/triton_gdn.py);
# above, the norm runs after it (in a compiled layer Inductor fuses it with its neighbours). H100, 8 layers in
# CUDA graphs, same process (benchmarks/ab_decode.py --switch gdn-norm, 2026-11-24): 32 columns per program made
# the step 0.993x (4K) / 0.992x (32K) as long as one program per head (BV = 128, used until then) at one
# sequence; at 16 sequences the norm in the kernel was 1.004x the norm after it, so the limit stays at one. (The
# kernel alone, check_gpu.py --only gdn_decode: 1 / 16 / 64 sequences 17.7 / 26.8 / 119 us with the norm over
# several programs, 18.3 / 36.6 / 142 us one program per head, 33.7 / 55.8 / 147 us as torch ops after it.)
GDN_NORM_IN_KERNEL_MAX_SEQS = 1
GDN_NORM_BLOCK_V = None        # value columns per program; None: ops/triton_gdn.DECODE_BLOCK_V (A/B runs set 128)


def gated_delta_decode(q, k, v, a, b, A_log, dt_bias, state, slots, fresh, norm=None):
    """A decode step of the delta rule, each sequence's recurrent state updated in place in the pool. With `norm` =
    (z, weight, eps) the output is gated_rms_norm(o, z, weight, eps), Gated DeltaNet's output norm, which the GPU
    kernel applies itself (z [S, Hv, dv] or a [S, Hk, Hv / Hk, dv] view)."""
    if "gated_delta_decode" in _overrides:
        o = _overrides["gated_delta_decode"](q, k, v, a, b, A_log, dt_bias, state, slots, fresh)
    elif _step_kernel_applies(q, k, v, a, b) and state.dtype == torch.float32:
        kernel = _gpu_kernel("gdn_decode", "triton_gdn", "gated_delta_decode")
        if norm is not None and q.shape[0] <= GDN_NORM_IN_KERNEL_MAX_SEQS:       # the norm inside the kernel
            return kernel(q, k, v, a, b, A_log, dt_bias, state, slots, fresh, None, *norm, GDN_NORM_BLOCK_V)
        o = kernel(q, k, v, a, b, A_log, dt_bias, state, slots, fresh, None)
    else:
        # gather the states, the recurrent kernel (fla's on GPU), scatter them back
        o = _gdr.gated_delta_decode(q, k, v, a, b, A_log, dt_bias, state, slots, fresh,
                                    rule=recurrent_gated_delta_rule)
    if norm is None:
        return o
    z, weight, eps = norm
    return gated_rms_norm(o, z.reshape(o.shape), weight, eps)


def gated_delta_verify(q, k, v, a, b, A_log, dt_bias, state, slots, fresh):
    """A speculative verification step of T tokens per sequence: (o [S, T, Hv, dv], the states after every token
    [S, T, Hv, dk, dv]); each slot takes the state after its last token (ops/gated_delta.gated_delta_verify)."""
    if _step_kernel_applies(q, k, v, a, b) and state.dtype == torch.float32:
        # token-major q, k, v (the torch conv leaves them channels-first): one layout for the traced op and the
        # buffers Inductor hands it (they disagreed, and the compiled verification failed; H100, 2026-11-24)
        q, k, v = (t.contiguous() for t in (q, k, v))
        return _gpu_kernel("gdn_verify", "triton_gdn", "gated_delta_verify")(q, k, v, a, b, A_log, dt_bias, state,
                                                                              slots, fresh)
    return _gdr.gated_delta_verify(q, k, v, a, b, A_log, dt_bias, state, slots, fresh)


# Routed experts of prefill chunks (and of steps above MOE_DECODE_MAX_TOKENS) run as ops/triton_experts.py's
# kernels: the assignments sorted and cut into tiles on the device, x's rows gathered and SwiGLU applied inside
# the GEMMs. H100, 80B-A3B shapes, in CUDA graphs (benchmarks/check_gpu.py --only moe_prefill, 2026-11-24):
# 1.06x-1.19x faster than torch._grouped_mm on gathered rows from 512 to 16K tokens, 1.02x-1.05x at 32K (where
# both are compute-bound). bf16 only (the dtype checked on a GPU); before Hopper (no torch._grouped_mm) they would
# replace a loop over the experts, not measured there. QWEN3NEXT_TRITON_EXPERTS=0 keeps the grouped GEMMs.
TRITON_EXPERTS = os.environ.get("QWEN3NEXT_TRITON_EXPERTS", "1") != "0"


def _triton_experts_apply(x, gate_up, down, weights) -> bool:
    return ((TRITON_EXPERTS or not _cuda.has_grouped_mm()) and _gpu(x) and _cuda.has_triton()
            and x.dtype == gate_up.dtype == down.dtype == torch.bfloat16 and not _needs_grad(x, gate_up, down,
                                                                                                 weights))


# the shared expert's gated output and the layer's residual added in the Triton experts' combine (one pass instead
# of a sigmoid, a product and two sums as torch kernels); False: torch ops after it (ab_prefill.py --switch combine)
FUSED_MOE_COMBINE = True


def experts_forward(x, gate_up, down, ids, weights, shared=None, shared_logit=None, residual=None):
    """The routed experts [N, H]; with `shared` and `shared_logit` plus sigmoid(shared_logit) * shared (the shared
    expert behind its gate), with `residual` plus it: added in the Triton experts' combine where they run."""
    if ("experts_forward" not in _overrides and _triton_experts_apply(x, gate_up, down, weights)
            and not torch.compiler.is_compiling()):
        from .triton_experts import experts_forward as triton_experts
        if FUSED_MOE_COMBINE:
            return triton_experts(x, gate_up, down, ids, weights.to(x.dtype), shared=shared,
                                  shared_logit=shared_logit, residual=residual)
        y = triton_experts(x, gate_up, down, ids, weights.to(x.dtype))
    else:
        y = _routed_experts(x, gate_up, down, ids, weights)
    if shared is not None:
        y = y + torch.sigmoid(shared_logit) * shared
    return y if residual is None else residual + y


def _routed_experts(x, gate_up, down, ids, weights):
    if "experts_forward" in _overrides:
        return _overrides["experts_forward"](x, gate_up, down, ids, weights)
    if _gpu(x) and _cuda.has_grouped_mm():
        if x.dtype == gate_up.dtype == torch.bfloat16 and (not _needs_grad(x, gate_up, down, weights)
                                                          or _cuda.grouped_mm_backward_ok()):
            return _cuda.experts_forward(x, gate_up, down, ids, weights,
                                         fused_glue=FUSED_ELEMENTWISE and not torch.compiler.is_compiling())
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
    fused = _gpu_kernel("moe_decode", "triton_moe", "moe_decode")
    y = fused(x, gate_up, down, ids, weights, shared_gate, shared_up, shared_down, shared_weight)
    return y.sum(1, dtype=torch.float32).to(x.dtype)   # in a compiled layer this fuses with the residual add


# Our Triton conv of prefill chunks writes Gated DeltaNet's q, k and v as three contiguous tensors, as fla's chunk
# kernel takes them (benchmarks/ab_prefill.py --switch conv-split); False: one [N, C] output and fla's copies
CONV_SPLIT_OUTPUT = True


def causal_conv1d(x, weight, initial_state=None, token_seq=None, token_index=None, split=None, l2norm_head=None,
                  padded=False, qkvz_layout=None, **kw):
    """`token_seq` / `token_index` (BatchMeta's token maps, with cu_seqlens) let packed prefill chunks on GPU take
    our Triton conv (ops/triton_conv.py), which costs the host a fraction of fla's wrapper. `split` = [Cq, Cq, Cv]
    (Gated DeltaNet's q, k, v channels): the output comes as those three parts (contiguous ones from the Triton
    conv), else as one tensor. `l2norm_head` = d (with split): q and k come l2-normalised per head of d channels
    (in the Triton conv's pass; elsewhere by ops/gated_delta.l2norm after the conv). `padded`: x has padding rows
    after cu_seqlens[-1] (a padded prefill); the Triton conv or the reference, which give them finite values
    (fla's conv would leave them unwritten). `qkvz_layout` = (hk, dk, r dv): x is whole in_proj_qkvz rows, which
    the Triton conv reads in place and the other paths unpack first (ops/gdn_projections.conv_input)."""
    parts = None
    triton_conv = ("causal_conv1d" not in _overrides and token_seq is not None and kw.get("cu_seqlens") is not None
                   and x.shape[1] > 1 and not kw.get("output_all_states") and _fused_elementwise_applies(x, weight))
    if qkvz_layout is not None and not triton_conv:
        x = _proj.conv_input(x.reshape(-1, x.shape[-1]), *qkvz_layout).view(*x.shape[:-1], -1)
    if "causal_conv1d" in _overrides:
        y, final = _overrides["causal_conv1d"](x, weight, initial_state, **kw)
    elif triton_conv:
        from .triton_conv import causal_conv1d as conv
        from .triton_conv import l2norm_fits
        C = weight.shape[0]
        apart = split is not None and CONV_SPLIT_OUTPUT and split[0] == split[1] and sum(split) == C
        fuse_norm = apart and l2norm_head is not None and l2norm_fits(split[0], l2norm_head)
        y, final = conv(x, weight, initial_state, kw["cu_seqlens"], token_seq, token_index,
                        activation=kw.get("activation", True), split_qk=split[0] if apart else None,
                        l2norm_head=l2norm_head if fuse_norm else None, qkvz_layout=qkvz_layout)
        if fuse_norm:
            return y, final
        if apart:
            parts = y
    elif padded:
        y, final = _conv.causal_conv1d(x, weight, initial_state, **kw)
    else:
        y, final = _causal_conv1d(x, weight, initial_state, **kw)
    if split is None:
        return y, final
    q, k, v = parts if parts is not None else y.split(split, dim=-1)
    if l2norm_head is not None:
        q, k = (_heads_l2norm(t, l2norm_head) for t in (q, k))
    return [q, k, v], final


def _heads_l2norm(t, head: int):
    """t [..., n * head] l2-normalised per head, in fp32 at least (the reference's order: ops/gated_delta)."""
    shape = t.shape
    t = t.reshape(*shape[:-1], -1, head)
    return _gdr.l2norm(t.to(_gdr._work_dtype(t))).to(t.dtype).reshape(shape)


def _causal_conv1d(x, weight, initial_state=None, **kw):
    # other prefill chunks on GPU: fla's Triton conv (one kernel, varlen); a decode step has its own op,
    # causal_conv1d_step below
    if (_gpu(x) and x.shape[1] > 1 and not kw.get("output_all_states") and _cuda.has_fla()
            and not _needs_grad(x, weight)):
        return _cuda.causal_conv1d(x, weight, initial_state, **kw)
    return _conv.causal_conv1d(x, weight, initial_state, **kw)


def causal_conv1d_step(x, weight, state, slots, fresh, qkvz_layout=None):
    """A decode step of the short conv (x [S, C] -> [S, C], SiLU), each conv state updated in place in the pool.
    With `qkvz_layout` (hk, dk, r dv), x is GDN's whole in_proj_qkvz row and the conv reads its q, k, v columns."""
    if "causal_conv1d_step" in _overrides:
        return _overrides["causal_conv1d_step"](x, weight, state, slots, fresh, qkvz_layout=qkvz_layout)
    if _step_kernel_applies(x, weight) and x.dtype != torch.float64:
        layout = None if qkvz_layout is None else list(qkvz_layout)
        return _gpu_kernel("conv_step", "triton_conv", "causal_conv1d_step")(x, weight, state, slots, fresh, True,
                                                                              layout)
    return _conv.causal_conv1d_step(x, weight, state, slots, fresh, qkvz_layout=qkvz_layout)


def causal_attention(q, k, v, scale):
    if "causal_attention" in _overrides:
        return _overrides["causal_attention"](q, k, v, scale)
    return _attn.causal_attention(q, k, v, scale)   # SDPA: FlashAttention kernels on GPU


def paged_attention(q, k_pages, v_pages, meta, scale, gate=None, k=None, v=None):
    """Attention over the paged cache; with `gate` ([N, Hq, D]) the output is multiplied by sigmoid(gate) (the
    attention output gate), which the GPU decode kernel applies in its merge pass. k, v: this step's keys and
    values (already in the pages), which prefill chunks that start a sequence read directly."""
    if "paged_attention" in _overrides:
        out = _overrides["paged_attention"](q, k_pages, v_pages, meta, scale)
    elif _gpu(q) and (meta.is_decode or meta.is_verify) and _cuda.has_triton():
        paged_decode_attention = _gpu_kernel("paged_decode_attention", "triton_attention", "paged_decode_attention")
        if meta.is_decode:
            return paged_decode_attention(q, k_pages, v_pages, meta.page_table, meta.context_lens,
                                          meta.max_context_len, scale, gate)
        # verification: every query token is its own "sequence" over its sequence's pages, seeing keys <= itself
        return paged_decode_attention(q, k_pages, v_pages, meta.page_table[meta.token_seq], meta.positions + 1,
                                      meta.max_context_len, scale, gate)
    else:
        out = _attn.paged_attention(q, k_pages, v_pages, meta, scale, k, v)
    return out if gate is None else out * torch.sigmoid(gate)


# new keys and values of up to this many tokens (decode and verification steps) are written by one Triton kernel;
# prefill chunks keep index_copy_ (not measured against it)
WRITE_KV_MAX_TOKENS = 256


def write_kv(k_pages, v_pages, k, v, slot_mapping):
    """Store new keys / values [N, Hkv, D] at their flat page rows, in place. Inside the compiled decode layer the
    torch form (index_copy_) became six kernels whose time grew with the cache (see ops/triton_attention.py)."""
    if "write_kv" in _overrides:
        return _overrides["write_kv"](k_pages, v_pages, k, v, slot_mapping)
    if k.shape[0] <= WRITE_KV_MAX_TOKENS and _step_kernel_applies(k, v) and k.dtype != torch.float64:
        return _gpu_kernel("write_kv", "triton_attention", "write_kv")(k_pages, v_pages, k, v, slot_mapping)
    return _attn.write_kv(k_pages, v_pages, k, v, slot_mapping)


def route(router_logits, top_k, norm_topk_prob):
    if "route" in _overrides:
        return _overrides["route"](router_logits, top_k, norm_topk_prob)
    if _step_kernel_applies(router_logits):
        fused = _gpu_kernel("route", "triton_moe", "route")   # softmax + top-k + renormalisation in one kernel
        return fused(router_logits, top_k, norm_topk_prob)
    return _moe.route(router_logits, top_k, norm_topk_prob)


def _one_row_kernel_applies(x, *weights) -> bool:
    """ops/triton_gemv may run: x is one row, in the weights' dtype (not fp64), and a decode-step kernel may run."""
    return (x.numel() == x.shape[-1] and x.dtype != torch.float64 and all(w.dtype == x.dtype for w in weights)
            and _step_kernel_applies(x, *weights))


def linear(x, weight, bias=None):
    """A projection. One row on GPU (a batch-1 decode step) runs ops/triton_gemv.py: cuBLAS's tiles for one row
    reach a fraction of the memory bandwidth on the small projections; more rows run F.linear (cuBLAS)."""
    if "linear" in _overrides:
        return _overrides["linear"](x, weight, bias)
    if bias is None and _one_row_kernel_applies(x, weight):
        return _gpu_kernel("gemv", "triton_gemv", "gemv")(x, weight)
    return torch.nn.functional.linear(x, weight, bias)


def linear_multi(x, weights):
    """Several bias-free projections of the same input -> a list of outputs. One row on GPU runs them as one
    Triton launch (ops/triton_gemv.gemv_multi) and returns views of its output; otherwise F.linear each."""
    if "linear_multi" in _overrides:
        return _overrides["linear_multi"](x, weights)
    if _one_row_kernel_applies(x, *weights):
        y = _gpu_kernel("gemv_multi", "triton_gemv", "gemv_multi")(x, list(weights))
        return list(y.split([w.shape[0] for w in weights], dim=-1))
    return [torch.nn.functional.linear(x, w) for w in weights]


def _fused_elementwise_applies(x, *same_dtype) -> bool:
    return (FUSED_ELEMENTWISE and _gpu(x) and _cuda.has_triton() and x.dtype != torch.float64
            and all(t.dtype == x.dtype for t in same_dtype) and not torch.compiler.is_compiling()
            and not _needs_grad(x, *same_dtype))


def rms_norm(x, weight, eps: float, zero_centered: bool):
    if "rms_norm" in _overrides:
        return _overrides["rms_norm"](x, weight, eps, zero_centered)
    if _fused_elementwise_applies(x, weight):
        from .triton_norm import rms_norm as fused
        return fused(x, weight, eps, zero_centered)
    return _norm.rms_norm(x, weight, eps, zero_centered)


# the eager GPU path's residual add inside the norm after it (ops/triton_norm.add_rms_norm); False: a torch add
# then the norm (benchmarks/ab_prefill.py --switch add-norm)
FUSED_ADD_NORM = True


def add_rms_norm(x, h, weight, eps: float, zero_centered: bool):
    """(x + h, rms_norm(x + h)): a residual add and the norm that follows it."""
    if FUSED_ADD_NORM and "rms_norm" not in _overrides and _fused_elementwise_applies(x, h, weight):
        from .triton_norm import add_rms_norm as fused
        return fused(x, h, weight, eps, zero_centered)
    s = x + h
    return s, rms_norm(s, weight, eps, zero_centered)


def gated_rms_norm(x, gate, weight, eps: float):
    """`gate` has x's shape, or x's elements in another view of rows (z read in place from in_proj_qkvz's rows:
    [N, Hk, r, dv] for x [.., Hv, dv]), which the Triton norm reads where it is."""
    if _fused_elementwise_applies(x, gate, weight) and "gated_rms_norm" not in _overrides:
        from .triton_norm import gated_rms_norm as fused
        return fused(x, gate, weight, eps)
    gate = gate if gate.shape == x.shape else gate.reshape(x.shape)
    if "gated_rms_norm" in _overrides:
        return _overrides["gated_rms_norm"](x, gate, weight, eps)
    return _norm.gated_rms_norm(x, gate, weight, eps)


# Attention's input preparation as one Triton pass each (ops/triton_rope.py): the rotary table of a step (one kernel
# instead of nine), and q/k norm + rotation (+ the KV write) per head, eagerly and, as a custom op, inside compiled
# decode layers. False: the torch forms (benchmarks/ab_decode.py / ab_prefill.py --switch qk-rope).
FUSED_QK_ROPE = True


def _qk_rope_applies(x, *same_dtype) -> bool:
    return (FUSED_QK_ROPE and FUSED_ELEMENTWISE and _gpu(x) and _cuda.has_triton() and x.dtype != torch.float64
            and all(t.dtype == x.dtype for t in same_dtype) and not _needs_grad(x, *same_dtype))


def rotary_cos_sin(positions, inv_freq, scaling: float, dtype):
    """cos, sin [..., T, R] of the rotary embedding at `positions` (ops/rope.rotary_cos_sin)."""
    if _qk_rope_applies(positions) and dtype != torch.float64 and not torch.compiler.is_compiling():
        from .triton_rope import rotary_cos_sin as fused
        return fused(positions, inv_freq, scaling, dtype)
    return _rope.rotary_cos_sin(positions, inv_freq, scaling, dtype)


def qk_norm_rope(q, k, v, q_weight, k_weight, eps: float, zero_centered: bool, cos, sin, k_pages=None,
                 v_pages=None, slot_mapping=None):
    """Attention's q [N, Hq, D] and k [N, Hkv, D] RMS-normed per head and rotated (cos / sin [N, R]) -> (q, k);
    with the KV pages, the rotated keys and v are also stored at slot_mapping (write_kv)."""
    pages = k_pages is not None
    D = q.shape[-1]
    fits = D & (D - 1) == 0 and cos.shape[-1] % 2 == 0 and cos.shape[-1] <= D     # the kernel's head layouts
    if "qk_norm_rope" not in _overrides and fits and _qk_rope_applies(q, k, q_weight, k_weight, cos, sin) and (
            pages or not torch.compiler.is_compiling()):
        if pages:
            fused = _gpu_kernel("qk_norm_rope_kv", "triton_rope", "qk_norm_rope")
            return fused(q, k, v, q_weight, k_weight, eps, zero_centered, cos, sin, k_pages, v_pages, slot_mapping)
        from .triton_rope import qk_norm_rope as fused
        return fused(q, k, None, q_weight, k_weight, eps, zero_centered, cos, sin)
    if "qk_norm_rope" in _overrides:
        q, k = _overrides["qk_norm_rope"](q, k, q_weight, k_weight, eps, zero_centered, cos, sin)
    else:
        q, k = _rope.qk_norm_rope(q, k, q_weight, k_weight, eps, zero_centered, cos, sin, norm=rms_norm)
    if pages:
        write_kv(k_pages, v_pages, k, v, slot_mapping)
    return q, k


# Gated DeltaNet's prefill reads q, k, v (the conv) and z (the gated norm) in place from in_proj_qkvz's rows, and
# makes the gates in a pass over in_proj_ba's rows alone (ops/triton_gdn.projection_gates); False: a pass that first
# unpacks them into the conv input and z (ops/triton_gdn.split_and_gate; benchmarks/ab_prefill.py --switch
# conv-reads-qkvz)
CONV_READS_QKVZ = True


def split_and_gate(qkvz, ba, A_log, dt_bias, hk: int, dk: int, r: int, dv: int):
    """Gated DeltaNet's projections [N, ...] -> (conv input, z, beta, g): ops/gdn_projections.py."""
    if "split_and_gate" in _overrides:
        return _overrides["split_and_gate"](qkvz, ba, A_log, dt_bias, hk, dk, r, dv)
    if _fused_elementwise_applies(qkvz, ba):
        from .triton_gdn import split_and_gate as fused
        return fused(qkvz, ba, A_log, dt_bias, hk, dk, r, dv)
    return _proj.split_and_gate(qkvz, ba, A_log, dt_bias, hk, dk, r, dv)


def projection_gates(ba, A_log, dt_bias, hk: int, r: int):
    """in_proj_ba's rows [N, 2 Hv] -> beta, g [N, Hv]: ops/gdn_projections.projection_gates."""
    if _fused_elementwise_applies(ba):
        from .triton_gdn import projection_gates as fused
        return fused(ba, A_log, dt_bias, hk, r)
    return _proj.projection_gates(ba, A_log, dt_bias, hk, r)


_NAMES = {"chunk_gated_delta_rule", "recurrent_gated_delta_rule", "experts_forward", "causal_conv1d",
          "causal_attention", "paged_attention", "moe_decode", "route", "gated_delta_decode",
          "rms_norm", "gated_rms_norm", "split_and_gate", "linear", "linear_multi", "causal_conv1d_step",
          "write_kv", "qk_norm_rope"}


def use(**ops) -> None:
    for name, fn in ops.items():
        if name not in _NAMES:
            raise KeyError(f"unknown op {name!r}; known: {sorted(_NAMES)}")
        _overrides[name] = fn


def reset() -> None:
    _overrides.clear()
