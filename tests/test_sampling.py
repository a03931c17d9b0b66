"""Batched sampler and SamplingParams, checked against hand computations."""

import math

import pytest
import torch

from qwen3next.engine.sampling_params import SamplingParams
from qwen3next.ops.sampling import (
    SamplingTensors,
    apply_penalties,
    make_generator,
    processed_logits,
    sample,
)


def tensors(params, outputs=None, prompts=None, generators=None, vocab=None, **kw):
    outputs = outputs if outputs is not None else [[] for _ in params]
    prompts = prompts if prompts is not None else [[] for _ in params]
    return SamplingTensors.from_params(params, outputs, prompts, generators, "cpu", vocab, **kw)


def reference_probs(logits, p, output=(), prompt=()):
    """Next-token distribution of one row computed token by token in plain Python."""
    logits = [float(x) for x in logits]
    seen = set(prompt) | set(output)
    for v in range(len(logits)):
        if v in seen:
            logits[v] = logits[v] / p.repetition_penalty if logits[v] > 0 else logits[v] * p.repetition_penalty
        count = list(output).count(v)
        logits[v] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    if p.greedy:
        best = max(range(len(logits)), key=lambda v: (logits[v], -v))
        return [1.0 if v == best else 0.0 for v in range(len(logits))]
    logits = [x / p.temperature for x in logits]
    kept = list(range(len(logits)))
    if p.top_k >= 1:  # the k largest, and anything tied with the k-th
        kth = sorted(logits, reverse=True)[p.top_k - 1]
        kept = [v for v in kept if logits[v] >= kth]

    def normalised(tokens):
        z = sum(math.exp(logits[v]) for v in tokens)
        return {v: math.exp(logits[v]) / z for v in tokens}

    if p.top_p < 1:  # tokens whose strictly more likely rivals hold < top_p
        probs = normalised(kept)
        kept = [v for v in kept if sum(q for q in probs.values() if q > probs[v]) < p.top_p]
    if p.min_p > 0:
        probs = normalised(kept)
        top = max(probs.values())
        kept = [v for v in kept if probs[v] >= p.min_p * top]
    probs = normalised(kept)
    return [probs.get(v, 0.0) for v in range(len(logits))]


# ----------------------------------------------------------------- greedy


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0.0)] * 3 + [SamplingParams(top_k=1, temperature=0.7)] * 3
    out = sample(logits, tensors(params, vocab=50))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_greedy_uses_penalised_logits():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    params = [SamplingParams(temperature=0.0, presence_penalty=0.5)]
    assert sample(logits, tensors(params, outputs=[[0]], vocab=3)).token_ids.tolist() == [1]


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0]])
    params = [SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3])]
    early = tensors(params, outputs=[[1]], vocab=4, eos_token_ids=[2])
    assert sample(logits, early).token_ids.tolist() == [1]
    late = tensors(params, outputs=[[1, 1]], vocab=4, eos_token_ids=[2])
    assert sample(logits, late).token_ids.tolist() == [2]


# ----------------------------------------------------------------- penalties


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0]])
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    t = tensors([p], outputs=[[2, 2, 3]], prompts=[[0, 1]], vocab=5)
    # 0: prompt, positive -> /2.   1: prompt, negative -> *2.
    # 2: output x2, positive -> 0.5/2 - 0.5*2 - 0.25.   3: output x1, negative -> -0.5*2 - 0.5 - 0.25.
    want = torch.tensor([[1.0, -2.0, 0.25 - 1.0 - 0.25, -1.0 - 0.5 - 0.25, 3.0]])
    assert torch.allclose(apply_penalties(logits, t), want)


