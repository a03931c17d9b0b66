"""Overlap scheduling (engine.py), forced on CPU: step t+1 is launched before step t's tokens reach the host, its
pending input tokens read from the device. Outputs must equal the synchronous engine's for greedy and seeded
requests, through the eager runner and the static graph paths, chunked prefill, preemption, every stop
condition, penalties (which fall back to waiting), aborts and the context limit; the lag is one call."""
import pytest
import torch

from tiny_models import ENGINE_CFG, engine_checkpoint, output_tokens, random_prompts
from qwen3next import LLM, SamplingParams

CFG = ENGINE_CFG


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return engine_checkpoint(tmp_path_factory, "overlap", seed=7)


def make(path, overlap: bool, static: bool = False, **kw):
    kw.setdefault("max_model_len", 128)
    llm = LLM(path, skip_tokenizer_init=True, dtype=torch.float64, device="cpu", overlap=overlap, **kw)
    r = llm.engine.runner
    assert llm.engine.overlap is overlap and (r.sampled is not None) is overlap
    if static:     # the static-buffer paths that CUDA graphs replay, run eagerly
        r.graphs = r.decode_graphs(capture=False)
        r.prefill_graphs = r.make_prefill_graphs(64, capture=False)
    return llm


prompts, tokens = random_prompts, output_tokens
LENGTHS = [5, 40, 17, 3, 60, 1, 28, 90]
MAX_TOKENS = (20, 6, 14, 25, 3, 17, 1, 8)


def greedy(m, **kw):
    return SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, **kw)


def test_default_is_on_for_cuda_only_and_not_with_speculation(ckpt):
    assert make(ckpt, overlap=False).engine.overlap is False
    assert LLM(ckpt, skip_tokenizer_init=True, device="cpu").engine.overlap is False     # auto: CPU
    with pytest.raises(ValueError, match="speculative"):
        LLM(ckpt, skip_tokenizer_init=True, device="cpu", overlap=True, speculative_tokens=2)
    from qwen3next.cli import build_parser
    p = build_parser()
    assert p.parse_args(["generate", "x"]).overlap is None
    assert p.parse_args(["generate", "x", "--no-overlap"]).overlap is False
    assert p.parse_args(["serve", "--no-overlap"]).overlap is False


@pytest.mark.parametrize("static", [False, True])
def test_greedy_identical_batched_chunked_preempted(ckpt, static):
    ps = prompts(LENGTHS)
    sps = [greedy(m) for m in MAX_TOKENS]
    ref = tokens(make(ckpt, overlap=False).generate(ps, sps))
    for kw in ({"max_num_seqs": 1}, {"max_num_seqs": 5}, {"max_num_seqs": 4, "max_num_batched_tokens": 24},
               {"max_num_seqs": 5, "num_kv_pages": 12, "page_size": 8, "max_model_len": 96}):
        n = len(ps) if kw.get("max_model_len", 128) > 100 else len(ps) - 1   # (90 tokens do not fit in 96)
        llm = make(ckpt, overlap=True, static=static, **kw)
        assert tokens(llm.generate(ps[:n], sps[:n])) == ref[:n], kw
        u = llm.engine.usage()
        assert u["pages_used"] == 0 and u["slots_used"] == 0 and not llm.engine.has_unfinished()
        if "num_kv_pages" in kw:
            assert llm.engine.scheduler.num_preemptions > 0
        if static:
            g = u["cuda_graphs"]
            assert g["replays"] > 0 and (g["prefill"]["replays"] > 0 or "num_kv_pages" in kw), (kw, g)


def test_seeded_sampling_identical(ckpt):
    ps = prompts([9, 33, 4, 21], seed=2)
    sps = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=m, seed=s, ignore_eos=True, logprobs=3)
           for m, s in ((12, 1), (5, 2), (16, 3), (9, 4))]
    sync = make(ckpt, overlap=False, max_num_seqs=4).generate(ps, sps)
    over = make(ckpt, overlap=True, static=True, max_num_seqs=4).generate(ps, sps)
    assert tokens(over) == tokens(sync)
    for a, b in zip(over, sync):
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob)


