"""A prompt's first chunk through the static, padded buffers of engine/prefill_graphs.py (what a CUDA graph
replays), run eagerly on CPU: the buckets, what padding rows may and may not touch, and greedy output identical
to the eager runner for prompts in one chunk and in several, after preemption and with speculative decoding.
The capture itself needs a GPU (benchmarks/engine_graphs.py)."""
import pytest
import torch

from tiny_models import ENGINE_CFG, engine_checkpoint, output_tokens, random_prompts
from qwen3next import LLM, SamplingParams
from qwen3next.engine.prefill_graphs import PrefillGraphs, prefill_buckets
from qwen3next.engine.sampling_params import SamplingParams as SP
from qwen3next.engine.scheduler import ScheduledBatch
from qwen3next.engine.sequence import Sequence
from qwen3next.model.cache import GDNState, KVPages

CFG = ENGINE_CFG


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return engine_checkpoint(tmp_path_factory, "prefill_graphs", seed=5)


def make(path, static: bool, max_tokens: int = 64, decode_static: bool = True, **kw):
    kw.setdefault("max_model_len", 128)
    llm = LLM(path, skip_tokenizer_init=True, dtype=torch.float64, device="cpu", **kw)
    r = llm.engine.runner
    assert r.prefill_graphs is None                    # CPU: no graphs unless a test asks for them
    if decode_static:
        r.graphs = r.decode_graphs(capture=False)
    if static:
        r.prefill_graphs = r.make_prefill_graphs(max_tokens, capture=False)
    return llm


prompts, tokens = random_prompts, output_tokens


def test_buckets():
    assert prefill_buckets(4096) == [64, 128, 256, 512, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096]
    assert prefill_buckets(64) == [64] and prefill_buckets(10) == [10]
    assert prefill_buckets(100) == [64, 100]
    assert prefill_buckets(1600) == [64, 128, 256, 512, 1024, 1280, 1536, 1600]
    sizes = prefill_buckets(4096)
    assert all(b / a <= 1.25 for a, b in zip(sizes, sizes[1:]) if a >= 1024)     # padding < 25% above 1K
    with pytest.raises(ValueError, match="max_tokens"):
        prefill_buckets(0)


def test_switches():
    from qwen3next.cli import build_parser
    p = build_parser()
    assert p.parse_args(["generate", "x"]).prefill_graph_tokens is None
    assert p.parse_args(["generate", "x", "--prefill-graph-tokens", "0"]).prefill_graph_tokens == 0
    assert p.parse_args(["serve", "--prefill-graph-tokens", "2048"]).prefill_graph_tokens == 2048
    with pytest.raises(ValueError, match="prefill_graph_tokens"):
        LLM(device="cpu", prefill_graph_tokens=-1)


def _state(runner, slot, pages, ps):
    out = []
    for layer in runner.cache.layers:
        if isinstance(layer, GDNState):
            out += [layer.conv[slot].clone(), layer.recurrent[slot].clone()]
        else:
            rows = torch.tensor([p * ps + j for p in pages for j in range(ps)])
            out += [layer.k.view(-1, *layer.k.shape[2:])[rows].clone(),
                    layer.v.view(-1, *layer.v.shape[2:])[rows].clone()]
    return out


