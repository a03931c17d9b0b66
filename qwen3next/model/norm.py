"""RMS norms of Qwen3-Next.

- `RMSNorm(zero_centered=True)`: y = x / rms(x) * (1 + w), w stored around 0 so weight decay pulls the gain to 1
  (input/post-attention norms, final norm, q/k norms, MTP norms of Qwen3-Next).
- `RMSNorm(zero_centered=False)`: y = w * x / rms(x), w stored around 1 (dense Qwen3).
- `GatedRMSNorm`: per value head of Gated DeltaNet, y = w * x / rms(x) * silu(z); plain weight, NOT zero-centred.
"""
import torch
from torch import nn

from ..ops import kernels
from ..ops.norm import gated_rms_norm, rms_norm, upcast  # noqa: F401 - the functional forms, re-exported


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = True):
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, self.zero_centered)

    def add_and_norm(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + h, this norm of it): a residual add and the norm after it, one pass on the eager GPU path."""
        return kernels.add_rms_norm(x, h, self.weight, self.eps, self.zero_centered)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, zero_centered={self.zero_centered}"


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return kernels.gated_rms_norm(x, gate, self.weight, self.eps)
