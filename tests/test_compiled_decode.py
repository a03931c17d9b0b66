"""The compiled decode layer (ops/fused.decode_compiled) traces the whole decoder layer as one graph — no graph
break (fullgraph), attention, Gated DeltaNet and dense layers, a batch that shrinks, a context that grows, a
speculative verification step that keeps every GDN state — and gives the eager result. On CPU it is checked with the `aot_eager` backend (tracing and the functionalised graph,
no code generation); the GPU run (benchmarks/check_gpu.py) checks Inductor's code against eager."""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from hf_reference import hf_next

from qwen3next import BatchMeta, HybridCache, load_model
from qwen3next.ops import fused, kernels

_DECODE_DEFAULTS = dict(fused.DECODE)


def _dense_experts(x, gate_up, down, ids, weights):
    """Every expert on every token, masked: traceable without a data-dependent loop (the CPU reference loops over
    the experts that received tokens; on CUDA the grouped-GEMM path is traceable as it is)."""
    inter = down.shape[-1]
    w = torch.zeros(x.shape[0], gate_up.shape[0], dtype=weights.dtype).scatter(1, ids, weights)
    h = torch.einsum("nh,eih->nei", x, gate_up)
    y = torch.einsum("nei,ehi->neh", F.silu(h[..., :inter]) * h[..., inter:], down)
    return (y * w[..., None]).sum(1)


def _fused_moe(*args):
    """The fused decode MoE as the opaque custom op it is on GPU (its CPU kernel is the torch reference)."""
    from qwen3next.ops.custom_ops import moe_decode
    return moe_decode(*args).sum(1).to(args[0].dtype)


def _paged_attention_op(q, k_pages, v_pages, meta, scale):
    """Decode steps through the paged decode attention custom op (its CPU kernel is the torch reference)."""
    from qwen3next.ops.attention import paged_attention
    from qwen3next.ops.custom_ops import paged_decode_attention
    if not meta.is_decode:
        return paged_attention(q, k_pages, v_pages, meta, scale)
    return paged_decode_attention(q, k_pages, v_pages, meta.page_table, meta.context_lens, meta.max_context_len,
                                  scale)


@pytest.fixture(params=["torch ops", "custom ops (fused MoE, routing, in-place GDN and conv steps, gemv, "
                                     "paged attention, in-place KV write, projections side by side)"])
def compiled_on_cpu(request):
    kernels.use(experts_forward=_dense_experts)
    if request.param != "torch ops":
        from qwen3next.ops.custom_ops import conv_step, gdn_decode, gemv, gemv_multi, route, write_kv
        kernels.use(moe_decode=_fused_moe, route=route, write_kv=write_kv, paged_attention=_paged_attention_op,
                    gated_delta_decode=lambda *a: gdn_decode(*a, None),   # mutates the state pool in place
                    causal_conv1d_step=conv_step,                        # so does this
                    # on GPU only one-row inputs take it; its CPU kernel (F.linear) takes any, so every step traces it
                    linear=lambda x, w, b: gemv(x, w) if b is None else F.linear(x, w, b),
                    linear_multi=lambda x, ws: list(gemv_multi(x, ws).split([w.shape[0] for w in ws], -1)))
    yield
    fused.DECODE.update(_DECODE_DEFAULTS)
    kernels.reset()


@torch.inference_mode()
def _decode_run(model, ids, compiled: bool):
    fused.DECODE.update(enabled=compiled, backend="aot_eager", fullgraph=True, verify=True)
    cache = HybridCache(model.config, 3, 30, 8, dtype=torch.float64)
    tables = [list(range(i * 10, i * 10 + 10)) for i in range(3)]
    meta = BatchMeta.build([20] * 3, [0] * 3, [0, 1, 2], tables, 8)
    out = [model(ids[:, :20].reshape(-1), cache=cache, meta=meta).logits]
    for t in range(20, 26):
        B = 3 if t < 23 else 2          # a sequence leaves: the batch shape changes
        meta = BatchMeta.build([1] * B, [t] * B, list(range(B)), tables[:B], 8)
        out.append(model(ids[:B, t], cache=cache, meta=meta).logits)
    # a speculative verification: 3 tokens per sequence, GDN states kept after each
    meta = BatchMeta.build([3, 3], [26, 26], [0, 1], tables[:2], 8, keep_step_states=[True, True])
    out.append(model(ids[:2, 26:29].reshape(-1), cache=cache, meta=meta).logits)
    gdn = [layer for layer in cache.layers if hasattr(layer, "recurrent")]
    out += [t for layer in gdn for i in (0, 1) for t in layer.steps[i]]
    return out


def test_compiled_decode_layer_equals_eager(tmp_path, compiled_on_cpu):
    hf_next(seed=7, mlp_only_layers=[1]).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype=torch.float64)
    ids = torch.randint(0, 97, (3, 29), generator=torch.Generator().manual_seed(2))
    eager = _decode_run(model, ids, compiled=False)
    torch._dynamo.reset()
    counters.clear()
    compiled = _decode_run(model, ids, compiled=True)
    assert counters["stats"]["unique_graphs"] >= 4      # GDN+MoE, attention+MoE, GDN+dense MLP layers, verify
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


