"""Whole decoder layers compiled by torch.compile (Inductor) for decode and verification steps, on CUDA only.

A small-batch step on a GPU is bound by the number of kernels (and, outside a CUDA graph, by the ~20 us of host
time each eager op costs) more than by their work: an RMSNorm written as plain torch ops is ~7 kernels.
`decode_compiled(fn)` compiles the whole decoder layer (norms, projection glue, gates, conv step, routing, expert
dispatch, residuals) as one graph, the GPU kernels inside being opaque custom ops (ops/custom_ops.py): ~45
kernels per layer instead of ~120 (H100 profile, benchmarks/profile_gpu.py). Shapes are "automatically
dynamic": the batch size and the context length become symbolic after the first change, so a server does not
recompile every step. (Compiling small functions one by one was tried and dropped: each compiled call cost
~0.2 ms of host time, more than the kernels it saved.) Prefill and training run eagerly: their ops are large.

QWEN3NEXT_COMPILE=0 turns it off.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger("qwen3next.ops")


# decode-layer compilation settings; tests switch on CPU compilation with a cheap backend to check traceability.
# "verify": compile speculative verification steps: "auto" = those with fixed shapes (the engine's CUDA graphs pad
# them to buckets: BatchMeta.fixed_shapes), True = all, False = none. Their graph is compiled for static shapes
# (Inductor's dynamic-shape code for it failed on an H100, torch 2.11), so a step of a new shape recompiles. H100,
# 80B-A3B shapes, 8 layers, k = 3, batch 1 in a CUDA graph (benchmarks/speculative_gpu.py, 2026-11-24, scaled to
# the whole model): 8.34 ms compiled against 10.55 ms eager with the Triton verification kernel (9.71 / 15.31 ms
# with torch's recurrence before it).
DECODE = {"enabled": "auto", "backend": "inductor", "fullgraph": False, "verify": "auto", "max_tokens": 64}
# "max_tokens": decode steps of more tokens run the eager layers (inside the engine's CUDA graphs all the same).
# H100, 8 layers in CUDA graphs, `qwen3next bench` run 8 (2026-11-23), compiled vs eager ms per step: 80B-A3B
# 0.90 / 1.05 at 1 sequence, 3.47 / 3.60 at 16, 8.71 / 8.73 at 64; dense Qwen3-32B 3.45 / 3.67, 4.41 / 4.67,
# 6.90 / 7.17. (Until run 7 the eager layers won at 16 and 64 - dense 7.42 vs 4.73 ms at 16 - and the limit was
# 8; the likely cause was the compiled KV write's extra kernels, whose time grew with the cache, replaced in run 8
# by ops/triton_attention.write_kv.) Above 64 nothing was measured.


def _inductor_options(x: torch.Tensor) -> dict:
    """Inductor's own kernels launched with programmatic dependent launch too (ops/pdl.py), for this compile only
    (torch.compile's options, not the process-wide config). Its kernels wait before reading what the kernel
    before them wrote and only then release their successor, the rule ops/pdl.py's kernels keep. H100, 8 layers,
    batch 1 in CUDA graphs (benchmarks/ab_decode.py --switch pdl, 2026-11-23): PDL in our kernels alone made the
    step 0.96x as long (bit-identical logits), in Inductor's too 0.92x; Inductor's PDL code differs from its plain
    code, and so do the logits, by 4e-7 of the largest in fp32 (each graph deterministic)."""
    from . import pdl
    import torch._inductor.config as inductor_config
    if (DECODE["backend"] != "inductor" or not hasattr(inductor_config.triton, "enable_pdl")
            or not pdl.launch_pdl(x)):
        return {}
    return {"options": {"triton.enable_pdl": True}}


def decode_compiled(fn, dynamic: bool | None = None, limit_tokens: bool = False):
    """fn(layer, *args) compiled once for all layers (parameters are graph inputs, so layers of one kind share
    the compiled code). Used for decode and verification steps on CUDA (or anywhere with DECODE["enabled"] =
    True); a compiler failure logs a warning and this wrapper runs the eager fn from then on (`wrapper.failed()`
    says so). `dynamic`: torch.compile's (None = automatically dynamic after the first change of a shape).
    `limit_tokens`: steps of more than DECODE["max_tokens"] tokens run eagerly."""
    state = {"compiled": None, "failed": False}

    @functools.wraps(fn)
    def wrapper(*args):
        on = DECODE["enabled"]
        if on == "auto":
            on = args[1].is_cuda and os.environ.get("QWEN3NEXT_COMPILE", "1") != "0"
        if not on or state["failed"] or torch.is_grad_enabled():
            return fn(*args)
        limit = DECODE["max_tokens"]
        if limit_tokens and limit is not None and args[1].shape[-2] > limit:   # args[1]: x [1, tokens, H]
            return fn(*args)
        if state["compiled"] is None:
            import torch._dynamo as dynamo
            # one graph per layer kind and batch shape; 48 layers must not exhaust the recompile budget
            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 256)
            dynamo.config.accumulated_cache_size_limit = max(dynamo.config.accumulated_cache_size_limit, 1024)
            state["compiled"] = torch.compile(fn, backend=DECODE["backend"], fullgraph=DECODE["fullgraph"],
                                              dynamic=dynamic, **_inductor_options(args[1]))
        try:
            return state["compiled"](*args)
        except Exception as e:  # noqa: BLE001 - a compiler failure must not take the model down
            if DECODE["enabled"] is True and DECODE["fullgraph"]:
                raise   # tests ask for the compiled path: fail loudly there
            state["failed"] = True
            log.warning("torch.compile of %s failed (%s: %s); running it eagerly", fn.__name__, type(e).__name__,
                        str(e)[:300])
            return fn(*args)

    wrapper.reset = lambda: state.update(compiled=None, failed=False)
    wrapper.failed = lambda: state["failed"]
    return wrapper
