"""Causal depthwise conv1d with a carried state (the short convolution of Gated DeltaNet), torch reference.

The state of a sequence is its last K-1 inputs per channel, so prefill can be split into chunks and decode can go
token by token. The SiLU activation follows the convolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, initial_state: torch.Tensor | None = None,
                  cu_seqlens: torch.Tensor | None = None, activation: bool = True, output_all_states: bool = False,
                  cu_seqlens_cpu: torch.Tensor | None = None):
    """x [B, T, C], weight [C, K], initial_state [N, C, K-1] (N = B, or sequences when packed with cu_seqlens).

    Returns (y [B, T, C], final_state [N, C, K-1]); with `output_all_states` (unpacked only) the state after every
    token instead, [B, T, C, K-1]. `cu_seqlens_cpu`: the same boundaries on the host (saves a device read).
    """
    if cu_seqlens is not None:
        bounds = (cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu).tolist()
        ys, states = [], []
        for i in range(len(bounds) - 1):
            h0 = None if initial_state is None else initial_state[i:i + 1]
            y, s = causal_conv1d(x[:, bounds[i]:bounds[i + 1]], weight, h0, activation=activation)
            ys.append(y)
            states.append(s)
        if bounds[-1] < x.shape[1]:   # padding rows after the last sequence (a padded prefill): zeros
            ys.append(x.new_zeros(x.shape[0], x.shape[1] - bounds[-1], x.shape[2]))
        return torch.cat(ys, dim=1), torch.cat(states, dim=0)
    B, T, C = x.shape
    K = weight.shape[-1]
    xt = x.transpose(1, 2).to(weight.dtype)
    h0 = (torch.zeros(B, C, K - 1, dtype=xt.dtype, device=x.device) if initial_state is None
          else initial_state.to(xt.dtype))
    full = torch.cat([h0, xt], dim=-1)                      # [B, C, K-1+T]
    if T == 1:   # a decode step: one dot product per channel beats a conv call
        y = (full * weight).sum(-1, keepdim=True)
    else:
        y = F.conv1d(full, weight.unsqueeze(1), groups=C)   # valid conv: exactly T outputs
    if activation:
        y = F.silu(y)
    if output_all_states:   # the state after token t is the K-1 inputs ending at t
        steps = full.unfold(-1, K - 1, 1)[:, :, 1:]                      # [B, C, T, K-1]
        return y.transpose(1, 2).to(x.dtype), steps.permute(0, 2, 1, 3).contiguous()
    return y.transpose(1, 2).to(x.dtype), full[:, :, -(K - 1):].clone()


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, slots: torch.Tensor,
                       fresh: torch.Tensor, activation: bool = True, qkvz_layout=None) -> torch.Tensor:
    """A decode step: one token per sequence, each sequence's conv state updated IN PLACE in its slot of the pool.

    x [S, C], weight [C, K], state [num_slots, C, K-1], slots [S], fresh [S] bool (start from a zero state).
    Returns y [S, C] in x's dtype. The GPU version is ops/triton_conv.causal_conv1d_step.
    `qkvz_layout` (hk, dk, r dv): x is Gated DeltaNet's whole in_proj_qkvz row in the checkpoint's grouped layout
    (ops/gdn_projections.py), and the conv reads its q, k, v columns from it (the GPU kernel without a copy)."""
    if qkvz_layout is not None:
        from .gdn_projections import conv_input
        x = conv_input(x, *qkvz_layout)
    h0 = state[slots].masked_fill(fresh[:, None, None], 0)
    y, final = causal_conv1d(x[:, None], weight, h0, activation=activation)
    state[slots] = final.to(state.dtype)
    return y[:, 0]
