"""RMS norms of Qwen3-Next.

- `RMSNorm(zero_centered=True)`: y = x / rms(x) * (1 + w), w stored around 0 so weight decay pulls the gain to 1
  (input/post-attention norms, final norm, q/k norms, MTP norms of Qwen3-Next).
- `RMSNorm(zero_centered=False)`: y = w * x / rms(x), w stored around 1 (dense Qwen3).
- `GatedRMSNorm`: per value head of Gated DeltaNet, y = w * x / rms(x) * silu(z); plain weight, NOT zero-centred.
"""
import torch
import torch.nn.functional as F
from torch import nn


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 for reductions (fp64 stays fp64, so float64 runs are exact references)."""
    return x if x.dtype == torch.float64 else x.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = True):
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:  # fp32 all the way, cast at the end
            return (normed * (1.0 + upcast(self.weight))).type_as(x)
        return self.weight * normed.type_as(x)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, zero_centered={self.zero_centered}"


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = upcast(x)
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return (self.weight * normed * F.silu(upcast(gate))).to(dtype)
