"""Chunked and recurrent gated delta rule against a float64 token-by-token oracle; the conv with state."""
import pytest
import torch
from conftest import rel_err

from qwen3next.ops.conv1d import causal_conv1d
from qwen3next.ops.gated_delta import chunk_gated_delta_rule, l2norm, recurrent_gated_delta_rule


def oracle(q, k, v, g, beta, h0=None):
    """The defining recurrence, written as plainly as possible, in float64."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    q, k = l2norm(q) * q.shape[-1] ** -0.5, l2norm(k)
    B, T, H, dk = q.shape
    S = torch.zeros(B, H, dk, v.shape[-1], dtype=torch.float64) if h0 is None else h0.double().clone()
    out = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                S[b, h] = torch.exp(g[b, t, h]) * S[b, h]
                u = beta[b, t, h] * (v[b, t, h] - S[b, h].T @ k[b, t, h])
                S[b, h] = S[b, h] + torch.outer(k[b, t, h], u)
                out[b, t, h] = S[b, h].T @ q[b, t, h]
    return out, S


def inputs(B, T, H, dk, dv, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    g = -torch.rand(B, T, H, generator=gen, dtype=dtype) * 0.5       # log decays in (-0.5, 0]
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    return r(B, T, H, dk), r(B, T, H, dk), r(B, T, H, dv), g, beta, r(B, H, dk, dv)


@pytest.mark.parametrize("B,T,H,dk,dv,seed", [(1, 1, 1, 4, 4, 0), (2, 63, 2, 8, 6, 1), (1, 130, 3, 16, 8, 2),
                                              (2, 200, 2, 5, 7, 3)])
def test_chunk_and_recurrent_equal_float64_oracle(B, T, H, dk, dv, seed):
    q, k, v, g, beta, h0 = inputs(B, T, H, dk, dv, seed)
    ref, ref_state = oracle(q, k, v, g, beta, h0)
    for rule in (chunk_gated_delta_rule, recurrent_gated_delta_rule):
        o64, s64 = rule(*(x.double() for x in (q, k, v, g, beta)), initial_state=h0.double(), output_final_state=True)
        assert rel_err(o64, ref) < 1e-12 and rel_err(s64, ref_state) < 1e-12, rule.__name__
        o32, s32 = rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        assert o32.dtype == torch.float32 and s32.dtype == torch.float32
        assert rel_err(o32, ref) < 2e-5 and rel_err(s32, ref_state) < 2e-5, rule.__name__


def test_chunked_strong_decay_is_finite():
    # cumulative log-decay of -40 per token: exp(G_i - G_j) must be formed from differences, never exp(+big)
    q, k, v, _, beta, _ = inputs(1, 128, 2, 8, 8, 4)
    g = torch.full((1, 128, 2), -40.0)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    ref, ref_s = oracle(q, k, v, g, beta)
    assert torch.isfinite(o).all() and rel_err(o, ref) < 1e-5


def test_packed_sequences_equal_separate_runs():
    q, k, v, g, beta, _ = inputs(1, 100, 2, 8, 8, 5)
    h0 = torch.randn(3, 2, 8, 8)
    cu = torch.tensor([0, 30, 31, 100])
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for i in range(3):
        a, b = cu[i], cu[i + 1]
        oi, si = oracle(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], h0[i:i + 1])
        assert rel_err(o[:, a:b], oi) < 2e-5 and rel_err(s[i:i + 1], si) < 2e-5


def test_padding_with_zero_k_beta_g_keeps_state():
    q, k, v, g, beta, h0 = inputs(1, 10, 2, 4, 4, 6)
    _, s = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    z = torch.zeros_like
    qp, kp, vp = (torch.cat([torch.randn(1, 5, 2, 4), x], 1) for x in (q, k, v))
    kp[:, :5] = 0
    gp, bp = torch.cat([z(g[:, :5]), g], 1), torch.cat([z(beta[:, :5]), beta], 1)
    _, sp = recurrent_gated_delta_rule(qp, kp, vp, gp, bp, initial_state=h0, output_final_state=True)
    assert rel_err(sp, s) < 1e-6


def test_conv_state_carries_across_chunks():
    x, w = torch.randn(2, 11, 6), torch.randn(6, 4)
    full, state = causal_conv1d(x, w)
    y1, s1 = causal_conv1d(x[:, :2], w)            # shorter than the kernel
    y2, s2 = causal_conv1d(x[:, 2:7], w, s1)
    y3, s3 = causal_conv1d(x[:, 7:], w, s2)
    assert torch.allclose(torch.cat([y1, y2, y3], 1), full, atol=1e-6) and torch.allclose(s3, state)
    # against an explicit sum: y_t = silu(sum_j w[:, j] x_{t-3+j})
    xp = torch.nn.functional.pad(x, (0, 0, 3, 0))
    manual = sum(w[:, j] * xp[:, j:j + 11] for j in range(4))
    assert torch.allclose(full, torch.nn.functional.silu(manual), atol=1e-6)


def test_conv_decode_step_updates_its_slots_in_place():
    """ops/conv1d.causal_conv1d_step (the oracle of the Triton step kernel): token by token through a state pool in
    shuffled slots it equals the whole-sequence conv; a fresh sequence ignores what its slot held; other slots are
    untouched."""
    from qwen3next.ops.conv1d import causal_conv1d_step
    x, w = torch.randn(2, 7, 6, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    full, final = causal_conv1d(x, w)
    pool = torch.randn(5, 6, 3, dtype=torch.float64)
    untouched = pool[[0, 1, 4]].clone()
    slots = torch.tensor([3, 2])
    ys = [causal_conv1d_step(x[:, t], w, pool, slots, torch.tensor([t == 0, t == 0])) for t in range(7)]
    assert torch.allclose(torch.stack(ys, 1), full, atol=1e-12)
    assert torch.allclose(pool[slots], final) and torch.equal(pool[[0, 1, 4]], untouched)


def test_linear_layers_go_through_the_op_table():
    """Model projections call kernels.linear (the one-row GPU kernel's entry); on CPU it is F.linear; the
    parameters keep nn.Linear's names, so checkpoints do not change."""
    from qwen3next.model.linear import Linear
    from qwen3next.ops import kernels
    lin = Linear(8, 3, bias=False)
    x = torch.randn(1, 8)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight))
    assert list(lin.state_dict()) == ["weight"]
    calls = []
    kernels.use(linear=lambda x, w, b: calls.append(x.shape) or torch.nn.functional.linear(x, w, b))
    try:
        lin(x)
    finally:
        kernels.reset()
    assert calls == [(1, 8)]


def test_conv_hands_over_l2_normed_q_k():
    """kernels.causal_conv1d(split=..., l2norm_head=d): q and k come l2-normalised per head (the model then runs
    the delta rule without its own normalisation), v untouched; on the torch path too."""
    from qwen3next.ops import conv1d, kernels
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 9, 40, generator=g), torch.randn(40, 4, generator=g)
    (q, k, v), final = kernels.causal_conv1d(x, w, None, split=[8, 8, 24], l2norm_head=4)
    y, want_final = conv1d.causal_conv1d(x, w, None)
    wq, wk, wv = y.split([8, 8, 24], -1)
    for got, want in ((q, wq), (k, wk)):
        heads = want.reshape(1, 9, 2, 4)
        torch.testing.assert_close(got, (heads / (heads.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()).reshape(want.shape))
    torch.testing.assert_close(v, wv)
    torch.testing.assert_close(final, want_final)
