"""Small pure-torch functions fused into single GPU kernels by torch.compile (Inductor), on CUDA only.

Decode on a GPU is bound by the number of kernels more than by their work: an RMSNorm written as plain torch ops
is ~7 kernels. `cuda_fused(fn)` compiles fn once (dynamic shapes) the first time it sees CUDA inputs at inference
(no autograd, no autocast) and falls back to eager if compilation fails; CPU calls and training always run
eagerly, so the CPU path stays the plain reference.
QWEN3NEXT_COMPILE=0 turns it off.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger("qwen3next.ops")


def cuda_fused(fn):
    state = {"compiled": None, "failed": False}

    @functools.wraps(fn)
    def wrapper(*args):
        # inference only: under autograd / autocast (training) each toggle would be a recompile
        if (not args[0].is_cuda or state["failed"] or torch.is_grad_enabled() or torch.is_autocast_enabled("cuda")
                or os.environ.get("QWEN3NEXT_COMPILE", "1") == "0"):
            return fn(*args)
        if state["compiled"] is None:
            state["compiled"] = torch.compile(fn, dynamic=True, fullgraph=True)
        try:
            return state["compiled"](*args)
        except Exception as e:  # noqa: BLE001 - a compiler failure must not take the model down
            state["failed"] = True
            log.warning("torch.compile of %s failed (%s: %s); running it eagerly", fn.__name__, type(e).__name__, e)
            return fn(*args)

    return wrapper
