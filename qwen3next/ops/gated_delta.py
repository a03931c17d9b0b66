"""The gated delta rule (Yang, Kautz, Hatamizadeh: "Gated Delta Networks", arXiv 2412.06464), torch reference.

Per value head, with a state S in R^{dk x dv} and, for each token t (q, k l2-normalised, q scaled by dk^-1/2):
    S <- exp(g_t) S;   u = beta_t (v_t - S^T k_t);   S <- S + k_t u^T;   o_t = S^T q_t

Two forms with one signature (the one flash-linear-attention uses, so its GPU kernels drop in):
  recurrent_gated_delta_rule: token by token (decode, and the float64 oracle).
  chunk_gated_delta_rule:     chunks of 64 tokens in the WY / UT-transform form (prefill, training).
Shapes: q, k [B, T, Hk, dk], v [B, T, H, dv], g, beta [B, T, H]; when Hk < H ("grouped value attention"),
value head j reads key head j // (H / Hk);
initial_state [N, H, dk, dv] where N = B, or N = number of sequences when `cu_seqlens` packs them in B = 1.
Everything runs in fp32 (or fp64 when given fp64); the output is cast back to v's dtype, the state stays fp32/64.
"""
from __future__ import annotations

import torch


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _prepare(q, k, v, use_qk_l2norm: bool, scale: float | None):
    wd = _work_dtype(q)
    q, k = q.to(wd), k.to(wd)
    if q.shape[2] != v.shape[2]:                      # grouped value attention: broadcast key heads
        r = v.shape[2] // q.shape[2]
        q, k = q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return q * (scale if scale is not None else q.shape[-1] ** -0.5), k


def _per_sequence(fn, q, k, v, g, beta, initial_state, output_final_state, cu_seqlens, **kw):
    """Run `fn` on each packed sequence of a B=1 batch and stitch the outputs back together."""
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs sequences along T, so the batch must be 1, got {q.shape[0]}")
    bounds = cu_seqlens.tolist()
    outs, finals = [], []
    for i in range(len(bounds) - 1):
        s, e = bounds[i], bounds[i + 1]
        h0 = None if initial_state is None else initial_state[i:i + 1]
        o, hT = fn(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], initial_state=h0,
                   output_final_state=output_final_state, **kw)
        outs.append(o)
        finals.append(hT)
    o = torch.cat(outs, dim=1)
    return o, (torch.cat(finals, dim=0) if output_final_state else None)


def recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None, use_qk_l2norm=True, output_all_states=False):
    """`output_all_states`: return the state after EVERY token, [B, T, H, dk, dv], instead of the final one —
    what speculative verification needs to commit the state of the last accepted draft."""
    if cu_seqlens is not None:
        return _per_sequence(recurrent_gated_delta_rule, q, k, v, g, beta, initial_state, output_final_state,
                             cu_seqlens, scale=scale, use_qk_l2norm=use_qk_l2norm)
    out_dtype = v.dtype
    q, k = _prepare(q, k, v, use_qk_l2norm, scale)
    wd = q.dtype
    v, g, beta = v.to(wd), g.to(wd), beta.to(wd)
    B, T, H, dk = k.shape
    S = (torch.zeros(B, H, dk, v.shape[-1], dtype=wd, device=q.device) if initial_state is None
         else initial_state.to(wd).clone())
    out = torch.empty(B, T, H, v.shape[-1], dtype=wd, device=q.device)
    states = [] if output_all_states else None
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        pred = (k[:, t, :, None, :] @ S).squeeze(-2)                     # S^T k
        u = beta[:, t, :, None] * (v[:, t] - pred)
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        out[:, t] = (q[:, t, :, None, :] @ S).squeeze(-2)               # S^T q
        if states is not None:
            states.append(S)
    if output_all_states:
        return out.to(out_dtype), torch.stack(states, dim=1)
    return out.to(out_dtype), (S if output_final_state else None)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm=True, chunk_size=64, cu_seqlens_cpu=None):
    """`cu_seqlens_cpu`: the packed boundaries on the host too, so no kernel path has to read them back."""
    if cu_seqlens is not None:
        return _per_sequence(chunk_gated_delta_rule, q, k, v, g, beta, initial_state, output_final_state,
                             cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu, scale=scale,
                             use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size)
    out_dtype = v.dtype
    q, k = _prepare(q, k, v, use_qk_l2norm, scale)
    wd = q.dtype
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    # [B, T, H, d] -> [B, H, T, d]; padding with k = 0, beta = 0, g = 0 leaves the state unchanged
    q, k, v = (torch.nn.functional.pad(x.transpose(1, 2), (0, 0, 0, pad)) for x in (q, k, v.to(wd)))
    g, beta = (torch.nn.functional.pad(x.to(wd).transpose(1, 2), (0, pad)) for x in (g, beta))
    n = (T + pad) // C
    q, k, v = (x.reshape(B, H, n, C, -1) for x in (q, k, v))
    g, beta = g.reshape(B, H, n, C), beta.reshape(B, H, n, C)

    G = g.cumsum(-1)                                    # per-chunk cumulative log-decay, in fp32/64
    idx = torch.arange(C, device=q.device)
    causal = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    diff = G[..., :, None] - G[..., None, :]           # G_i - G_j
    decay = torch.where(causal, diff, torch.full_like(diff, float("-inf"))).exp()   # exp(G_i - G_j), i >= j
    kb = k * beta[..., None]
    # (I + L) U = beta V - diag(beta exp(G)) K S0, with L_ij = beta_i (k_i . k_j) exp(G_i - G_j) for i > j
    L = (kb @ k.transpose(-1, -2)) * decay * strict
    eye = torch.eye(C, dtype=wd, device=q.device)
    A = eye + L
    u_raw = torch.linalg.solve_triangular(A, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(A, kb * G.exp()[..., None], upper=False, unitriangular=True)
    qk = (q @ k.transpose(-1, -2)) * decay              # causal (diagonal included)
    q_decayed = q * G.exp()[..., None]
    G_last = G[..., -1]                                  # [B, H, n]
    k_to_end = k * (G_last[..., None] - G).exp()[..., None]

    S = (torch.zeros(B, H, dk, dv, dtype=wd, device=q.device) if initial_state is None
         else initial_state.to(wd).clone())
    out = torch.empty(B, H, n, C, dv, dtype=wd, device=q.device)
    for c in range(n):
        u = u_raw[:, :, c] - w[:, :, c] @ S
        out[:, :, c] = q_decayed[:, :, c] @ S + qk[:, :, c] @ u
        S = S * G_last[:, :, c].exp()[..., None, None] + k_to_end[:, :, c].transpose(-1, -2) @ u
    out = out.reshape(B, H, n * C, dv)[:, :, :T].transpose(1, 2)
    return out.to(out_dtype), (S if output_final_state else None)


def gates(b: torch.Tensor, a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """beta = sigmoid(b) (write strength); g = -exp(A_log) * softplus(a + dt_bias), the log-decay (<= 0), in fp32
    (fp64 stays fp64)."""
    up = lambda x: x.to(_work_dtype(x))  # noqa: E731
    return torch.sigmoid(b), -up(A_log).exp() * torch.nn.functional.softplus(up(a) + up(dt_bias))


def gated_delta_decode(q, k, v, a, b, A_log, dt_bias, state, slots, fresh, scale=None, rule=None):
    """One decode token per sequence, the recurrent state updated IN PLACE in its slot of the state pool.

    q, k [S, Hk, dk] and v [S, Hv, dv] (after the conv; l2-normalised here), a, b [S, Hv] or [S, Hk, Hv / Hk]
    (the raw gate projections), state [num_slots, Hv, dk, dv] fp32, slots [S], fresh [S] bool (start from a zero
    state). Returns o [S, Hv, dv] in v's dtype. The GPU version (ops/triton_gdn.py) reads and writes each state
    once. `rule`: the recurrent delta rule to run between the gather and the scatter (default: this file's)."""
    beta, g = gates(b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1), A_log, dt_bias)
    h0 = state[slots].masked_fill(fresh[:, None, None, None], 0)
    rule = rule or recurrent_gated_delta_rule
    o, h1 = rule(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], scale=scale, initial_state=h0,
                 output_final_state=True)
    state[slots] = h1.to(state.dtype)
    return o[:, 0]


def gated_delta_verify(q, k, v, a, b, A_log, dt_bias, state, slots, fresh, scale=None):
    """A speculative verification step: T tokens per sequence (its last token and T - 1 drafts), keeping the
    recurrent state after EVERY token, so that the engine can commit the one after the last accepted draft.

    q, k [S, T, Hk, dk], v [S, T, Hv, dv] (after the conv; l2-normalised here), a, b [S, T, Hv] (raw gates),
    state [num_slots, Hv, dk, dv] fp32 pool, slots [S], fresh [S] bool. Returns o [S, T, Hv, dv] in v's dtype and
    the states [S, T, Hv, dk, dv] (fp32; fp64 for fp64 inputs); each slot takes the state after its last token, in
    place. The GPU version (ops/triton_gdn.py) reads each state once and writes it T + 1 times."""
    S, T = v.shape[:2]
    beta, g = gates(b.reshape(S, T, -1), a.reshape(S, T, -1), A_log, dt_bias)
    h0 = state[slots].masked_fill(fresh[:, None, None, None], 0)
    o, states = recurrent_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=h0, output_all_states=True)
    state[slots] = states[:, -1].to(state.dtype)
    return o, states
