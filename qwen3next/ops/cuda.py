"""GPU implementations of the ops, with the signatures of the torch references (ops/*.py).

- Gated delta rule: flash-linear-attention's Triton kernels (`fla-core`), chunked for prefill/training (with its
  backward) and fused-recurrent for decode. q/k are l2-normalised inside the kernel.
- Paged decode attention: ops/triton_attention.py (flash-decoding over the KV pages, no gathered copy).
- Routed experts: tokens sorted by expert, then two grouped GEMMs (`torch._grouped_mm`, Hopper+, bf16) — no
  per-expert Python loop, no host sync (capturable in a CUDA graph), and only the experts that received tokens
  are read.
Everything here is checked against the references by benchmarks/check_gpu.py.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def has_fla() -> bool:
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False


@functools.cache
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


@functools.cache
def fla_backward_ok() -> bool:
    """fla refuses (rightly) its chunk backward on Hopper with Triton 3.4 - 3.7.0, which computes wrong gradients
    there (fla issue #640); then training takes the torch reference's autograd instead."""
    if not has_fla():
        return False
    try:
        import tilelang  # noqa: F401  - fla's alternative backend for that kernel
        return True
    except Exception:  # noqa: BLE001
        pass
    import triton
    major, minor, patch = (int(x) for x in (triton.__version__.split("+")[0].split(".") + ["0"])[:3])
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    return not (hopper and (3, 4, 0) <= (major, minor, patch) < (3, 7, 1))


@functools.cache
def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm") and torch.cuda.is_available() and \
        torch.cuda.get_device_capability()[0] >= 9


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm=True, chunk_size=64):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    o, s = fla_chunk(q.contiguous(), k.contiguous(), v.contiguous(), g.float().contiguous(),
                     beta.to(q.dtype).contiguous(), scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm,
                     cu_seqlens=cu_seqlens)
    return o.to(v.dtype), s


def recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None, use_qk_l2norm=True):
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_rec
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    o, s = fla_rec(q.contiguous(), k.contiguous(), v.contiguous(), g=g.float().contiguous(),
                   beta=beta.to(q.dtype).contiguous(), scale=scale, initial_state=initial_state,
                   output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm,
                   cu_seqlens=cu_seqlens)
    return o.to(v.dtype), s


def experts_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
    """Grouped-GEMM routed experts; same contract as ops.moe.experts_forward."""
    N, k = ids.shape
    E, inter = gate_up.shape[0], down.shape[-1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of = order // k
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[token_of]
    h = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)          # [M, 2I]
    h = F.silu(h[:, :inter]) * h[:, inter:]
    y = torch._grouped_mm(h, down.transpose(1, 2), offs=offs)              # [M, H]
    # back to (token, slot) order and sum each token's k expert outputs: a gather, no atomics
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    y = y[inverse].view(N, k, -1).float()
    return (y * weights.float()[..., None]).sum(1).to(x.dtype)
