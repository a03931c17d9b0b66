"""Rotary position embedding and attention's q/k preparation, torch reference (the CPU path and the oracle of
ops/triton_rope.py). The frequencies (plain, linear or YaRN) are model/rope.py's.

- rotary_cos_sin: cos, sin [..., T, R] of positions x inverse frequencies, in fp32, scaled, cast once.
- apply_rope: partial rotate-half (NeoX) rotation of the first R dims of each head; the rest passes through.
- qk_norm_rope: attention's per-head RMSNorm of q and k followed by the rotation (Qwen3 and Qwen3-Next).
"""
from __future__ import annotations

import torch

from .norm import rms_norm


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype):
    """positions [..., T] (int) -> cos, sin [..., T, 2 * len(inv_freq)] in `dtype`."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, H, D]; cos/sin [..., T, R] with R <= D. Rotates the first R dims, passes the rest through."""
    r = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 zero_centered: bool, cos: torch.Tensor, sin: torch.Tensor, norm=rms_norm):
    """q [..., T, Hq, D], k [..., T, Hkv, D] -> (rope(norm(q)), rope(norm(k))); `norm` has rms_norm's signature
    (ops/kernels passes its own, which runs the Triton norm on a GPU)."""
    return (apply_rope(norm(q, q_weight, eps, zero_centered), cos, sin),
            apply_rope(norm(k, k_weight, eps, zero_centered), cos, sin))
