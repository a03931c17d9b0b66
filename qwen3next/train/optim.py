"""AdamW with Qwen3-Next's weight-decay groups, and the learning-rate schedules.

Weight decay is ON for
  - every matrix: projections, routers, experts (packed [E, ...]), conv kernels, lm_head (when untied);
  - the zero-centred RMSNorm weights w (gain 1 + w): decay pulls the gain towards 1, which is the point of storing
    them around 0 (Qwen3-Next's fix for the norm-weight growth that plain RMSNorm gains show).
and OFF for
  - the token embedding (by default; `optim.decay_embeddings`): rows of rare tokens get few gradient updates and
    would be shrunk towards 0 by decay alone (OLMo 2 dropped embedding decay for this). A tied lm_head shares the
    embedding tensor and follows it;
  - biases, Gated DeltaNet's A_log and dt_bias (decay rates and time-step biases, not weights), the gated norm
    weight of Gated DeltaNet and the plain RMSNorm weights of dense Qwen3 (stored around 1: decay would pull the
    gain to 0).

The schedule is a pure function of the step, so resuming needs no scheduler state beyond the step.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..model.norm import GatedRMSNorm, RMSNorm
from .config import OptimSection

NO_DECAY_NAMES = ("A_log", "dt_bias", "bias")


def decay_groups(model: nn.Module, decay_embeddings: bool = False) -> tuple[list[str], list[str]]:
    """(names with weight decay, names without), each parameter once (tied weights under their first name)."""
    decay, no_decay, seen = [], [], set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, RMSNorm):
                wants = mod.zero_centered
            elif isinstance(mod, GatedRMSNorm):
                wants = False
            elif isinstance(mod, nn.Embedding):
                wants = decay_embeddings
            elif p_name in NO_DECAY_NAMES:
                wants = False
            else:
                wants = p.dim() >= 2
            (decay if wants else no_decay).append(name)
    return decay, no_decay


def build_optimizer(model: nn.Module, cfg: OptimSection, fused: bool = False) -> torch.optim.AdamW:
    params = dict(model.named_parameters())
    decay, no_decay = decay_groups(model, cfg.decay_embeddings)
    groups = [{"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)


def lr_at(step: int, total: int, cfg: OptimSection) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`.

    warmup: lr * (step + 1) / warmup for the first `warmup` steps, then
    cosine: min + (lr - min) * (1 + cos(pi * progress)) / 2, progress from 0 to 1 over the remaining steps;
    wsd:    lr until the last decay_fraction of the steps, then linear down to min (warmup-stable-decay).
    min = lr * min_lr_ratio.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup:
        return peak * (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        span = max(total - cfg.warmup - 1, 1)
        progress = min((step - cfg.warmup) / span, 1.0)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = max(round(total * cfg.decay_fraction), 1)
    decay_start = max(total - decay_steps, cfg.warmup)
    if step < decay_start:
        return peak
    progress = min((step - decay_start + 1) / max(total - decay_start, 1), 1.0)
    return peak + (floor - peak) * progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
