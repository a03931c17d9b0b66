"""Feed-forward blocks: the dense SwiGLU MLP and Qwen3-Next's sparse MoE (top-k of E routed experts + one shared
expert behind a sigmoid gate). Expert weights are packed [E, ...] in memory; checkpoint.py maps them to the
per-expert tensors of the checkpoint."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops import kernels
from .linear import Linear


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=False)
        self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The SwiGLU MLP of x, plus `residual` if given (a decoder layer's residual add)."""
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return y if residual is None else residual + y


class Experts(nn.Module):
    def __init__(self, n: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * inter, hidden))   # [gate rows | up rows] per expert
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False)       # the router
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., H] -> (output [..., H], router logits [N, E]); with `residual` the output is residual + the
        block's (the decoder layer's residual add: on the GPU's prefill path, inside the experts' combine)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        res = residual.reshape(-1, shape[-1]) if residual is not None else None
        logits = self.gate(x)
        weights, ids = kernels.route(logits, self.top_k, self.norm_topk_prob)
        if kernels.moe_decode_applies(x):     # a few tokens on GPU: routed + shared experts in two fused kernels
            # the shared expert's one-output gate as a product and a sum: a compiled decode layer fuses them with
            # its neighbours, where the linear is a cuBLAS dot plus a reduce kernel in every layer of every step
            acc = torch.promote_types(x.dtype, torch.float32)
            shared_weight = torch.sigmoid((x * self.shared_expert_gate.weight[0]).sum(-1, True, dtype=acc))
            se = self.shared_expert
            y = kernels.moe_decode(x, self.experts.gate_up_proj, self.experts.down_proj, ids, weights,
                                   se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight, shared_weight)
            return (y if res is None else res + y).view(shape), logits
        y = kernels.experts_forward(x, self.experts.gate_up_proj, self.experts.down_proj, ids, weights,
                                    shared=self.shared_expert(x), shared_logit=self.shared_expert_gate(x),
                                    residual=res)
        return y.view(shape), logits
