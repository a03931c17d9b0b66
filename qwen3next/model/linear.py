"""nn.Linear whose forward goes through the op table (ops/kernels.linear), so a one-row decode step on GPU runs the
Triton matrix-vector kernel. Parameters, names and initialisation are nn.Linear's: checkpoints do not change.
`project` runs several projections of one input together."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import kernels


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


def project(x: torch.Tensor, *linears: nn.Linear) -> list[torch.Tensor]:
    """x through several projections of the same input (a layer's q / k / v, or GDN's qkvz / ba): one launch on a
    GPU decode step of one row (ops/kernels.linear_multi); layers with a bias take their own path."""
    if any(lin.bias is not None for lin in linears):
        return [lin(x) for lin in linears]
    return kernels.linear_multi(x, [lin.weight for lin in linears])
