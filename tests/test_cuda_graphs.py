"""Decode steps through the static buffers of engine/graphs.py (what a CUDA graph replays), run eagerly on CPU:
bucket choice, padding rows, the per-slot page table, and greedy output identical to the eager runner across
padded buckets, a shrinking batch, slot reuse, preemption and speculative decoding; a failed capture falls back
to eager steps. The capture itself needs a GPU."""
import logging

import pytest
import torch

from tiny_models import ENGINE_CFG, engine_checkpoint, output_tokens, random_prompts
from qwen3next import LLM, SamplingParams
from qwen3next.engine.graphs import DecodeGraphs, bucket_sizes, graphs_enabled
from qwen3next.engine.sampling_params import SamplingParams as SP
from qwen3next.engine.sequence import Sequence
from qwen3next.model.cache import KVPages

CFG = ENGINE_CFG


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return engine_checkpoint(tmp_path_factory, "graphs", seed=3)


def make(path, static: bool, **kw):
    kw.setdefault("max_model_len", 128)
    llm = LLM(path, skip_tokenizer_init=True, dtype=torch.float64, device="cpu", **kw)
    assert llm.engine.runner.graphs is None                    # CPU: no graphs unless a test asks for them
    if static:
        llm.engine.runner.graphs = llm.engine.runner.decode_graphs(capture=False)
    return llm


prompts, tokens = random_prompts, output_tokens


def spy_batch_sizes(llm) -> list[int]:
    graphs, seen = llm.engine.runner.graphs, []
    run = graphs.run
    graphs.run = lambda seqs: (seen.append(len(seqs)), run(seqs))[1]
    return seen


def test_buckets():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(3) == [1, 2, 3]
    assert bucket_sizes(5) == [1, 2, 4, 5]
    assert bucket_sizes(16) == [1, 2, 4, 8, 16]
    assert bucket_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert bucket_sizes(1000)[-1] == 512 and bucket_sizes(1000)[-2] == 504


def test_switches(monkeypatch):
    from qwen3next.cli import build_parser
    assert not graphs_enabled(torch.device("cpu"))
    assert graphs_enabled(torch.device("cuda")) and not graphs_enabled(torch.device("cuda"), False)
    monkeypatch.setenv("QWEN3NEXT_CUDA_GRAPHS", "0")
    assert not graphs_enabled(torch.device("cuda"))
    p = build_parser()
    assert p.parse_args(["generate", "x"]).cuda_graphs is True
    assert p.parse_args(["generate", "x", "--no-cuda-graphs"]).cuda_graphs is False
    assert p.parse_args(["chat", "--no-cuda-graphs"]).cuda_graphs is False
    assert p.parse_args(["serve", "--no-cuda-graphs"]).cuda_graphs is False


def _seq(slot, pages, computed):
    s = Sequence(f"r{slot}", None, list(range(10, 10 + computed + 1)), SP())
    s.slot, s.pages, s.num_computed = slot, list(pages), computed
    return s


@torch.inference_mode()
def test_padding_rows_and_page_table(ckpt):
    llm = make(ckpt, static=True, max_num_seqs=6, page_size=8, num_kv_pages=20)
    g: DecodeGraphs = llm.engine.runner.graphs
    assert g.sizes == [1, 2, 4, 6] and (g.scratch_slot, g.scratch_page) == (6, 20) and g.pages.width == 16
    assert llm.engine.runner.cache.num_slots == 7 and llm.engine.runner.cache.num_pages == 21
    # three sequences -> bucket 4: one padding row
    a, b, c = _seq(0, [5], 3), _seq(2, [1, 7], 8), _seq(1, [3], 0)
    logits, hidden = g.run([a, b, c])
    assert logits.shape == (3, CFG.vocab_size) and hidden.shape == (3, CFG.hidden_size)
    m = g.buckets[4].meta
    assert m.q_lens == [1] * 4 and m.max_context_len == 128 and m.page_table.shape == (4, 16)
    assert g.buckets[4].views["ids"].tolist() == [13, 18, 10, 0]
    assert m.positions.tolist() == [3, 8, 0, 0]
    assert m.slots.tolist() == [0, 2, 1, 6]
    assert m.context_lens.tolist() == [4, 9, 1, 1]
    assert m.fresh.tolist() == [False, False, True, True]
    assert m.slot_mapping.tolist() == [5 * 8 + 3, 7 * 8, 3 * 8, 20 * 8]
    assert m.cu_seqlens.tolist() == [0, 1, 2, 3, 4] and m.token_seq.tolist() == [0, 1, 2, 3]
    assert m.token_index.tolist() == [0] * 4
    assert m.page_table[0, :1].tolist() == [5] and m.page_table[1, :2].tolist() == [1, 7]
    assert m.page_table[2, :1].tolist() == [3] and m.page_table[3].tolist() == [20] * 16
    assert g.padded_rows == 1 and g.replays == 1
    # next step: `a` crossed into a new page (one inline update); a new sequence re-uses slot 2 with more pages
    # than the bucket's update area holds (the rest are written separately); `c` finished: bucket 2
    a.pages.append(9)
    a.num_computed = 8
    a.prompt_token_ids = list(range(10, 19))
    d = _seq(2, [4, 6, 8, 10, 11], 33)
    values, extra = g.row_values(2, [a, d])
    assert values[8:12] == [0 * 16 + 1, 2 * 16 + 0, 9, 4] and len(extra) == 4    # update indices, then pages
    g.pages.mirror[0], g.pages.mirror[2] = [5], [1, 7]                                       # as before row_values
    g.run([a, d])
    m = g.buckets[2].meta
    assert m.page_table[0, :2].tolist() == [5, 9] and m.page_table[1, :5].tolist() == [4, 6, 8, 10, 11]
    assert m.slot_mapping.tolist() == [9 * 8, 11 * 8 + 1] and m.context_lens.tolist() == [9, 34]
    assert g.padded_rows == 1 and g.replays == 2


