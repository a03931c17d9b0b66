"""Gated DeltaNet token mixer (linear attention with a constant-size state), as laid out in Qwen3-Next checkpoints
(the row layout of in_proj_qkvz / in_proj_ba: ops/gdn_projections.py)."""
from __future__ import annotations

import itertools

import torch
from torch import nn

from ..config import ModelConfig
from ..ops import conv1d as conv_ops
from ..ops import gated_delta as gdr_ops
from ..ops import gdn_projections as proj_ops
from ..ops import kernels
from .cache import BatchMeta, GDNState
from .linear import Linear, project
from .norm import GatedRMSNorm


class DepthwiseConv(nn.Module):
    """Holds `conv1d.weight` [C, 1, K] under the checkpoint's name; the computation is ops.conv1d."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hk, self.hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.r = self.hv // self.hk
        self.key_dim, self.value_dim = self.hk * self.dk, self.hv * self.dv
        self.in_proj_qkvz = Linear(cfg.hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = Linear(cfg.hidden_size, 2 * self.hv, bias=False)
        self.conv1d = DepthwiseConv(cfg.linear_conv_dim, cfg.linear_conv_kernel_dim)
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, cfg.hidden_size, bias=False)

    def _project(self, x: torch.Tensor):
        """-> conv input [B, T, C], z [B, T, Hv, dv], raw gate projections b, a [B, T, Hv]."""
        B, T, _ = x.shape
        mixed, z, b, a = proj_ops.split_projections(self.in_proj_qkvz(x).view(B * T, -1),
                                                    self.in_proj_ba(x).view(B * T, -1), self.hk, self.dk, self.r,
                                                    self.dv)
        return mixed.view(B, T, -1), z.view(B, T, self.hv, self.dv), b.view(B, T, -1), a.view(B, T, -1)

    def _project_and_gate(self, x: torch.Tensor):
        """-> (conv input, its qkvz layout or None, z, beta, g (fp32)). The conv input is in_proj_qkvz's rows
        themselves, which the conv reads q, k, v from (its qkvz layout), and z a view of them [N, Hk, r, dv] that
        the gated norm reads in place; beta and g come from one pass over in_proj_ba's rows on GPU. With
        kernels.CONV_READS_QKVZ off, one pass unpacks the rows into the conv input and z (ops/triton_gdn.py)."""
        B, T, _ = x.shape
        qkvz, ba = self.in_proj_qkvz(x).view(B * T, -1), self.in_proj_ba(x).view(B * T, -1)
        if kernels.CONV_READS_QKVZ:
            beta, g = kernels.projection_gates(ba, self.A_log, self.dt_bias, self.hk, self.r)
            z = proj_ops.z_view(qkvz, self.hk, self.dk, self.r, self.dv)
            layout = (self.hk, self.dk, self.r * self.dv)
            return qkvz.view(B, T, -1), layout, z, beta.view(B, T, -1), g.view(B, T, -1)
        mixed, z, beta, g = kernels.split_and_gate(qkvz, ba, self.A_log, self.dt_bias, self.hk, self.dk, self.r,
                                                   self.dv)
        return mixed.view(B, T, -1), None, z.view(B, T, self.hv, self.dv), beta.view(B, T, -1), g.view(B, T, -1)

    def _heads(self, mixed: torch.Tensor | list[torch.Tensor]):
        """The conv output [B, T, C] (or its q, k, v parts) -> q, k [B, T, hk, dk], v [B, T, hv, dv]."""
        Bm, Tm, _ = mixed[0].shape if isinstance(mixed, list) else mixed.shape
        q, k, v = mixed if isinstance(mixed, list) else mixed.split([self.key_dim, self.key_dim, self.value_dim], -1)
        return (q.reshape(Bm, Tm, self.hk, self.dk),          # the op maps value head j to key head j // r
                k.reshape(Bm, Tm, self.hk, self.dk), v.reshape(Bm, Tm, self.hv, self.dv))

    def forward(self, x: torch.Tensor, state: GDNState | None = None, meta: BatchMeta | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        conv_w = self.conv1d.weight.squeeze(1)
        cu = cu_host = conv0 = rec0 = None
        if state is not None:
            keep_steps = meta.keep_step_states is not None and any(meta.keep_step_states)
            if meta.is_decode and not keep_steps:
                return self._decode_step(x, conv_w, state, meta)
            fresh = meta.fresh[:, None, None]          # a sequence at position 0 never reads an old slot
            if keep_steps:
                mixed, z, b, a = self._project(x)
                o = self._forward_keeping_steps(mixed, b, a, conv_w, state, meta)
                return self.out_proj(self.norm(o, z).reshape(B, T, self.value_dim))
            # prompts from their first token (the usual prefill) start from zero states: no gather of old ones,
            # four ops fewer per layer for a host-bound prefill (the kernels take "no initial state")
            if any(meta.start_positions):
                conv0 = state.conv[meta.slots].masked_fill(fresh, 0)
                rec0 = state.recurrent[meta.slots].masked_fill(fresh[..., None], 0)
            cu, cu_host = meta.cu_seqlens, meta.cu_seqlens_cpu
        mixed, layout, z, beta, g = self._project_and_gate(x)
        padded = meta is not None and meta.valid is not None
        if padded:   # padding rows (a prefill padded to a graph bucket) pass the state on unchanged
            valid = meta.valid.view(1, -1, 1)
            beta, g = beta.where(valid, 0), g.where(valid, 0)
        host = {} if cu_host is None else {"cu_seqlens_cpu": cu_host}
        maps = {} if cu is None else {"token_seq": meta.token_seq, "token_index": meta.token_index}
        # q, k, v as three tensors (contiguous ones from our Triton conv, as fla's chunk kernel takes them), q and k
        # already l2-normalised (in the conv's pass on GPU), so the delta rule does not normalise them again
        qkv, conv_final = kernels.causal_conv1d(mixed, conv_w, conv0, cu_seqlens=cu, **host, **maps,
                                                split=[self.key_dim, self.key_dim, self.value_dim],
                                                l2norm_head=self.dk, padded=padded, qkvz_layout=layout)
        q, k, v = self._heads(qkv)
        if mixed.shape[1] == 1:
            o, rec_final = kernels.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=rec0,
                                                              output_final_state=state is not None, cu_seqlens=cu,
                                                              use_qk_l2norm=False)
        else:
            # one sequence needs no packed boundaries, and fla's wrapper costs the host ~0.3 ms less without them
            # (0.81 vs 1.14 ms per call at 4K tokens, H100 machine, benchmarks/host_overhead.py, 2026-11-23)
            one = meta is not None and meta.num_seqs == 1
            o, rec_final = kernels.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=rec0,
                                                          output_final_state=state is not None,
                                                          cu_seqlens=None if one else cu, use_qk_l2norm=False,
                                                          **({} if one else host))
        if state is not None:
            state.conv[meta.slots] = conv_final.to(state.conv.dtype)
            state.recurrent[meta.slots] = rec_final.to(state.recurrent.dtype)
        o = self.norm(o, z)
        return self.out_proj(o.reshape(B, T, self.value_dim))

    def _decode_step(self, x, conv_w, state: GDNState, meta: BatchMeta) -> torch.Tensor:
        """One token for each of S sequences (packed as [1, S, ...]): the conv step, then the delta rule, each
        conv and recurrent state updated in place in its slot (on GPU one kernel each: ops/triton_conv.py,
        ops/triton_gdn.py). Both read the projections where they are, in the checkpoint's grouped layout: no
        unpacking copies between the projections and the kernels."""
        S = x.shape[1]
        qkvz, ba = project(x, self.in_proj_qkvz, self.in_proj_ba)      # one launch at batch 1 on GPU
        qkvz = qkvz.reshape(S, -1)
        mixed = kernels.causal_conv1d_step(qkvz, conv_w, state.conv, meta.slots, meta.fresh,
                                           qkvz_layout=(self.hk, self.dk, self.r * self.dv))    # [S, C]
        q, k, v = self._heads(mixed[None])            # views of the conv output
        b, a = ba.reshape(S, self.hk, 2 * self.r).split(self.r, dim=-1)                       # [S, Hk, r] views
        z = qkvz.view(S, self.hk, -1)[..., 2 * self.dk + self.r * self.dv:].view(S, self.hk, self.r, self.dv)
        # the delta rule and the gated norm after it in one kernel on GPU
        o = kernels.gated_delta_decode(q[0], k[0], v[0], a, b, self.A_log, self.dt_bias, state.recurrent,
                                       meta.slots, meta.fresh, norm=(z, self.norm.weight, self.norm.eps))
        return self.out_proj(o.reshape(1, S, self.value_dim))

    def _forward_keeping_steps(self, mixed, b, a, conv_w, state: GDNState, meta: BatchMeta):
        """Speculative verification: sequences flagged in meta.keep_step_states keep the conv and recurrent state
        after EVERY new token (state.steps[i]), so the engine can commit the state of the last accepted draft
        without recomputing. The usual case (every sequence verifies the same number of drafts) runs as one batch,
        the delta rule as one kernel on GPU (ops/triton_gdn.gated_delta_verify); mixed batches (prefill chunks
        beside verifications) run sequence by sequence."""
        state.steps, state.step_batch = {}, None
        S, T = meta.num_seqs, meta.q_lens[0]
        fresh = meta.fresh[:, None, None]
        conv0 = state.conv[meta.slots].masked_fill(fresh, 0)
        if all(meta.keep_step_states) and all(n == T for n in meta.q_lens):
            B = mixed.shape[1] // T
            y, conv_states = conv_ops.causal_conv1d(mixed.view(B, T, -1), conv_w, conv0, output_all_states=True)
            q, k, v = self._heads(y)
            o, rec_states = kernels.gated_delta_verify(q, k, v, a.view(B, T, -1), b.view(B, T, -1), self.A_log,
                                                       self.dt_bias, state.recurrent, meta.slots, meta.fresh)
            state.steps = {i: (conv_states[i], rec_states[i]) for i in range(S)}
            state.step_batch = (conv_states, rec_states)
            state.conv[meta.slots] = conv_states[:, -1].to(state.conv.dtype)
            return o.reshape(1, B * T, *o.shape[2:])
        rec0 = state.recurrent[meta.slots].masked_fill(fresh[..., None], 0)
        outs = []
        bounds = [0, *itertools.accumulate(meta.q_lens)]
        for i, keep in enumerate(meta.keep_step_states):
            rows = slice(bounds[i], bounds[i + 1])
            y, conv_states = conv_ops.causal_conv1d(mixed[:, rows], conv_w, conv0[i:i + 1],
                                                    output_all_states=keep)
            q, k, v = self._heads(y)
            beta, g = gdr_ops.gates(b[:, rows], a[:, rows], self.A_log, self.dt_bias)
            if keep:
                o, rec_states = gdr_ops.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=rec0[i:i + 1],
                                                                  output_all_states=True)
                state.steps[i] = (conv_states[0], rec_states[0])
                conv_final, rec_final = conv_states[:, -1], rec_states[:, -1]
            else:
                o, rec_final = kernels.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=rec0[i:i + 1],
                                                              output_final_state=True)
                conv_final = conv_states
            slot = meta.slots[i:i + 1]
            state.conv[slot] = conv_final.to(state.conv.dtype)
            state.recurrent[slot] = rec_final.to(state.recurrent.dtype)
            outs.append(o)
        return torch.cat(outs, dim=1)
