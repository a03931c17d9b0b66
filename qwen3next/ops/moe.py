"""Sparse mixture-of-experts primitives, torch reference: top-k routing and the routed expert computation.

Experts are packed: gate_up [E, 2I, H] (gate rows first, then up rows) and down [E, H, I]. Tokens are grouped by
expert with one sort, so the Python loop runs over the experts that received tokens, never over tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """router_logits [N, E] -> (weights [N, k] in the logits' dtype, expert ids [N, k]).

    Softmax over ALL experts in fp32, then top-k, then (optionally) renormalise the k weights to sum to 1.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.promote_types(router_logits.dtype, torch.float32))
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def experts_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
    """x [N, H]; ids, weights [N, k] -> sum_k weights * down(silu(gate x) * up x) of expert ids[:, k], [N, H]."""
    N, k = ids.shape
    inter = down.shape[-1]
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // k                                   # which token each sorted assignment belongs to
    counts = torch.bincount(flat_ids, minlength=gate_up.shape[0]).tolist()
    w_sorted = weights.reshape(-1)[order]
    xs = x[token_of]                                        # tokens in expert order
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sl = slice(start, start + n)
        h = F.linear(xs[sl], gate_up[e])
        ys[sl] = F.linear(F.silu(h[:, :inter]) * h[:, inter:], down[e]) * w_sorted[sl, None]
        start += n
    # back to (token, slot) order, then each token's k expert outputs are summed: no scatter-add
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return ys[inverse].view(N, k, -1).sum(1)


def moe_per_slot(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
                 weights: torch.Tensor, shared_gate: torch.Tensor, shared_up: torch.Tensor,
                 shared_down: torch.Tensor, shared_weight: torch.Tensor) -> torch.Tensor:
    """Reference of the fused decode MoE (ops/triton_moe.py): each token's k routed expert outputs and its shared
    expert output, each weighted, kept apart: [T, k + 1, H] in fp32 or wider (summing dim 1 gives the MoE block's
    output). Gathers the selected experts' weights per token: meant for a few tokens."""
    inter = down.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    h = torch.einsum("th,tkih->tki", xf, gate_up[ids].to(acc))                        # [T, k, 2I]
    h = F.silu(h[..., :inter]) * h[..., inter:] * weights.to(acc)[..., None]
    routed = torch.einsum("tki,tkhi->tkh", h, down[ids].to(acc))
    hs = F.silu(xf @ shared_gate.to(acc).T) * (xf @ shared_up.to(acc).T) * shared_weight.to(acc).reshape(-1, 1)
    return torch.cat([routed, (hs @ shared_down.to(acc).T)[:, None]], dim=1)