@pytest.mark.parametrize("n", [2, 3, 5, 37, 64, 70])
@torch.inference_mode()
def test_padded_step_equals_the_eager_one(ckpt, n):
    """Logits, the hiddens of the real tokens, the slot's GDN states and the sequence's KV rows equal the eager
    step's; padding rows write only the scratch page (not the rows past n of the sequence's own last page)."""
    ps = 16
    ids = torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    pages = [3, 0, 5, 6, 1][: -(-n // ps)]
    out = {}
    for static in (False, True):
        llm = make(ckpt, static=static, max_tokens=96, page_size=ps, max_num_seqs=2, num_kv_pages=8)
        r = llm.engine.runner
        for layer in r.cache.layers:           # a recognisable filler: what padding must not overwrite
            for t in ((layer.k, layer.v) if isinstance(layer, KVPages) else (layer.conv, layer.recurrent)):
                t.fill_(0.5)
        r.cache.zero_slots([1])
        s = Sequence("r", None, ids, SP())
        s.slot, s.pages, s.num_computed = 1, list(pages), 0
        logits, rows, hidden = r.forward(ScheduledBatch([s], [n]))
        out[static] = (logits, hidden, _state(r, 1, pages, ps), r)
    (l0, h0, s0, _), (l1, h1, s1, r1) = out[False], out[True]
    g: PrefillGraphs = r1.prefill_graphs
    size = next(b for b in g.sizes if b >= n)
    assert g.replays == 1 and g.padded_rows == size - n and list(g.buckets) == [size]
    assert l1.shape == l0.shape == (1, CFG.vocab_size) and h1.shape == h0.shape == (n, CFG.hidden_size)
    torch.testing.assert_close(l1, l0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(h1, h0, rtol=1e-9, atol=1e-9)
    for a, b in zip(s1, s0):   # the rows past n of the last page keep the filler in both
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    m = g.buckets[size].meta
    assert m.valid.tolist() == [True] * n + [False] * (size - n) and m.cu_seqlens.tolist() == [0, n]
    scratch = g.scratch_page * ps
    assert m.slot_mapping[n:].tolist() == [scratch + p % ps for p in range(n, size)]
    assert m.slot_mapping[:n].tolist() == [pages[p // ps] * ps + p % ps for p in range(n)]


@torch.inference_mode()
def test_a_one_token_prompt_is_a_decode_graphs_fresh_row(ckpt):
    """Alone or beside decoding sequences, a one-token prompt needs no padding to 64: the decode graph takes the
    whole step (a row starting at position 0 starts from a zero state)."""
    out = []
    for static in (False, True):
        r = make(ckpt, static=static).engine.runner
        s = Sequence("r", None, [7], SP())
        s.slot, s.pages, s.num_computed = 0, [0], 0
        out.append(r.forward(ScheduledBatch([s], [1]))[0])
        if static:
            assert r.prefill_graphs.replays == 0 and r.graphs.replays == 1
    torch.testing.assert_close(out[1], out[0], rtol=1e-9, atol=1e-9)


@torch.inference_mode()
def test_a_chunk_that_does_not_end_the_prompt_has_no_logits(ckpt):
    llm = make(ckpt, static=True, max_tokens=64)
    r = llm.engine.runner
    s = Sequence("r", None, list(range(1, 41)), SP())
    s.slot, s.pages, s.num_computed = 0, [0, 1, 2], 0
    logits, rows, hidden = r.forward(ScheduledBatch([s], [24]))
    assert logits.shape == (0, CFG.vocab_size) and rows == {} and hidden.shape == (24, CFG.hidden_size)
    assert r.prefill_graphs.replays == 1


def test_greedy_identical_whole_chunked_preempted(ckpt):
    ps = prompts([5, 40, 17, 3, 60, 1, 2, 64, 90])
    sps = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (20, 6, 14, 25, 3, 17, 12, 5, 8)]
    ref = tokens(make(ckpt, static=False, decode_static=False).generate(ps, sps))
    # one sequence at a time: every prompt's first chunk alone in its step (the 90-token one is too long for the
    # 64-token buckets: eager; the 1-token one is a decode graph's fresh row)
    llm = make(ckpt, static=True, max_num_seqs=1)
    assert tokens(llm.generate(ps, sps)) == ref
    st = llm.engine.usage()["cuda_graphs"]["prefill"]
    assert st["replays"] == 7 and st["padded_rows"] > 0 and not st["failed"]
    # chunks of 24 tokens: first chunks through the graph, later ones eagerly
    chunked = make(ckpt, static=True, max_num_seqs=1, max_num_batched_tokens=24)
    assert tokens(chunked.generate(ps, sps)) == ref
    assert chunked.engine.usage()["cuda_graphs"]["prefill"]["replays"] == 8
    # several sequences: the first prompts start together (eagerly); each later one joins sequences that decode,
    # and replays its prefill graph beside their decode graph; under preemption too
    for kw in ({}, {"num_kv_pages": 10, "page_size": 8, "max_model_len": 96}):
        llm = make(ckpt, static=True, max_num_seqs=3, **kw)
        n = 9 if not kw else 8                                      # (the 90-token prompt does not fit in 96)
        assert tokens(llm.generate(ps[:n], sps[:n])) == ref[:n], kw
        st = llm.engine.usage()["cuda_graphs"]
        assert st["prefill"]["beside_decode"] >= (1 if kw else 4), (kw, st)
        assert st["prefill"]["replays"] >= st["prefill"]["beside_decode"]
        assert st["replays"] > 0 and st["eager_steps"] > 0
        if kw:
            assert llm.engine.scheduler.num_preemptions > 0


@torch.inference_mode()
def test_beside_decoding_sequences_equals_one_eager_step(ckpt):
    """One prompt's chunk beside two decoding sequences: the two graphs' logits, rows and packed hiddens equal the
    eager mixed step's, whatever the prompt's place in the batch."""
    for where in (0, 1, 2):
        out = []
        for static in (False, True):
            r = make(ckpt, static=static, max_num_seqs=3, page_size=16).engine.runner
            seqs = []
            for k, m in enumerate((5, 9)):    # two sequences, prefilled eagerly, that then decode a token each
                d = Sequence(f"d{k}", None, list(range(3 + k, 3 + k + m)), SP())
                d.slot, d.pages, d.num_computed = k, [k], 0
                r._step(ScheduledBatch([d], [m - 1]))
                d.num_computed = m - 1
                seqs.append(d)
            p = Sequence("p", None, list(range(20, 57)), SP())
            p.slot, p.pages, p.num_computed = 2, [4, 5, 6], 0
            seqs.insert(where, p)
            counts = [37 if x is p else 1 for x in seqs]
            out.append(r.forward(ScheduledBatch(seqs, counts)))
            if static:
                assert r.prefills_beside_decode == 1 and r.graphs.replays == 1
        (l0, r0, h0), (l1, r1, h1) = out
        assert r0.keys() == r1.keys() == {0, 1, 2} and l1.shape == l0.shape == (3, CFG.vocab_size)
        for i in r0:
            torch.testing.assert_close(l1[r1[i]], l0[r0[i]], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(h1, h0, rtol=1e-9, atol=1e-9)


@torch.inference_mode()
def test_a_recomputed_sequence_goes_through_the_graph(ckpt):
    """After preemption a sequence's prompt and generated tokens are prefilled again from its first token."""
    out = []
    for static in (False, True):
        r = make(ckpt, static=static).engine.runner
        s = Sequence("r", None, list(range(1, 31)), SP())
        s.output_token_ids = [7, 9, 11]
        s.slot, s.pages, s.num_computed = 0, [0, 1, 2], 0
        out.append(r.forward(ScheduledBatch([s], [33])))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-9, atol=1e-9)
    assert out[1][1] == out[0][1] == {0: slice(0, 1)} and out[1][2].shape == (33, CFG.hidden_size)


def test_greedy_identical_with_speculative_decoding(ckpt):
    """The MTP head catches up on the prompt from the hiddens the graph returns (copies of the real rows)."""
    ps = prompts([7, 30, 12, 45], seed=1)
    sps = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (16, 6, 16, 9)]
    spec = dict(max_num_seqs=1, speculative_tokens=2, speculative_adaptive=False)
    eager = make(ckpt, static=False, decode_static=False, **spec)
    llm = make(ckpt, static=True, **spec)
    assert tokens(llm.generate(ps, sps)) == tokens(eager.generate(ps, sps))
    assert llm.engine.usage()["cuda_graphs"]["prefill"]["replays"] == 4
    assert llm.engine.usage()["speculative"] == eager.engine.usage()["speculative"]


def test_warm_up_prepares_every_bucket_in_the_scratch(ckpt):
    llm = make(ckpt, static=True, max_tokens=100, max_num_seqs=2)
    r = llm.engine.runner
    held = [t[:r.num_slots].clone() for layer in r.cache.layers if isinstance(layer, GDNState)
            for t in (layer.conv, layer.recurrent)]
    r.warm_up(force=True)
    assert sorted(r.prefill_graphs.buckets) == [64, 100]
    after = [t[:r.num_slots] for layer in r.cache.layers if isinstance(layer, GDNState)
             for t in (layer.conv, layer.recurrent)]
    assert all(torch.equal(a, b) for a, b in zip(held, after))
