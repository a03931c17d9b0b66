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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool) -> torch.Tensor:
    xf = upcast(x)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centered:  # fp32 all the way, cast at the end
        return (normed * (1.0 + upcast(weight))).type_as(x)
    return weight * normed.type_as(x)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = upcast(x)
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return (weight * normed * F.silu(upcast(gate))).to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = True):
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.zero_centered)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, zero_centered={self.zero_centered}"


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps)
