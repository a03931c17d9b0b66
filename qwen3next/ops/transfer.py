"""Host-to-device copies that do not make the host wait for the GPU.

`torch.tensor(values, device="cuda")` copies from pageable memory and then synchronises the stream: the host
waits for every kernel queued before the copy. One such copy per engine step is enough to keep the host from
preparing the next step while the GPU runs this one (overlap scheduling, engine/engine.py). Here the values go
through pinned memory and an asynchronous copy; torch's caching host allocator keeps the pinned block until the
copy has run.
"""
from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """`values` (a list, nested lists, or a CPU tensor) as a tensor on `device`, queued, not waited for."""
    t = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