def test_greedy_identical_padded_shrinking_reused_preempted(ckpt):
    ps = prompts([5, 40, 17, 3, 28, 11, 60])
    sps = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (20, 6, 14, 25, 3, 17, 12)]
    ref = tokens(make(ckpt, static=False).generate(ps, sps))
    # 5 slots for 7 requests: buckets 1, 2, 4, 5; requests finish at different steps and the last two re-use
    # freed slots
    llm = make(ckpt, static=True, max_num_seqs=5)
    seen = spy_batch_sizes(llm)
    assert tokens(llm.generate(ps, sps)) == ref
    st = llm.engine.usage()["cuda_graphs"]
    assert {3, 5} <= set(seen) and st["replays"] == len(seen) and st["padded_rows"] > 0
    assert st["eager_steps"] > 0 and not st["failed"]
    # too few KV pages for all of them: preemption and recompute, slots and pages handed around
    tight = make(ckpt, static=True, max_num_seqs=5, num_kv_pages=10, page_size=8, max_model_len=80)
    assert tokens(tight.generate(ps, sps)) == ref
    assert tight.engine.scheduler.num_preemptions > 0 and tight.engine.usage()["cuda_graphs"]["replays"] > 0
    u = tight.engine.usage()
    assert u["pages_used"] == 0 and u["slots_used"] == 0


def test_greedy_identical_with_speculative_decoding(ckpt):
    """Decode steps between verification steps go through the static path; the hiddens it returns are kept by
    the speculator across steps (they must be copies, not views of the static outputs); drafts and acceptance
    are the eager runner's."""
    ps = prompts([7, 30, 12, 45], seed=1)
    sps = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (16, 6, 16, 9)]
    ref = tokens(make(ckpt, static=False).generate(ps, sps))
    # drafting only below 3 decoding sequences: plain decode steps at first, drafts once requests finish
    spec = dict(max_num_seqs=4, speculative_tokens=2, speculative_adaptive=False, speculative_disable_batch_size=3)
    eager = make(ckpt, static=False, **spec)
    assert tokens(eager.generate(ps, sps)) == ref
    llm = make(ckpt, static=True, **spec)
    kept, record = [], llm.engine.speculator.record
    llm.engine.speculator.record = lambda s, h: (kept.append((h, h.clone())), record(s, h))
    assert tokens(llm.generate(ps, sps)) == ref
    assert len(kept) > 20 and all(torch.equal(h, c) for h, c in kept)     # not overwritten by later steps
    u = llm.engine.usage()
    assert u["cuda_graphs"]["replays"] > 0 and u["speculative"]["verify_steps"] > 0
    assert u["speculative"] == eager.engine.usage()["speculative"]


