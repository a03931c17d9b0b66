"""Random initialisation following the Qwen3-Next recipe.

- Linear / embedding / expert weights ~ N(0, initializer_range).
- Zero-centred RMSNorm weights = 0 (gain 1); the gated norm of Gated DeltaNet and dense Qwen3 norms = 1.
- Router: rows drawn N(0, std) then rescaled to one common L2 norm, so no expert starts out favoured
  ("router parameters normalised at init so each expert is selected without bias early in training").
- Gated DeltaNet: A_log = log U(1, 16) (decay rates, fp32); dt_bias = softplus^-1(dt) with dt log-uniform in
  [1e-3, 1e-1] (the Mamba-2 / Gated DeltaNet time-step init); conv weights uniform(+-1/sqrt(K)).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .deltanet import DepthwiseConv, GatedDeltaNet
from .moe import Experts, SparseMoE
from .norm import GatedRMSNorm, RMSNorm


@torch.no_grad()
def init_weights(model: nn.Module, std: float | None = None, generator: torch.Generator | None = None) -> None:
    std = model.config.initializer_range if std is None else std
    kw = {"generator": generator} if generator is not None else {}
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            mod.weight.normal_(0.0, std, **kw)
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()
        elif isinstance(mod, Experts):
            mod.gate_up_proj.normal_(0.0, std, **kw)
            mod.down_proj.normal_(0.0, std, **kw)
        elif isinstance(mod, RMSNorm):
            mod.weight.fill_(0.0 if mod.zero_centered else 1.0)
        elif isinstance(mod, GatedRMSNorm):
            mod.weight.fill_(1.0)
        elif isinstance(mod, DepthwiseConv):
            bound = 1.0 / math.sqrt(mod.weight.shape[-1])
            mod.weight.uniform_(-bound, bound, **kw)
    for mod in model.modules():
        if isinstance(mod, GatedDeltaNet):
            n = mod.A_log.shape[0]
            a = torch.empty(n, dtype=torch.float32).uniform_(1.0, 16.0, **kw)
            mod.A_log.copy_(a.log())
            dt = torch.exp(torch.empty(n, dtype=torch.float32).uniform_(math.log(1e-3), math.log(1e-1), **kw))
            dt = dt.clamp_min(1e-4)
            mod.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # inverse softplus
        elif isinstance(mod, SparseMoE):
            w = mod.gate.weight
            w.copy_(w / w.norm(dim=1, keepdim=True) * std * math.sqrt(w.shape[1]))
