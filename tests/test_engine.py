"""The inference engine: greedy parity with transformers, batch invariance across chunked prefill and preemption,
slot reuse, seeds, stop conditions, logprobs, aborts and errors."""
import asyncio

import pytest
import torch
from hf_reference import hf_next

from qwen3next import LLM, SamplingParams
from qwen3next.engine.async_engine import AsyncEngine

VOCAB = 300
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine_ck")
    hf = hf_next(seed=11, vocab_size=VOCAB).double()
    hf.save_pretrained(d)
    return str(d), hf


def prompt(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def make(ckpt, **kw):
    return LLM(ckpt[0], skip_tokenizer_init=True, dtype=torch.float64, device="cpu", **kw)


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_equals_transformers_generate(ckpt):
    llm = make(ckpt, max_num_batched_tokens=48, max_num_seqs=4)
    prompts = [prompt(n, n) for n in (3, 70, 130, 9)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    for p, o in zip(prompts, outs):
        ref = ckpt[1].generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p):].tolist()
        assert o.outputs[0].token_ids == ref
        assert o.outputs[0].finish_reason == "length" and o.finished


def test_batch_invariance_chunked_prefill_and_preemption(ckpt):
    prompts = [{"prompt_token_ids": prompt(n, 100 + n)} for n in (40, 7, 90, 25, 60)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = [tokens(make(ckpt).generate([p], params))[0] for p in prompts]
    together = make(ckpt, max_num_batched_tokens=32, max_num_seqs=5)
    assert tokens(together.generate(prompts, params)) == alone
    # 16 pages of 8 tokens cannot hold all five (they need 45): some are preempted and recomputed
    tight = make(ckpt, max_num_batched_tokens=64, max_num_seqs=5, num_kv_pages=16, page_size=8)
    assert tokens(tight.generate(prompts, params)) == alone
    assert tight.engine.scheduler.num_preemptions > 0
    u = tight.engine.usage()
    assert u["pages_used"] == 0 and u["slots_used"] == 0


def test_reused_slot_does_not_leak_state(ckpt):
    llm = make(ckpt, max_num_seqs=1)
    a, b = {"prompt_token_ids": prompt(50, 1)}, {"prompt_token_ids": prompt(20, 2)}
    llm.generate([a], GREEDY)
    assert tokens(llm.generate([b], GREEDY)) == tokens(make(ckpt).generate([b], GREEDY))


def test_seeds_reproduce_and_differ(ckpt):
    llm = make(ckpt)
    p = {"prompt_token_ids": prompt(10, 3)}
    sp = lambda seed: SamplingParams(temperature=1.0, max_tokens=20, seed=seed, ignore_eos=True)  # noqa: E731
    a = tokens(llm.generate([p, p], [sp(1), sp(2)]))
    b = tokens(llm.generate([p], sp(1)))
    c = tokens(make(ckpt).generate([p, {"prompt_token_ids": prompt(30, 4)}], [sp(1), sp(9)]))
    assert a[0] == b[0] == c[0] and a[0] != a[1]


def test_stop_token_ids_max_tokens_and_logprobs(ckpt):
    llm = make(ckpt)
    p = {"prompt_token_ids": prompt(12, 5)}
    free = llm.generate([p], GREEDY)[0].outputs[0].token_ids
    stop_at = free[4]
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at]))[0].outputs[0]
    assert o.token_ids == free[:free.index(stop_at) + 1] and o.finish_reason == "stop" and o.stop_reason == stop_at
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=3, logprobs=5, ignore_eos=True))[0].outputs[0]
    assert len(o.token_ids) == 3 and o.finish_reason == "length" and len(o.logprobs) == 3
    with torch.no_grad():
        full = llm.engine.model(torch.tensor([p["prompt_token_ids"] + o.token_ids])).logits[0].log_softmax(-1)
    n = len(p["prompt_token_ids"])
    for i, (tok, entry) in enumerate(zip(o.token_ids, o.logprobs)):
        assert tok in entry and len(entry) >= 5
        assert abs(entry[tok] - full[n - 1 + i, tok].item()) < 1e-6
        assert sum(torch.tensor(list(entry.values())).exp()) <= 1 + 1e-6
    assert abs(o.cumulative_logprob - sum(e[t] for t, e in zip(o.token_ids, o.logprobs))) < 1e-9


def test_eos_from_config_ends_generation(ckpt):
    llm = make(ckpt)
    p = {"prompt_token_ids": prompt(12, 6)}
    free = llm.generate([p], GREEDY)[0].outputs[0].token_ids
    llm.engine.eos_token_ids = frozenset({free[2]})
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
    assert o.token_ids == free[:3] and o.finish_reason == "stop"
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    assert o.token_ids == free


