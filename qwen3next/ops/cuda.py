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


@functools.cache
def grouped_mm_backward_ok() -> bool:
    """Whether torch._grouped_mm has a backward in this torch (training can then use the grouped experts)."""
    if not has_grouped_mm():
        return False
    try:
        # the layout experts_forward uses: weights [E, out, in] contiguous, passed transposed (column-major)
        a = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(2, 32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        offs = torch.tensor([16, 32], device="cuda", dtype=torch.int32)
        torch._grouped_mm(a, w.transpose(1, 2), offs=offs).float().sum().backward()
        return a.grad is not None and w.grad is not None
    except Exception:  # noqa: BLE001
        return False


def _host_bounds(fn, cu_seqlens_cpu) -> dict:
    """fla >= 0.6 takes the packed boundaries on the host as well (`cu_seqlens_cpu`); without them it reads the
    device tensor back (a `.cpu()`, `.item()` or `repeat_interleave` in its index preparation): a host-device sync
    in every Gated DeltaNet layer, which leaves the GPU idle while the host queues the next kernels."""
    if cu_seqlens_cpu is None or not _accepts(fn, "cu_seqlens_cpu"):
        return {}
    return {"cu_seqlens_cpu": cu_seqlens_cpu}


@functools.cache
def _accepts(fn, name: str) -> bool:
    import inspect
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm=True, chunk_size=64, cu_seqlens_cpu=None):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    o, s = fla_chunk(q.contiguous(), k.contiguous(), v.contiguous(), g.float().contiguous(),
                     beta.to(q.dtype).contiguous(), scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm,
                     cu_seqlens=cu_seqlens, **_host_bounds(fla_chunk, cu_seqlens_cpu))
    return o.to(v.dtype), s


def recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None, use_qk_l2norm=True):
    if cu_seqlens is None:   # the decode path: an opaque custom op, so a compiled decode layer can call it
        from .custom_ops import gdn_recurrent
        o, s = gdn_recurrent(q, k, v, g, beta, initial_state, scale, use_qk_l2norm)
        return o, (s if output_final_state else None)
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_rec
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    o, s = fla_rec(q.contiguous(), k.contiguous(), v.contiguous(), g=g.float().contiguous(),
                   beta=beta.to(q.dtype).contiguous(), scale=scale, initial_state=initial_state,
                   output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm,
                   cu_seqlens=cu_seqlens)
    return o.to(v.dtype), s


def _weighted_swiglu(h: torch.Tensor, w: torch.Tensor, inter: int) -> torch.Tensor:
    """silu(gate) * up, times each row's routing weight (applied before the down projection, on the 4x narrower
    intermediate, instead of on its output)."""
    return F.silu(h[:, :inter]) * h[:, inter:] * w.to(h.dtype)[:, None]


def _combine(y: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """Back to (token, slot) order and the sum of each token's k expert outputs, accumulated in fp32: a gather
    and one reduction, no atomics."""
    return y[inverse].view(-1, k, y.shape[-1]).sum(1, dtype=torch.float32).to(y.dtype)


def causal_conv1d(x, weight, initial_state=None, cu_seqlens=None, activation=True, output_all_states=False,
                  cu_seqlens_cpu=None):
    """fla's Triton causal conv1d; same contract as ops.conv1d.causal_conv1d. fla's state holds the last K inputs,
    ours the last K-1 (all the next token needs): pad on the way in, drop the oldest on the way out."""
    from fla.modules.causal_conv1d import causal_conv1d as fla_conv
    if output_all_states:
        raise ValueError("output_all_states is a torch-reference feature")
    h0 = None if initial_state is None else F.pad(initial_state.to(x.dtype), (1, 0)).contiguous()
    y, h = fla_conv(x.contiguous(), weight.to(x.dtype), initial_state=h0, output_final_state=True,
                    activation="silu" if activation else None, cu_seqlens=cu_seqlens,
                    **_host_bounds(fla_conv, cu_seqlens_cpu))
    return y, h[..., 1:]


def experts_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
                    weights: torch.Tensor, fused_glue: bool = True) -> torch.Tensor:
    """Grouped-GEMM routed experts; same contract as ops.moe.experts_forward."""
    N, k = ids.shape
    E, inter = gate_up.shape[0], down.shape[-1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of = order // k
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    # inference: the glue between the GEMMs as one Triton pass each (ops/triton_grouped.py); training keeps the
    # torch form, which autograd differentiates
    fused = fused_glue and has_triton() and not (torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, gate_up, down, weights)))
    h = torch._grouped_mm(x[token_of], gate_up.transpose(1, 2), offs=offs)          # [M, 2I]
    if fused:
        from .triton_grouped import weighted_swiglu
        h = weighted_swiglu(h, weights.reshape(-1)[order], inter)
    else:
        h = _weighted_swiglu(h, weights.reshape(-1)[order], inter)
    y = torch._grouped_mm(h, down.transpose(1, 2), offs=offs)                       # [M, H]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    if fused:
        from .triton_grouped import combine
        return combine(y, inverse, k)
    return _combine(y, inverse, k)
