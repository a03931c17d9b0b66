"""ops/sdpa.py: the steered prefill attention (FlashAttention for short prompts, padded cuDNN for long ones, the
bottom-right causal bias for later chunks) gives what torch's plain calls give. Steering is switched on here on
the CPU, with small thresholds, so every branch runs."""
import pytest
import torch

from qwen3next.ops import sdpa


@pytest.fixture
def steered(monkeypatch):
    monkeypatch.setitem(sdpa.STEER, "enabled", True)
    monkeypatch.setitem(sdpa.STEER, "cudnn_min_tokens", 16)
    monkeypatch.setitem(sdpa.STEER, "cudnn_bucket", 16)


def _qkv(n, ctx, hq=4, hkv=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, hq, n, d, generator=g), torch.randn(1, hkv, ctx, d, generator=g),
            torch.randn(1, hkv, ctx, d, generator=g))


def _plain_causal(q, k, v, scale):
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    L = q.shape[2]
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("L", [5, 16, 20, 33])     # below the cuDNN threshold; a whole bucket; padded (twice)
def test_causal_steered_equals_plain(steered, L):
    q, k, v = _qkv(L, L)
    torch.testing.assert_close(sdpa.causal(q, k, v, 0.2), _plain_causal(q, k, v, 0.2), rtol=1e-5, atol=1e-5)


def test_causal_unsteered_path_is_torch_default(monkeypatch):
    monkeypatch.setitem(sdpa.STEER, "enabled", "auto")            # CPU: not steered
    q, k, v = _qkv(20, 20)
    torch.testing.assert_close(sdpa.causal(q, k, v, 0.2), _plain_causal(q, k, v, 0.2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,ctx", [(1, 9), (7, 30), (12, 12)])
def test_chunk_over_cache_is_bottom_right_causal(steered, n, ctx):
    q, k, v = _qkv(n, ctx)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    want = []
    for i in range(n):     # query i is at position p = ctx - n + i and sees keys 0..p
        p = ctx - n + i
        s = (q[:, :, i:i + 1] @ kr[:, :, :p + 1].transpose(-1, -2)) * 0.3
        want.append(s.softmax(-1) @ vr[:, :, :p + 1])
    want = torch.cat(want, 2)
    got = sdpa.chunk_over_cache(q, k, v, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    sdpa.STEER["enabled"] = False                                   # the boolean-mask form agrees too
    torch.testing.assert_close(sdpa.chunk_over_cache(q, k, v, 0.3), want, rtol=1e-5, atol=1e-5)


def test_autograd_keeps_torch_choice(steered):
    q, k, v = (t.requires_grad_() for t in _qkv(20, 20))
    out = sdpa.causal(q, k, v, 0.2)          # no padding copies in the graph: plain SDPA
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


@torch.no_grad()
def test_steered_chunked_prefill_equals_full_forward(steered, tmp_path):
    """The model through the paged cache in uneven chunks (first chunk padded for "cuDNN", later ones bottom-right
    causal) equals its unsteered full forward, in float64."""
    from conftest import rel_err
    from hf_reference import hf_next

    from qwen3next import load_model
    hf_next(seed=3).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype=torch.float64)
    ids = torch.randint(0, 97, (2, 90), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(2, 90)
    parts = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 21), (21, 60), (60, 90))]
    sdpa.STEER["enabled"] = False
    assert rel_err(torch.cat(parts, 1), model(ids).logits) < 1e-10