def test_capture_failure_falls_back_to_eager(ckpt, monkeypatch, caplog):
    ps = prompts([9, 21, 4])
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = tokens(make(ckpt, static=False).generate(ps, sp))
    llm = make(ckpt, static=False, max_num_seqs=4)
    llm.engine.runner.graphs = llm.engine.runner.decode_graphs(capture=True)
    calls = []
    monkeypatch.setattr(DecodeGraphs, "_capture", lambda self, bk: (calls.append(bk.size), 1 / 0))
    with caplog.at_level(logging.WARNING, logger="qwen3next.engine"):
        assert tokens(llm.generate(ps, sp)) == ref
    st = llm.engine.usage()["cuda_graphs"]
    assert calls == [4] and st["failed"] and st["replays"] == 0 and st["buckets_captured"] == []
    assert sum("CUDA graph capture" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("spec", [0, 2])
def test_warm_up_touches_only_the_scratch_slot_and_page(ckpt, spec):
    """The start-up warm-up (a one- and a two-sequence prefill, a later chunk, through the MTP head too when
    speculating, the one-sequence decode bucket) runs only in the scratch slot and page: the states and pages
    requests use are unchanged, and requests decode the same tokens."""
    ps = prompts([5, 40, 17])
    sps = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (12, 6, 9)]
    ref = tokens(make(ckpt, static=False).generate(ps, sps))
    llm = make(ckpt, static=True, max_num_seqs=3, speculative_tokens=spec)
    runner = llm.engine.runner
    assert llm.engine.warm_up_s == 0.0                       # CPU: nothing at start-up
    slot, page = runner.num_slots, runner.num_pages

    def held():   # (tensor, rows requests may use): states by slot, KV by page
        out = []
        for layer in runner.cache.layers:
            if isinstance(layer, KVPages):
                out += [(layer.k, page), (layer.v, page)]
            else:
                out += [(layer.conv, slot), (layer.recurrent, slot)]
        return out

    before = [t.clone() for t, _ in held()]
    assert runner.warm_up(force=True) > 0
    after = [t for t, _ in held()]
    for b, (a, n) in zip(before, held()):
        assert torch.equal(b[:n], a[:n])
    assert any(not torch.equal(b, a) for b, a in zip(before, after))           # the scratch was written
    assert 1 in runner.graphs.buckets
    assert tokens(llm.generate(ps, sps)) == ref


def static_speculation(llm):
    """The verification and MTP-drafting graphs' static path (run eagerly, as a GPU would replay it)."""
    r, sp = llm.engine.runner, llm.engine.speculator
    sp.graphs = r.speculation_graphs(sp.k, min(r.num_slots, sp.policy.disable_batch_size - 1), capture=False,
                                     force=True)
    return llm


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_graph_path_is_greedy_identical(ckpt, k):
    """Verification and drafting through their static buffers (padded buckets, catch-ups of 1..k+1 positions,
    older positions caught up through the graph q at a time or, past GRAPH_CATCH_UP_MAX, eagerly, the commit of
    the kept GDN states) give plain decoding's tokens, also with chunked prefill beside them and under
    preemption."""
    ps = prompts([7, 30, 12, 80, 3], seed=4)
    sps = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (16, 6, 16, 9, 12)]
    ref = tokens(make(ckpt, static=False).generate(ps, sps))
    spec = dict(max_num_seqs=5, speculative_tokens=k, speculative_adaptive=False)
    for kw in ({}, {"max_num_batched_tokens": 24}, {"num_kv_pages": 18, "page_size": 8, "max_model_len": 96}):
        llm = static_speculation(make(ckpt, static=True, **spec, **kw))
        assert tokens(llm.generate(ps, sps)) == ref, kw
        u = llm.engine.usage()
        g = u["cuda_graphs"]
        assert g["verification"]["replays"] > 0 and g["drafting"]["replays"] > 0
        assert g["verification"]["commits"] == g["verification"]["replays"]
        assert u["speculative"]["verify_steps"] >= g["verification"]["replays"]
        assert u["pages_used"] == 0 and u["slots_used"] == 0
        if "num_kv_pages" in kw:
            assert llm.engine.scheduler.num_preemptions > 0


def test_speculative_graph_path_accepts_like_the_eager_one():
    """The trained default model drafts well: the graph path (catch-ups of up to k + 1 true positions) accepts
    exactly what the eager path accepts, and both decode plain decoding's tokens."""
    qs = [[{"role": "user", "content": f"What does {f} do?"}] for f in ("json.dumps", "re.compile", "math.sqrt")]
    sp = SamplingParams(temperature=0, max_tokens=32)
    kw = dict(device="cpu", dtype=torch.float64)
    ref = tokens(LLM(**kw).chat(qs, sp))
    eager = LLM(**kw, speculative_tokens=2, speculative_adaptive=False)
    assert tokens(eager.chat(qs, sp)) == ref
    llm = LLM(**kw, speculative_tokens=2, speculative_adaptive=False)
    llm.engine.runner.graphs = llm.engine.runner.decode_graphs(capture=False)
    static_speculation(llm)
    assert tokens(llm.chat(qs, sp)) == ref
    a, b = eager.speculative_stats(), llm.speculative_stats()
    assert a["mean_accepted_length"] > 1.3 and a["accepted_tokens"] == b["accepted_tokens"]
    g = llm.engine.usage()["cuda_graphs"]
    # every drafting step verified by a graph; the prompts' older positions were caught up through it too
    assert g["drafting"]["replays"] > g["verification"]["replays"] > 0