def test_a_pending_token_counts_like_a_known_one():
    """Overlap scheduling: a row's last output token is still on the device (pending_ids); the penalties and the
    min_tokens ban treat it as if it were in the row's list."""
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    ps = [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
          SamplingParams(presence_penalty=1.0, min_tokens=2, stop_token_ids=[1])]
    known = tensors(ps, outputs=[[2, 2, 3], [4, 0]], prompts=[[0, 1], [3]], vocab=5)
    pending = tensors(ps, outputs=[[2, 2], [4]], prompts=[[0, 1], [3]], vocab=5, pending=[1, 1],
                      pending_ids=torch.tensor([3, 0]))
    assert torch.equal(pending.output_counts, known.output_counts)
    assert torch.equal(apply_penalties(logits, pending), apply_penalties(logits, known))
    short = tensors(ps, outputs=[[2, 2], [4]], prompts=[[0, 1], [3]], vocab=5)
    assert short.banned[1, 1] and known.banned is None and pending.banned is None     # 1 of 2 vs 2 of 2
    with pytest.raises(ValueError, match="pending_ids"):
        tensors(ps, outputs=[[2, 2], [4]], prompts=[[0, 1], [3]], vocab=5, pending=[1, 0])


def test_presence_and_frequency_ignore_prompt_tokens():
    logits = torch.zeros(1, 4)
    p = SamplingParams(frequency_penalty=1.0, presence_penalty=1.0)
    t = tensors([p], outputs=[[1]], prompts=[[0, 0, 2]], vocab=4)
    assert apply_penalties(logits, t).tolist() == [[0.0, -2.0, 0.0, 0.0]]


# ----------------------------------------------------------------- filters


def probs_of(logits, params, outputs=None, prompts=None):
    t = tensors(params, outputs, prompts, vocab=logits.shape[-1])
    return torch.softmax(processed_logits(logits, t), dim=-1)


def test_top_k_top_p_min_p_masks_by_hand():
    # Probabilities 0.5, 0.2, 0.15, 0.1, 0.05 at temperature 1.
    probs = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15])
    logits = probs.log().expand(4, 5).clone()
    params = [
        SamplingParams(top_k=3),  # keeps 0.5, 0.2, 0.15
        SamplingParams(top_p=0.8),  # mass before: 0, .5, .7 (< .8) then .85: keeps 3
        SamplingParams(min_p=0.3),  # threshold 0.15: keeps .5, .2, .15
        SamplingParams(top_k=4, top_p=0.6),  # top-4 renormalised: .526, .211, ...: keeps 2
    ]
    kept = probs_of(logits, params) > 0
    assert kept.tolist() == [
        [False, True, False, True, True],
        [False, True, False, True, True],
        [False, True, False, True, True],
        [False, True, False, True, False],
    ]
    # The survivors are renormalised.
    assert torch.allclose(probs_of(logits, params)[0], torch.tensor([0, 0.5, 0, 0.2, 0.15]) / 0.85)


def test_ties_are_kept_or_dropped_together():
    logits = torch.tensor([[2.0, 1.0, 2.0, 1.0, 1.0, 0.0]] * 3)
    params = [SamplingParams(top_k=2), SamplingParams(top_k=3), SamplingParams(top_p=0.2)]
    kept = probs_of(logits, params) > 0
    assert kept.tolist() == [
        [True, False, True, False, False, False],
        [True, True, True, True, True, False],  # 3rd largest is a 3-way tie
        # Each 2.0 holds 0.31 > 0.2 of the mass, but neither is more likely than the other.
        [True, False, True, False, False, False],
    ]


def test_bf16_ties_batch_invariant():
    # bf16 logits collide often; a row's filter must not depend on whether the
    # batch takes the top-k (topk) path or the full-sort path.
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 4000, generator=gen) * 3).to(torch.bfloat16).float()
    watched = SamplingParams(top_k=42, top_p=0.7)  # the 42nd largest logit is a 4-way tie
    alone = processed_logits(logits[:1], tensors([watched], vocab=4000))
    with_topk_batch = processed_logits(logits, tensors([watched, SamplingParams(top_k=500)], vocab=4000))
    with_sort_batch = processed_logits(logits, tensors([watched, SamplingParams(top_p=0.9)], vocab=4000))
    assert torch.equal(alone[0], with_topk_batch[0]) and torch.equal(alone[0], with_sort_batch[0])
    want = torch.tensor(reference_probs(logits[0].tolist(), watched))
    assert torch.allclose(torch.softmax(alone[0], -1), want.float(), atol=1e-6)


