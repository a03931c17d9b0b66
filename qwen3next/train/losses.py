"""Training losses: next-token cross-entropy, the MTP loss, and the global-batch load-balancing loss; plus the
statistics logged with them (MTP accuracy, expert load, router entropy).

Targets. A batch of windows `tokens [B, T+1]` gives inputs = tokens[:, :T] and labels = tokens[:, 1:] (labels[p] =
t_{p+1}). The MTP head at position p reads h_p and t_{p+1} = labels[p] and predicts t_{p+2} = labels[p+1]: its
targets are the labels shifted left by one more, and the last position (whose t_{p+2} is outside the window) is
ignored (IGNORE).

Load balancing (Switch Transformer form, per MoE layer l with E experts and top-k routing):

    LB_l = E * sum_e f_{l,e} * P_{l,e}

    f_{l,e} = (number of (token, slot) assignments routed to expert e) / (k * number of tokens)   counted over
              the *global batch*: every micro-batch of the optimizer step and every data-parallel rank
              (all_reduce); a constant (no gradient), sum_e f_{l,e} = 1.
    P_{l,e} = mean over the micro-batch's tokens of softmax(router_logits)_e   (differentiable, local).

    LB = mean over MoE layers l (the MTP layer's MoE included) of LB_l.  LB = 1 when routing is uniform.

Each micro-batch m contributes LB^(m) (its local P with the global f) / grad_accum to the step's loss, so the
accumulated gradient is that of E * sum_e f_e * P_e with P averaged over the whole global batch: exactly the
global-batch loss, not the mean of per-micro-batch losses. Balancing over the global batch lets a micro-batch
(e.g. one long code file) route unevenly, as long as the experts are balanced across the step
(Qiu et al. 2025, "Demons in the Detail", the variant Qwen3 and Qwen3-Next train with).
`balance_fractions` chooses the scope of f: "global" (above), "running" (micro-batches seen so far in the step;
no extra forward pass) or "micro" (each micro-batch alone: classic Switch).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE = -100


# ---- language modelling -----------------------------------------------------------------------------------------
def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, logits [B, T, V] (any dtype; computed in fp32), labels [B, T]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def mtp_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels[p] = t_{p+1}  ->  targets[p] = t_{p+2} = labels[p+1]; the last position has none (IGNORE)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)


def mtp_loss(mtp_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the MTP logits (position p predicts t_{p+2}) against labels shifted by one more."""
    return lm_loss(mtp_logits, mtp_targets(labels))


@torch.no_grad()
def mtp_accuracy(mtp_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of the MTP head on positions that have a t_{p+2}: how often a draft would be accepted."""
    targets = mtp_targets(labels)
    valid = targets != IGNORE
    hits = (mtp_logits.argmax(-1) == targets) & valid
    return hits.sum().float() / valid.sum().clamp_min(1)


# ---- load balancing -----------------------------------------------------------------------------------------------
@torch.no_grad()
def expert_counts(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """[L, E] number of (token, slot) assignments per expert, per MoE layer (router_logits: L tensors [N, E]).
    Top-k of the logits picks the same experts as top-k of the softmax the model routes with."""
    rows = []
    for logits in router_logits:
        chosen = logits.topk(top_k, dim=-1).indices.flatten()
        rows.append(torch.bincount(chosen, minlength=logits.shape[-1]))
    return torch.stack(rows).float()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel ranks when torch.distributed is running; identity otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def fractions(counts: torch.Tensor) -> torch.Tensor:
    """f [L, E] from counts [L, E]: each layer's share of assignments per expert (rows sum to 1)."""
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def router_probs_mean(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """P [L, E]: mean softmax router probability per expert over this micro-batch's tokens (fp32, with grad)."""
    return torch.stack([torch.softmax(r.float(), dim=-1).mean(0) for r in router_logits])


def load_balancing_loss(router_logits: list[torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    """mean_l E * sum_e f[l, e] * P[l, e], with f given (detached; see the module docstring for its scope)."""
    P = router_probs_mean(router_logits)
    E = P.shape[-1]
    return (E * (f.detach().to(P.device) * P).sum(-1)).mean()


class BalanceCounter:
    """Accumulates expert counts over the micro-batches of one optimizer step (summed over ranks) and hands out the
    f that each micro-batch's load-balancing loss uses.

    scope "global": f from all the step's micro-batches; the trainer feeds their counts first (`add`) — with
        grad_accum > 1 that takes a routing-only forward pass per micro-batch (its cost: ~1/3 of a step).
    scope "running": f from the micro-batches seen so far in the step (the current one included); no extra pass.
    scope "micro": f from the current micro-batch only (summed over ranks).
    """

    def __init__(self, scope: str):
        if scope not in ("global", "running", "micro"):
            raise ValueError(f"balance scope must be 'global', 'running' or 'micro', got {scope!r}")
        self.scope = scope
        self.total: torch.Tensor | None = None

    def reset(self) -> None:
        self.total = None

    def add(self, counts: torch.Tensor) -> None:
        counts = all_reduce_sum(counts.clone())
        self.total = counts if self.total is None else self.total + counts

    def fractions_for(self, counts: torch.Tensor) -> torch.Tensor:
        """f for a micro-batch whose own counts are `counts` (already added when the scope is "global")."""
        if self.scope == "global":
            if self.total is None:
                raise RuntimeError("global balance: add every micro-batch's counts before asking for f")
            return fractions(self.total)
        if self.scope == "running":
            self.add(counts)
            return fractions(self.total)
        return fractions(all_reduce_sum(counts.clone()))


# ---- router statistics --------------------------------------------------------------------------------------------
@torch.no_grad()
def expert_load(counts: torch.Tensor) -> torch.Tensor:
    """Mean over layers of max_e load / mean_e load, from counts [L, E]: 1 = perfectly even, E = one expert."""
    return (counts.max(-1).values / counts.mean(-1).clamp_min(1e-9)).mean()


@torch.no_grad()
def router_entropy(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers and tokens of the routing distribution's entropy, in nats (log E = uniform)."""
    return torch.stack([torch.special.entr(torch.softmax(r.float(), -1)).sum(-1).mean() for r in router_logits]).mean()
