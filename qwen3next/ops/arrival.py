"""Arrival counters: the last program of a group finishes the group's reduction, within the same kernel.

A decode step at batch 1 is a chain of small kernels. A reduction across the programs of one kernel (the gated
RMSNorm of a Gated DeltaNet head whose value columns are spread over several programs) would otherwise need the
kernel to hold the whole group in one program, or one more kernel after it. Instead, each program of a group
writes its part, then increments the group's counter; the program that sees the count reach the group's size
reads the parts back (they are all written) and writes the result. The parts are read back in a fixed order, so
results are deterministic. That program also puts the counter back to zero, so the buffer is all zeros between
kernels and serves every step, CUDA-graph replays included.

Where it paid and where it did not (H100, 8 layers in CUDA graphs, same process, benchmarks/ab_decode.py,
2026-11-24): the GDN decode step with 32 value columns per program and its norm finished this way made a batch-1
step 0.992-0.993x as long as one program per head (ops/triton_gdn.py). Tried and not kept: the MoE decode kernel
summing its 11 slots and adding the residual this way (1.025x the step time against the compiled layer's fused
sum), and one token's router product and routing in one kernel (1.007-1.017x with 1 to 8 warps).

The memory ordering is the usual one (CUTLASS's semaphores, cooperative groups' grid sync): a block barrier so
that all threads' stores precede the arrival, an acquire-release atomic at GPU scope by one thread, and loads
that bypass L1 for the parts written by other programs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BUFFERS: dict = {}


def counters(device: torch.device, name: str, n: int) -> torch.Tensor:
    """n int32 counters for the kernel `name`, zero between kernels. Allocated once per device and name, on the
    first (eager, warm-up) call, with room to spare; a larger request gets a new buffer."""
    key = (str(device), name)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1 << 15), dtype=torch.int32, device=device)
        _BUFFERS[key] = buf
    return buf


@triton.jit
def arrive_last(COUNTER, group_size):
    """Count this program in at COUNTER; True in the group's last program to arrive (which resets COUNTER).
    Everything this program stored before is visible to that program."""
    tl.debug_barrier()                                     # all of this program's threads have stored their part
    before = tl.atomic_add(COUNTER, 1, sem="acq_rel", scope="gpu")
    last = before == group_size - 1
    if last:
        tl.store(COUNTER, 0)
    return last