def test_random_params_match_reference():
    gen = torch.Generator().manual_seed(3)
    vocab, rows = 12, 40
    logits = torch.randn(rows, vocab, generator=gen) * 2
    params, outputs, prompts = [], [], []
    for i in range(rows):
        r = torch.rand(8, generator=gen).tolist()
        params.append(
            SamplingParams(
                temperature=0.0 if i % 7 == 0 else 0.3 + 1.5 * r[0],
                top_k=[0, -1, 1, 3, 6][i % 5],
                top_p=1.0 if r[1] < 0.3 else 0.2 + 0.8 * r[1],
                min_p=0.0 if r[2] < 0.5 else 0.3 * r[2],
                repetition_penalty=1.0 if r[3] < 0.3 else 0.5 + r[3],
                presence_penalty=4 * r[4] - 2,
                frequency_penalty=4 * r[5] - 2,
            )
        )
        outputs.append(torch.randint(vocab, (i % 6,), generator=gen).tolist())
        prompts.append(torch.randint(vocab, (3,), generator=gen).tolist())
    got = probs_of(logits, params, outputs, prompts)
    for i, p in enumerate(params):
        want = torch.tensor(reference_probs(logits[i].tolist(), p, outputs[i], prompts[i]))
        assert torch.allclose(got[i], want, atol=1e-5), (i, p)
    tokens = sample(logits, tensors(params, outputs, prompts, vocab=vocab)).token_ids
    for i, p in enumerate(params):
        want = torch.tensor(reference_probs(logits[i].tolist(), p, outputs[i], prompts[i]))
        assert want[tokens[i]] > 0
        if p.greedy:
            assert want[tokens[i]] == 1.0


# ----------------------------------------------------------------- randomness


def seeded_run(seed, logits, params, steps=20):
    generator = make_generator(seed)
    t = tensors([params], generators=[generator], vocab=logits.shape[-1])
    return [sample(logits, t).token_ids.item() for _ in range(steps)]


def test_same_seed_same_samples_different_seed_differs():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(seed=1)
    first = seeded_run(11, logits, params)
    assert first == seeded_run(11, logits, params)
    assert first != seeded_run(12, logits, params)
    assert len(set(first)) > 1  # the generator advances between steps


def test_seeded_row_does_not_depend_on_batch():
    gen = torch.Generator().manual_seed(5)
    vocab = 300
    logits = torch.randn(5, vocab, generator=gen)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=5, temperature=0.5),
        SamplingParams(temperature=0.9, top_p=0.9, min_p=0.01, seed=42),  # the row we watch
        SamplingParams(repetition_penalty=1.3, presence_penalty=1.0, seed=7),
        SamplingParams(top_p=0.3),
    ]
    outputs = [[1, 2], [3], [], [4, 4, 5], [6]]
    prompts = [[7], [], [], [8, 9], []]

    alone_t = tensors([params[2]], [outputs[2]], [prompts[2]], [make_generator(42)], vocab=vocab)
    alone = [sample(logits[2:3], alone_t).token_ids.item() for _ in range(30)]

    batch_gens = [None, None, make_generator(42), make_generator(7), None]
    batch_t = tensors(params, outputs, prompts, batch_gens, vocab=vocab, shared_generator=make_generator(0))
    in_batch = [sample(logits, batch_t).token_ids[2].item() for _ in range(30)]
    assert in_batch == alone

    # The distribution itself is also row-for-row identical.
    for i in range(5):
        row_t = tensors([params[i]], [outputs[i]], [prompts[i]], vocab=vocab)
        assert torch.allclose(processed_logits(logits[i : i + 1], row_t), processed_logits(logits, batch_t)[i : i + 1])


def test_greedy_row_leaves_its_generator_alone():
    generator = make_generator(3)
    state = generator.get_state()
    params = [SamplingParams(temperature=0.0, seed=3), SamplingParams()]
    sample(torch.randn(2, 10), tensors(params, generators=[generator, None], vocab=10))
    assert torch.equal(generator.get_state(), state)