def test_stops_end_at_the_same_token(ckpt):
    """A sequence ended by a token it sampled was already stepped once more (its token was still on the device):
    that token is dropped, and the request ends exactly where the synchronous engine ends it."""
    p = prompts([12], seed=4)[0]
    free = tokens(make(ckpt, overlap=False).generate([p], greedy(12)))[0]
    sps = [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[free[4]]),
           SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[free[0]], min_tokens=3),
           greedy(1), greedy(7)]
    sync = make(ckpt, overlap=False, max_num_seqs=4).generate([p] * 4, sps)
    over = make(ckpt, overlap=True, static=True, max_num_seqs=4)
    outs = over.generate([p] * 4, sps)
    assert tokens(outs) == tokens(sync)
    assert [o.outputs[0].finish_reason for o in outs] == [o.outputs[0].finish_reason for o in sync]
    assert outs[0].outputs[0].token_ids[-1] == free[4] and outs[0].outputs[0].stop_reason == free[4]
    assert over.engine.stats.generation_tokens == sum(len(t) for t in tokens(outs))
    # EOS from the config, and the context limit (the scheduler does not step a sequence whose pending token
    # already fills the context)
    over.engine.eos_token_ids = frozenset({free[2]})
    o = over.generate([p], SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
    assert o.token_ids == free[:3] and o.finish_reason == "stop"
    small = make(ckpt, overlap=True, max_model_len=16)
    o = small.generate([p], greedy(100))[0].outputs[0]
    assert len(o.token_ids) == 4 and o.finish_reason == "length"
    assert o.token_ids == free[:4]


def test_penalties_count_the_pending_token(ckpt):
    """A penalty counts every earlier token, the last of which is still on the device when the next is sampled:
    it is counted there. The same tokens as the synchronous engine, beside requests without penalties."""
    ps = prompts([14, 6, 30], seed=5)
    sps = [SamplingParams(temperature=0, max_tokens=15, repetition_penalty=1.3, ignore_eos=True),
           greedy(15), SamplingParams(temperature=0, max_tokens=10, frequency_penalty=0.5, presence_penalty=0.4,
                                      ignore_eos=True)]
    sync = tokens(make(ckpt, overlap=False, max_num_seqs=3).generate(ps, sps))
    assert sync[0] != tokens(make(ckpt, overlap=False).generate(ps[:1], greedy(15)))[0]   # the penalty matters
    over = make(ckpt, overlap=True, static=True, max_num_seqs=3)
    eng = over.engine
    for p, sp in zip(ps, sps):
        eng.add_request(p, sp)
    in_flight = 0
    while eng.has_unfinished():
        eng.step()
        in_flight += eng._in_flight is not None
    assert in_flight >= 14                                  # the penalised requests' steps overlapped too
    assert tokens(make(ckpt, overlap=True).generate(ps, sps)) == sync
    assert tokens(make(ckpt, overlap=True).generate(ps[2:], sps[2:])) == sync[2:]


def test_the_sampler_gets_the_pending_tokens_ids(ckpt, monkeypatch):
    """What the penalties count in place of the token the host has not seen: its id on the device, which is the
    token the request's output holds at that position in the end."""
    import qwen3next.engine.engine as engine_module
    seen = []

    class Recording(engine_module.SamplingTensors):
        @classmethod
        def from_params(cls, params, outputs, prompts, generators, device, vocab, **kw):
            if kw.get("pending_ids") is not None:
                seen.extend((out, len(out), n, int(t)) for out, n, t in zip(outputs, kw["pending"],
                                                                            kw["pending_ids"]))
            return super().from_params(params, outputs, prompts, generators, device, vocab, **kw)

    monkeypatch.setattr(engine_module, "SamplingTensors", Recording)
    sps = [SamplingParams(temperature=0, max_tokens=12, presence_penalty=1.0, ignore_eos=True), greedy(9)]
    outs = make(ckpt, overlap=True, static=True).generate(prompts([10, 7], seed=11), sps)
    rows = [(out, at, t) for out, at, n, t in seen if n]
    assert len(rows) >= 18 and all(out[at] == t for out, at, t in rows)
    assert tokens(outs) == tokens(make(ckpt, overlap=False).generate(prompts([10, 7], seed=11), sps))


def test_outputs_lag_one_call_and_inputs_come_from_the_device(ckpt):
    llm = make(ckpt, overlap=True, static=True)
    eng = llm.engine
    p = prompts([10], seed=6)[0]
    ref = tokens(make(ckpt, overlap=False).generate([p], greedy(5)))[0]
    rid = eng.add_request(p, greedy(5))
    seq = eng.requests[rid]
    assert eng.step() == []                                  # the prompt ran; its token is on the device
    assert seq.num_pending == 1 and seq.output_token_ids == [] and seq.num_tokens == 11
    eng.runner.sampled.fill_(3)                              # poison the device copy: the next step reads it
    outs = eng.step()
    assert [o.outputs[0].delta_token_ids for o in outs] == [[ref[0]]] and seq.num_pending == 1
    rest = []
    while eng.has_unfinished():
        rest += eng.step()
    got = ref[:1] + [t for o in rest for t in o.outputs[0].delta_token_ids]
    assert len(got) == 5 and got != ref                       # token 2 was computed from the poisoned input 3
    assert rest[-1].finished and rest[-1].outputs[0].token_ids == got


def test_abort_while_a_token_is_pending(ckpt):
    ps = prompts([20, 8], seed=8)
    ref = tokens(make(ckpt, overlap=False).generate(ps[1:], greedy(12)))[0]
    eng = make(ckpt, overlap=True, static=True).engine
    a = eng.add_request(ps[0], greedy(50))
    b = eng.add_request(ps[1], greedy(12))
    got = []
    for _ in range(3):
        got += [t for o in eng.step() if o.request_id == b for t in o.outputs[0].delta_token_ids]
    assert eng.requests[a].num_pending == 1
    out = eng.abort(a)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    while eng.has_unfinished():
        outs = eng.step()
        assert all(o.request_id == b for o in outs)         # the aborted request's pending token is dropped
        got += [t for o in outs for t in o.outputs[0].delta_token_ids]
    assert got == ref
    assert eng.requests == {} and eng.usage()["slots_used"] == 0 and eng.usage()["pages_used"] == 0


def test_stream_and_async_engine(ckpt):
    import asyncio
    from qwen3next.engine.async_engine import AsyncEngine
    p = prompts([11], seed=9)[0]
    ref = tokens(make(ckpt, overlap=False).generate([p], greedy(9)))[0]
    llm = make(ckpt, overlap=True, static=True)
    deltas = [o.outputs[0].delta_token_ids for o in llm.stream(p, greedy(9))]
    assert sum(deltas, []) == ref and all(len(d) == 1 for d in deltas)
    eng = AsyncEngine(make(ckpt, overlap=True).engine)

    async def run():
        return [o async for o in eng.generate(p, greedy(9))]
    try:
        outs = asyncio.run(run())
    finally:
        eng.shutdown()
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == ref


def test_a_failed_step_loses_no_token(ckpt):
    """The step after a token was sampled fails (its forward raises): the pending token still reaches its request,
    nothing stays pending, and the next steps redo the failed one (the server's loop goes on after a failure)."""
    p = prompts([12], seed=13)[0]
    ref = tokens(make(ckpt, overlap=False).generate([p], greedy(8)))[0]
    eng = make(ckpt, overlap=True, static=True).engine
    rid = eng.add_request(p, greedy(8))
    got = []
    for _ in range(3):
        got += [t for o in eng.step() for t in o.outputs[0].delta_token_ids]
    forward = eng.runner.forward

    def broken(batch):
        raise RuntimeError("injected")
    eng.runner.forward = broken
    with pytest.raises(RuntimeError, match="injected"):
        eng.step()
    seq = eng.requests[rid]
    assert seq.num_pending == 0 and len(seq.output_token_ids) == len(got) + 1
    eng.runner.forward = forward                  # (the token the failed call appended comes with the next output)
    while eng.has_unfinished():
        got += [t for o in eng.step() for t in o.outputs[0].delta_token_ids]
    assert got == ref