def test_errors_are_clear(ckpt):
    llm = make(ckpt, max_model_len=64)
    with pytest.raises(ValueError, match="context is 64"):
        llm.generate([{"prompt_token_ids": prompt(64, 1)}])
    with pytest.raises(ValueError, match="empty"):
        llm.generate([{"prompt_token_ids": []}])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([{"prompt_token_ids": [VOCAB + 5]}])
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate(["text prompt"])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    # generation stops at the context end with finish_reason "length"
    o = llm.generate([{"prompt_token_ids": prompt(60, 1)}], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert len(o.outputs[0].token_ids) == 4 and o.outputs[0].finish_reason == "length"


def test_abort_frees_slot_and_pages(ckpt):
    llm = make(ckpt)
    eng = llm.engine
    rid = eng.add_request({"prompt_token_ids": prompt(40, 7)}, SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.usage()["slots_used"] == 1 and eng.usage()["pages_used"] > 0
    out = eng.abort(rid)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert eng.usage()["slots_used"] == 0 and eng.usage()["pages_used"] == 0 and not eng.has_unfinished()


def test_async_engine_streams_and_aborts(ckpt):
    llm = make(ckpt, max_num_seqs=4)
    prompts = [{"prompt_token_ids": prompt(n, 200 + n)} for n in (5, 33, 18)]
    expected = tokens(make(ckpt).generate(prompts, GREEDY))
    eng = AsyncEngine(llm.engine)

    async def one(p):
        toks, n = [], 0
        async for out in eng.generate(p, GREEDY):
            toks += out.outputs[0].delta_token_ids
            n += 1
        assert toks == out.outputs[0].token_ids
        return toks, n

    async def quitter(p):
        async for out in eng.generate(p, SamplingParams(max_tokens=200, ignore_eos=True)):
            if len(out.outputs[0].token_ids) >= 3:
                break      # the consumer goes away: its request must be aborted

    async def main():
        res = await asyncio.gather(*(one(p) for p in prompts), quitter(prompts[0]))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            async for _ in eng.generate({"prompt_token_ids": [VOCAB + 1]}, GREEDY):
                pass
        return res

    try:
        res = asyncio.run(main())
        assert [r[0] for r in res[:3]] == expected and all(r[1] > 1 for r in res[:3])   # streamed, not one blob
        for _ in range(100):
            if not llm.engine.has_unfinished():
                break
            import time
            time.sleep(0.02)
        assert llm.engine.usage()["slots_used"] == 0 and llm.engine.usage()["pages_used"] == 0
    finally:
        eng.shutdown()


def test_output_kinds(ckpt):
    """cumulative: every step, everything so far; delta: every step, only its part; final_only: one output at the
    end. The three agree on the tokens, text and logprobs; LLM.generate asks the engine for final outputs only."""
    llm = make(ckpt)
    eng = llm.engine
    p = {"prompt_token_ids": prompt(9, 12)}
    got = {}
    for kind in ("cumulative", "delta", "final_only"):
        rid = eng.add_request(p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2,
                                                output_kind=kind))
        outs = []
        while eng.has_unfinished():
            outs += [o for o in eng.step() if o.request_id == rid]
        got[kind] = outs
    cum, delta, final = got["cumulative"], got["delta"], got["final_only"]
    assert len(cum) == len(delta) == 6 and len(final) == 1 and final[0].finished
    whole = cum[-1].outputs[0]
    assert [len(o.outputs[0].token_ids) for o in cum] == [1, 2, 3, 4, 5, 6]
    assert [t for o in delta for t in o.outputs[0].token_ids] == whole.token_ids == final[0].outputs[0].token_ids
    assert [e for o in delta for e in o.outputs[0].logprobs] == whole.logprobs == final[0].outputs[0].logprobs
    assert all(len(o.outputs[0].token_ids) == 1 for o in delta)
    seen = []
    eng.step = (lambda step: lambda: (seen.append(step()), seen[-1])[1])(eng.step)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2))[0]
    assert out.outputs[0].token_ids == whole.token_ids and sum(len(x) for x in seen) == 1
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="partial")


def test_sampling_settings_are_built_once_per_batch(ckpt, monkeypatch):
    """A decode batch of the same requests reuses its sampling settings on the device; they are built anew when
    the requests change, and at every step while a row's settings follow its output (a min_tokens ban)."""
    import qwen3next.engine.engine as engine_module
    built = []

    class Counting(engine_module.SamplingTensors):
        @classmethod
        def from_params(cls, params, *a, **kw):
            built.append(len(params))
            return super().from_params(params, *a, **kw)

    monkeypatch.setattr(engine_module, "SamplingTensors", Counting)
    llm = make(ckpt, max_num_seqs=2)
    ps = [{"prompt_token_ids": prompt(n, 30 + n)} for n in (5, 8, 6)]
    sps = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
           SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True),
           SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)]
    outs = llm.generate(ps, sps)
    # 2 requests together (built once), then 1 alone after the second ends (once), then the third joins (once
    # for its prefill step beside the first's decode, once for the two decoding together), then the first alone
    assert len(built) <= 6 and sum(built) < 20, built
    ref = [make(ckpt).generate([p], sp)[0].outputs[0].token_ids for p, sp in zip(ps, sps)]
    assert [o.outputs[0].token_ids for o in outs] == ref
    built.clear()
    llm.generate([ps[0]], SamplingParams(temperature=0, max_tokens=8, min_tokens=4, stop_token_ids=[7]))
    assert len(built) == 5          # steps 1-4 ban the stop id (rebuilt each step), then reused