# Upper 0.1% quantiles of the chi-square distribution by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def chi_square(counts, expected_probs, draws):
    support = expected_probs > 0
    assert counts[~support].sum() == 0, "a filtered-out token was sampled"
    expected = expected_probs[support] * draws
    stat = ((counts[support] - expected) ** 2 / expected).sum().item()
    return stat, int(support.sum()) - 1


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9),
        SamplingParams(temperature=1.3, min_p=0.1, repetition_penalty=1.5, frequency_penalty=0.4),
    ],
)
def test_empirical_frequencies_match_distribution(params):
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -2.0, 1.5, 0.7])
    output, prompt = [3, 3], [0]
    want = torch.tensor(reference_probs(logits.tolist(), params, output, prompt), dtype=torch.float64)

    # Many rows in one batch, unseeded: one draw from the shared generator.
    draws = 40_000
    t = tensors([params] * draws, [output] * draws, [prompt] * draws, vocab=8, shared_generator=make_generator(123))
    counts = torch.bincount(sample(logits.expand(draws, 8), t).token_ids, minlength=8).double()
    stat, dof = chi_square(counts, want, draws)
    assert stat < CHI2_999[dof], (counts, want * draws)

    # One seeded row over many steps: its own generator.
    steps = 3_000
    t = tensors([params], [output], [prompt], [make_generator(99)], vocab=8)
    tokens = torch.cat([sample(logits[None], t).token_ids for _ in range(steps)])
    stat, dof = chi_square(torch.bincount(tokens, minlength=8).double(), want, steps)
    assert stat < CHI2_999[dof]


# ----------------------------------------------------------------- logprobs


def test_logprobs_are_raw_and_normalised():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 20, generator=gen) * 3
    params = [
        SamplingParams(logprobs=20, temperature=0.5, repetition_penalty=1.7),
        SamplingParams(logprobs=2, top_k=3),
        SamplingParams(),  # no logprobs requested: gets the batch's K anyway
    ]
    out = sample(logits, tensors(params, outputs=[[0, 1], [], []], prompts=[[2], [], []], vocab=20))
    raw = torch.log_softmax(logits, dim=-1)
    assert out.top_ids.shape == out.top_logprobs.shape == (3, 20)
    assert torch.allclose(torch.logsumexp(out.top_logprobs, dim=-1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(out.top_logprobs, raw.sort(dim=-1, descending=True).values, atol=1e-6)
    assert torch.allclose(raw.gather(1, out.top_ids), out.top_logprobs, atol=1e-6)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1), atol=1e-6)


def test_no_logprobs_gives_empty_top():
    out = sample(torch.randn(2, 7), tensors([SamplingParams()] * 2, vocab=7))
    assert out.top_ids.shape == (2, 0) and out.top_logprobs.shape == (2, 0)
    assert out.logprobs.shape == (2,) and bool((out.logprobs <= 0).all())


def test_bfloat16_logits():
    logits = torch.randn(2, 64).to(torch.bfloat16)
    out = sample(logits, tensors([SamplingParams(temperature=0.0, logprobs=3)] * 2, vocab=64))
    assert torch.equal(out.token_ids, logits.float().argmax(-1))
    assert out.top_logprobs.dtype == torch.float32


# ----------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "field,value",
    [
        ("n", 2),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.1),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.1),
        ("seed", 1.5),
        ("stop", [""]),
        ("stop", ["ok", 3]),
        ("stop_token_ids", [-1]),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("logprobs", 21),
        ("logprobs", -1),
        ("ignore_eos", "yes"),
    ],
)
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)


def test_defaults_and_normalisation():
    p = SamplingParams(stop="###", max_tokens=None, top_k=-1)
    assert p.stop == ["###"] and p.stop_token_ids == [] and p.max_tokens is None
    assert not p.greedy
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy


def test_from_generation_config():
    config = {
        "bos_token_id": 151643,
        "do_sample": True,
        "eos_token_id": [151645, 151643],
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
        "max_new_tokens": 512,
        "transformers_version": "4.57.0",
    }
    p = SamplingParams.from_generation_config(config)
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens) == (0.7, 20, 0.8, 512)
    p = SamplingParams.from_generation_config(config, top_p=0.95, max_tokens=8)
    assert (p.top_p, p.max_tokens, p.temperature) == (0.95, 8, 0.7)
    assert SamplingParams.from_generation_config({**config, "do_sample": False}).greedy
    assert SamplingParams.from_generation_config({"do_sample": False}, temperature=0.5).temperature == 0.5
    assert SamplingParams.from_generation_config(None) == SamplingParams()
    with pytest.raises(TypeError):
        SamplingParams.from_generation_config(config, not_a_field=1)
