"""RMS norms, torch reference (the CPU path and the oracle of ops/triton_norm.py). The modules that hold the
weights under the checkpoint's names are in model/norm.py.

- rms_norm(zero_centered=True):  y = x / rms(x) * (1 + w), all in fp32, cast once (Qwen3-Next).
- rms_norm(zero_centered=False): y = w * (x / rms(x) cast to x's dtype) (dense Qwen3).
- gated_rms_norm: per value head of Gated DeltaNet, y = w * (x / rms(x) cast) * silu(z).
"""
import torch
import torch.nn.functional as F


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
