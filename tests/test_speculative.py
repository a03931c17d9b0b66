"""MTP speculative decoding: greedy output identical to plain decoding (batched, chunked prefill, preemption, the
default model), sampled output from the same distribution, adaptive drafting and statistics."""
import math

import pytest
import torch

from tiny_models import ENGINE_CFG
from qwen3next import LLM, SamplingParams, random_model, save_model

CFG = ENGINE_CFG.replace(vocab_size=6)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    save_model(random_model(CFG.replace(vocab_size=97), seed=1), str(d / "big"))
    save_model(random_model(CFG, seed=2), str(d / "small"))
    return d


def make(path, **kw):
    return LLM(str(path), skip_tokenizer_init=True, dtype=torch.float64, device="cpu", **kw)


def prompts(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, vocab, (int(L),), generator=g).tolist()}
            for L in torch.randint(3, 60, (n,), generator=g)]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_identical_batched_chunked_preempted(ckpt, k):
    ps = prompts(6, 97)
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ref = tokens(make(ckpt / "big").generate(ps, sp))
    llm = make(ckpt / "big", speculative_tokens=k, max_num_batched_tokens=24, max_num_seqs=6)
    assert tokens(llm.generate(ps, sp)) == ref
    st = llm.speculative_stats()
    assert st["verify_steps"] > 0 and st["draft_tokens"] == k * st["verify_steps"]
    tight = make(ckpt / "big", speculative_tokens=k, max_num_seqs=6, num_kv_pages=14, page_size=8)
    assert tokens(tight.generate(ps, sp)) == ref
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.usage()["pages_used"] == 0 and tight.engine.usage()["slots_used"] == 0


def test_greedy_identical_on_the_default_model():
    qs = [[{"role": "user", "content": f"What does {f} do?"}] for f in ("json.dumps", "re.compile", "math.sqrt")]
    sp = SamplingParams(temperature=0, max_tokens=40)
    ref = tokens(LLM(device="cpu", dtype=torch.float64).chat(qs, sp))
    llm = LLM(device="cpu", dtype=torch.float64, speculative_tokens=2)
    assert tokens(llm.chat(qs, sp)) == ref
    st = llm.speculative_stats()
    assert st["mean_accepted_length"] > 1.3          # the trained MTP head drafts well on its own answers
    assert len(st["per_position_acceptance"]) == 2


@torch.no_grad()
def exact_distribution(path, prompt, n_tokens):
    """P(t1..tn | prompt) at temperature 1, by enumerating every continuation with full forwards."""
    from qwen3next import load_model
    m = load_model(str(path), dtype=torch.float64)
    dist = {(): 1.0}
    for _ in range(n_tokens):
        nxt = {}
        for seq, p in dist.items():
            probs = m(torch.tensor([prompt + list(seq)])).logits[0, -1].softmax(-1)
            for t in range(probs.shape[0]):
                nxt[seq + (t,)] = p * probs[t].item()
        dist = nxt
    return dist


def chi_square_ok(counts, dist, n):
    """Pearson chi-square against the exact distribution, bins with expected < 5 pooled; Wilson-Hilferty
    approximation of the 0.1% critical value."""
    stat, df, pool_o, pool_e = 0.0, -1, 0, 0.0
    for key, p in dist.items():
        e, o = p * n, counts.get(key, 0)
        if e < 5:
            pool_o, pool_e = pool_o + o, pool_e + e
            continue
        stat += (o - e) ** 2 / e
        df += 1
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / pool_e
        df += 1
    z = 3.09
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat < crit, stat, crit


def test_sampling_distribution_is_unchanged(ckpt):
    prompt = [1, 4, 2, 5, 0]
    n, steps = 3000, 3
    dist = exact_distribution(ckpt / "small", prompt, steps)
    for k in (0, 2):
        llm = make(ckpt / "small", speculative_tokens=k, max_num_seqs=512, max_num_batched_tokens=4096,
                   speculative_disable_batch_size=10_000)
        outs = llm.generate([{"prompt_token_ids": prompt}] * n,
                            [SamplingParams(temperature=1.0, max_tokens=steps, seed=i) for i in range(n)])
        counts = {}
        for o in outs:
            key = tuple(o.outputs[0].token_ids)
            counts[key] = counts.get(key, 0) + 1
        ok, stat, crit = chi_square_ok(counts, dist, n)
        assert ok, (k, stat, crit)
        if k:
            st = llm.speculative_stats()
            assert 0 < st["accepted_tokens"] < st["draft_tokens"]   # both paths (accept and reject) exercised


def test_drafting_turns_off_for_large_batches(ckpt):
    llm = make(ckpt / "big", speculative_tokens=2, max_num_seqs=8, speculative_disable_batch_size=4)
    lengths = [4, 4, 4, 4, 16, 16]          # six decode together (drafting off), then two (drafting on)
    llm.generate(prompts(6, 97, seed=3), [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                                          for n in lengths])
    st = llm.speculative_stats()
    assert st["disabled_steps"] > 0 and st["verify_steps"] > 0


def test_speculation_needs_an_mtp_head(ckpt):
    save_model(random_model(CFG.replace(num_nextn_predict_layers=0), seed=0), str(ckpt / "nomtp"))
    with pytest.raises(ValueError, match="MTP head"):
        make(ckpt / "nomtp", speculative_tokens=2)
    assert make(ckpt / "nomtp").speculative_stats() is None


