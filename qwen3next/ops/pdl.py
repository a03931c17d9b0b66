"""Programmatic dependent launch (PDL, Hopper and newer) for the decode-step kernels.

A batch-1 decode step is a chain of ~15 kernels per layer, each waiting for the one before it to finish and flush.
With PDL a kernel may start while its predecessor is still running: its programs first read what no recent
kernel writes (weights, recurrent and conv states), then wait (`griddepcontrol.wait`: the predecessor has
finished and its writes are visible) before touching activations, and only then let their own successor start
(`griddepcontrol.launch_dependents`). A weight-bound kernel's first loads so overlap the previous kernel's tail.

The rules every kernel here keeps (they make the chain safe without knowing who comes before):
  - before `wait`: read only parameters and state that no kernel of the last two launches writes, write nothing;
  - every program calls `wait` exactly once, on every path, before it writes anything or returns;
  - `launch_dependents` only after `wait`. Hence when a kernel's programs start, the kernel two launches back has
    finished, which is what lets the MoE down kernel read the expert ids (routing, two launches back) early.

Kernels launched without PDL (Inductor's, cuBLAS's) get the usual full dependency. QWEN3NEXT_PDL=0 turns it off.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("QWEN3NEXT_PDL", "1") != "0"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"       # Triton's CPU interpreter: no griddepcontrol


@functools.cache
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def launch_pdl(t: torch.Tensor) -> bool:
    """Launch with PDL: on a Hopper+ GPU, compiled (not Triton's CPU interpreter), unless switched off."""
    return (ENABLED and t.is_cuda and not INTERPRETED
            and _device_supports(t.device.index if t.device.index is not None else torch.cuda.current_device()))


@triton.jit
def wait_for_predecessor(PDL: tl.constexpr):
    """Wait until the kernel launched before this one has finished, then let the next one start."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
