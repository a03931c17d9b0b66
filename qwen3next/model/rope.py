"""Rotary position embedding: partial (first `rotary_dim` of each head), rotate-half (NeoX) layout, optional YaRN.

YaRN (Peng et al., 2023, arXiv 2309.00071): frequencies whose wavelength fits in the original context many times are
kept (extrapolated), long-wavelength ones are divided by `factor` (interpolated), with a linear ramp between the
dimensions found for beta_fast / beta_slow rotations; cos/sin are scaled by 0.1·ln(factor) + 1.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from ..ops import kernels
from ..ops.rope import apply_rope  # noqa: F401 - where the model's modules have always imported it from


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim/2] (fp32) and the attention scaling applied to cos/sin."""
    dim, base = cfg.rotary_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    sc = cfg.rope_scaling
    if not sc:
        return inv_freq, 1.0
    kind = sc.get("rope_type", sc.get("type"))
    factor = float(sc.get("factor") or 1.0)
    if kind == "linear":
        return inv_freq / factor, 1.0
    # YaRN
    orig = sc.get("original_max_position_embeddings") or cfg.max_position_embeddings
    if not sc.get("factor"):
        factor = cfg.max_position_embeddings / orig
    beta_fast, beta_slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

    def dim_for_rotations(n_rot: float) -> float:
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (keep original frequency)
    inv_freq = (inv_freq / factor) * (1 - keep) + inv_freq * keep
    attn = sc.get("attention_factor")
    if attn is None:
        mscale, mscale_all = sc.get("mscale"), sc.get("mscale_all_dim")
        m = lambda s, k=1.0: 1.0 if s <= 1 else 0.1 * k * math.log(s) + 1.0  # noqa: E731
        attn = m(factor, mscale) / m(factor, mscale_all) if (mscale and mscale_all) else m(factor)
    return inv_freq, float(attn)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # a plain fp32 tensor, not a buffer: meta-device construction, .to(dtype) and to_empty must not touch it
        self.inv_freq, self.attention_scaling = rope_inv_freq(cfg)
        self._per_device: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., T] (int) -> cos, sin [..., T, rotary_dim], computed in fp32, cast to `dtype`."""
        inv_freq = self._per_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self._per_device[positions.device] = self.inv_freq.to(positions.device)
        return kernels.rotary_cos_sin(positions, inv_freq, self.attention_scaling, dtype)