def test_stats_reach_the_metrics_endpoint_collector(ckpt):
    from qwen3next.server.metrics import _EngineCollector
    llm = make(ckpt / "big", speculative_tokens=2)
    llm.generate(prompts(2, 97), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    eng = llm.engine
    fams = {f.name: f for f in _EngineCollector(eng.usage, eng.stats, lambda: 0).collect()}
    st = llm.speculative_stats()
    assert fams["qwen3next_spec_draft_tokens"].samples[0].value == st["draft_tokens"] > 0
    assert fams["qwen3next_spec_mean_accepted_length"].samples[0].value == st["mean_accepted_length"]
    assert [s.labels["position"] for s in fams["qwen3next_spec_position_acceptance"].samples] == ["1", "2"]
    assert {s.labels["batch_size"] for s in fams["qwen3next_spec_drafting"].samples} == \
        set(st["policy"]["by_batch_size"])


def test_policy_drafts_only_where_it_measured_a_gain():
    from qwen3next.engine.speculative import SpeculationPolicy
    pol = SpeculationPolicy(disable_batch_size=16, warmup=2, probe_every=10)

    def run(n, spec_rate, plain_rate, steps):
        choices = []
        for _ in range(steps):
            c = pol.choose(n)
            choices.append(c)
            pol.observe(n, c, 10, 10 / (spec_rate if c else plain_rate))
        return choices

    small = run(1, spec_rate=300.0, plain_rate=100.0, steps=40)     # drafting pays at batch 1
    assert all(small[6:]) is False and sum(small[6:]) >= 30         # drafts, except the periodic probes
    large = run(8, spec_rate=50.0, plain_rate=100.0, steps=40)      # and loses at batch 8-15
    assert sum(large[6:]) <= 4                                      # only the probes draft
    assert pol.as_dict()["by_batch_size"]["1"]["drafting"] is True
    assert pol.as_dict()["by_batch_size"]["8-15"]["drafting"] is False
    assert pol.choose(16) is False                                  # the hard cap
    fixed = SpeculationPolicy(disable_batch_size=4, adaptive=False)
    assert fixed.choose(3) is True and fixed.choose(4) is False


def test_engine_switches_drafting_off_when_it_costs_more(ckpt, monkeypatch):
    """Drafting made artificially slow: the engine measures that and stops drafting; the output is unchanged."""
    import time as _time

    from qwen3next.engine.speculative import Speculator
    slow = Speculator.draft

    def slow_draft(self, *a, **kw):
        _time.sleep(0.05)
        return slow(self, *a, **kw)

    monkeypatch.setattr(Speculator, "draft", slow_draft)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ps = prompts(1, 97, seed=5)
    ref = tokens(make(ckpt / "big").generate(ps, sp))
    llm = make(ckpt / "big", speculative_tokens=1)
    assert tokens(llm.generate(ps, sp)) == ref
    st = llm.speculative_stats()
    assert st["policy"]["by_batch_size"]["1"]["drafting"] is False
    assert st["disabled_steps"] > 10 and st["verify_steps"] >= 4


def test_pages_of_rejected_drafts_go_back_to_the_pool(ckpt):
    """With 3 drafts and 2-token pages, rejected drafts often spill into pages of their own: after every step a
    running sequence holds no page beyond those its tokens need (it fails without CacheManager.trim)."""
    llm = make(ckpt / "big", speculative_tokens=3, page_size=2, speculative_adaptive=False)
    eng = llm.engine
    for i, p in enumerate(prompts(3, 97, seed=11)):
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), request_id=str(i))
    checked = 0
    while eng.has_unfinished():
        eng.step()
        for s in eng.scheduler.running:
            if s.num_computed == s.num_tokens - 1:            # between decode steps
                assert len(s.pages) <= -(-s.num_tokens // 2)      # none beyond its tokens
                checked += 1
    st = llm.speculative_stats()
    assert checked > 10 and st["accepted_tokens"] < st["draft_tokens"]     # some drafts were rejected
    assert eng.usage()["pages_used"] == 0


def test_policy_probes_less_often_while_its_choice_holds():
    """Each probe that confirms the choice doubles the gap to the next one (up to max_probe_every); a probe that
    changes it (the costs drifted) resets the gap, and the policy follows the new winner."""
    from qwen3next.engine.speculative import SpeculationPolicy
    pol = SpeculationPolicy(disable_batch_size=16, warmup=1, probe_every=8, max_probe_every=64, alpha=1.0)

    def run(spec_rate, plain_rate, steps):
        choices = []
        for _ in range(steps):
            c = pol.choose(1)
            choices.append(c)
            pol.observe(1, c, 10, 10 / (spec_rate if c else plain_rate))
        return choices

    plain_wins = run(spec_rate=50.0, plain_rate=100.0, steps=400)[4:]
    probes = [i for i, c in enumerate(plain_wins) if c]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps[:4] == [16, 32, 64, 64] and all(g == 64 for g in gaps[3:])    # 8 before the first probe
    assert pol.as_dict()["by_batch_size"]["1"]["probe_gap"] == 64
    drafting_wins = run(spec_rate=300.0, plain_rate=100.0, steps=200)       # drifted: the next probe finds it
    switch = drafting_wins.index(True)
    assert switch <= 64 and sum(not c for c in drafting_wins[switch:]) <= 5     # then only sparse probes of plain
    assert pol.as_dict()["by_batch_size"]["1"]["drafting"] is True
