"""Gated DeltaNet's input projections, unpacked from the checkpoint's layout (torch reference).

in_proj_qkvz rows are grouped per key head g (r = Hv / Hk value heads per group):
    [q_g (dk) | k_g (dk) | v_{rg..rg+r-1} (r dv) | z_{rg..rg+r-1} (r dv)]
in_proj_ba rows per key head g: [b_{rg..} (r) | a_{rg..} (r)]. The short conv runs over [all q | all k | all v].
The GPU prefill reads q, k, v (ops/triton_conv.py, qkvz_layout) and z (ops/triton_norm.py) in place and makes
the gates in one pass (ops/triton_gdn.projection_gates); ops/triton_gdn.split_and_gate is the unpacking pass.
"""
from __future__ import annotations

import torch

from .gated_delta import gates


def split_projections(qkvz: torch.Tensor, ba: torch.Tensor, hk: int, dk: int, r: int, dv: int):
    """qkvz [N, Hk (2 dk + 2 r dv)], ba [N, 2 Hv] -> the conv input [N, 2 Hk dk + Hv dv], z [N, Hv, dv] and the
    raw gate projections b, a [N, Hv]."""
    N = qkvz.shape[0]
    z = qkvz.view(N, hk, -1)[..., 2 * dk + r * dv:]
    b, a = ba.view(N, hk, 2 * r).split(r, dim=-1)
    return conv_input(qkvz, hk, dk, r * dv), z.reshape(N, hk * r, dv), b.reshape(N, -1), a.reshape(N, -1)


def conv_input(qkvz: torch.Tensor, hk: int, dk: int, rdv: int) -> torch.Tensor:
    """qkvz [N, Hk (2 dk + 2 rdv)] -> the conv input [N, 2 Hk dk + Hk rdv] = [all q | all k | all v]."""
    N = qkvz.shape[0]
    q, k, v, _ = qkvz.view(N, hk, -1).split([dk, dk, rdv, rdv], dim=-1)
    return torch.cat([q.reshape(N, -1), k.reshape(N, -1), v.reshape(N, -1)], dim=-1)


def split_and_gate(qkvz, ba, A_log, dt_bias, hk: int, dk: int, r: int, dv: int):
    """split_projections, then the gates: -> (conv input, z, beta = sigmoid(b) in b's dtype, g fp32 [N, Hv])."""
    mixed, z, b, a = split_projections(qkvz, ba, hk, dk, r, dv)
    beta, g = gates(b, a, A_log, dt_bias)
    return mixed, z, beta, g


def z_view(qkvz: torch.Tensor, hk: int, dk: int, r: int, dv: int) -> torch.Tensor:
    """z of qkvz [N, Hk (2 dk + 2 r dv)] as a view [N, Hk, r, dv] (value head g r + j at [:, g, j]), no copy."""
    return qkvz.view(qkvz.shape[0], hk, -1)[..., 2 * dk + r * dv:].unflatten(-1, (r, dv))


def projection_gates(ba: torch.Tensor, A_log, dt_bias, hk: int, r: int):
    """in_proj_ba rows [N, 2 Hv] -> beta = sigmoid(b) in b's dtype, g fp32, each [N, Hv]."""
    b, a = ba.view(ba.shape[0], hk, 2 * r).split(r, dim=-1)
    return gates(b.reshape(ba.shape[0], -1), a.reshape(ba.shape[0], -1), A_log, dt_bias)
