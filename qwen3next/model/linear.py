"""nn.Linear whose forward goes through the op table (ops/kernels.linear), so a one-row decode step on GPU runs the
Triton matrix-vector kernel. Parameters, names and initialisation are nn.Linear's: checkpoints do not change."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import kernels


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)