@torch.inference_mode()
def test_new_batch_sizes_do_not_recompile_the_decode_layers(tmp_path, compiled_on_cpu):
    """After one recompile makes the batch dimension symbolic, decode steps of further batch sizes reuse the
    compiled layers: nothing in the traced code may read BatchMeta's per-sequence lists (a list read guards on its
    length, which once made every batch size compile every layer kind anew: 100-150 s of engine warm-up on an
    H100)."""
    hf_next(seed=7, mlp_only_layers=[1]).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype=torch.float64)
    fused.DECODE.update(enabled=True, backend="eager", fullgraph=True)
    torch._dynamo.reset()
    counters.clear()
    cache = HybridCache(model.config, 6, 60, 8, dtype=torch.float64)
    tables = [list(range(i * 10, i * 10 + 10)) for i in range(6)]
    graphs = []
    for B in (4, 3, 2, 5, 6):
        meta = BatchMeta.build([1] * B, [7] * B, list(range(B)), tables[:B], 8)
        model(torch.randint(0, 97, (B,)), cache=cache, meta=meta)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] <= 2 * graphs[0]                   # one recompile per layer kind, to symbolic shapes
    assert graphs[-1] == graphs[1], graphs              # and none after it


@torch.inference_mode()
def test_decode_steps_above_max_tokens_run_the_eager_layers(tmp_path, compiled_on_cpu):
    """Large decode batches run the eager layers (on an H100 they beat the compiled ones from 16 sequences on)."""
    hf_next(seed=7, mlp_only_layers=[1]).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype=torch.float64)
    fused.DECODE.update(enabled=True, backend="eager", fullgraph=True, max_tokens=2)
    torch._dynamo.reset()
    counters.clear()
    cache = HybridCache(model.config, 3, 30, 8, dtype=torch.float64)
    tables = [list(range(i * 10, i * 10 + 10)) for i in range(3)]
    for B, compiled in ((3, False), (2, True)):
        meta = BatchMeta.build([1] * B, [7] * B, list(range(B)), tables[:B], 8)
        model(torch.randint(0, 97, (B,)), cache=cache, meta=meta)
        assert (counters["stats"]["unique_graphs"] > 0) == compiled, B


def test_gdn_verify_op_states_its_outputs_right():
    """The custom op of the GDN verification kernel: its fake (what torch.compile plans with) must give the real
    kernel's shapes and strides also for channels-first q, k, v, as the torch conv of a verification step leaves
    them (a fake with v's strides made the compiled verification fail on the GPU, 2026-11-24)."""
    from qwen3next.ops import custom_ops
    S, T, Hk, Hv, dk, dv = 2, 3, 2, 4, 8, 8
    y = torch.randn(S, 2 * Hk * dk + Hv * dv, T).transpose(1, 2)
    q, k, v = y.split([Hk * dk, Hk * dk, Hv * dv], -1)
    args = (q.reshape(S, T, Hk, dk), k.reshape(S, T, Hk, dk), v.reshape(S, T, Hv, dv), torch.randn(S, T, Hv),
            torch.randn(S, T, Hv), torch.randn(Hv), torch.randn(Hv), torch.randn(4, Hv, dk, dv),
            torch.tensor([3, 1]), torch.tensor([False, True]))
    torch.library.opcheck(custom_ops.gdn_verify, args)


def test_qk_norm_rope_op_is_the_reference_and_states_its_outputs_right():
    """The custom op of attention's q/k preparation (ops/triton_rope.py inside compiled decode layers): its CPU
    kernel is the torch reference followed by the KV write, and its fake matches it (opcheck), for q a strided view
    with the output gate between heads."""
    from qwen3next.ops import attention, custom_ops, rope
    N, Hq, Hkv, D = 3, 4, 2, 16
    qg, k, v = torch.randn(N, Hq, 2 * D), torch.randn(N, Hkv, D), torch.randn(N, Hkv, D)
    q = qg[..., :D]
    wq, wk = torch.randn(D) * 0.1, torch.randn(D) * 0.1
    cos, sin = rope.rotary_cos_sin(torch.tensor([5, 0, 9]), 1.0 / (1e4 ** (torch.arange(0, 8, 2) / 8)), 1.0,
                                   torch.float32)
    kp, vp = torch.zeros(4, 4, Hkv, D), torch.zeros(4, 4, Hkv, D)
    slots = torch.tensor([7, 0, 13])
    got_q, got_k = custom_ops.qk_norm_rope_kv(q, k, v, wq, wk, 1e-6, True, cos, sin, kp, vp, slots)
    want_q, want_k = rope.qk_norm_rope(q, k, wq, wk, 1e-6, True, cos, sin)
    want_kp, want_vp = torch.zeros_like(kp), torch.zeros_like(vp)
    attention.write_kv(want_kp, want_vp, want_k, v, slots)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(kp, want_kp) and torch.equal(vp, want_vp)
    torch.library.opcheck(custom_ops.qk_norm_rope_kv, (q, k, v, wq, wk, 1e-6, True, cos, sin, kp, vp, slots))
