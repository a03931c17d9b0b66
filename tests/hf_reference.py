"""Helpers that build random transformers reference models (test-only) with every parameter perturbed."""
from __future__ import annotations

import torch

TINY_NEXT = dict(vocab_size=97, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=40, linear_num_key_heads=2, linear_num_value_heads=4,
                 linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4, num_experts=8,
                 num_experts_per_tok=3, moe_intermediate_size=20, shared_expert_intermediate_size=24,
                 max_position_embeddings=512, rope_theta=10000.0, partial_rotary_factor=0.25)

TINY_DENSE = dict(vocab_size=101, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                  head_dim=16, intermediate_size=72, max_position_embeddings=512, rope_theta=10000.0)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Give EVERY parameter random non-default values (norm weights away from 0/1, A_log, dt_bias ...)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.empty(p.shape).uniform_(1, 16, generator=g).log())
        elif name.endswith("dt_bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        elif p.dim() == 1:   # norm weights
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("linear_attn.norm.weight") else 0.0))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "mlp.gate" in name else 0.08))


def hf_next(seed=0, **overrides):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
    cfg = Qwen3NextConfig(**{**TINY_NEXT, **overrides})
    cfg._experts_implementation = "eager"   # its grouped-GEMM path rejects odd sizes on CPU
    torch.manual_seed(seed)
    m = Qwen3NextForCausalLM(cfg).float().eval()
    perturb(m, seed)
    return m


def hf_dense(seed=0, **overrides):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(**{**TINY_DENSE, **overrides})
    torch.manual_seed(seed)
    m = Qwen3ForCausalLM(cfg).float().eval()
    perturb(m, seed)
    return m
