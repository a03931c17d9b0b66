"""Batched next-token sampling: one call per engine step for the whole batch.

Pipeline (vLLM's order), each row with its own settings:

    raw logits
      -> min_tokens ban (EOS / stop ids set to -inf while too few tokens exist)
      -> repetition penalty (prompt + output tokens), frequency and presence
         penalties (output tokens)                       = penalised logits
      -> greedy rows: argmax of the penalised logits, done
      -> / temperature -> top-k -> top-p -> min-p        = processed logits
      -> sample from softmax(processed logits)

Sampling uses the "exponential race": argmax(probs / E) with E ~ Exp(1) i.i.d.
per token picks token i with probability probs[i] (it is the Gumbel-max trick
in another guise).  Its only randomness is one Exp(1) vector per row, so a row
with its own `torch.Generator` draws its vector from that generator alone and
its sample never depends on which other rows share the batch.

Returned logprobs are "raw": log_softmax of the logits as the model produced
them (before penalties, temperature and filtering), which is vLLM's default.
They describe the model, not the sampling knobs, and stay finite for tokens
that the filters removed.

Every operation is per row (sorts, softmaxes, reductions along the vocabulary)
and the filters are thresholds on logit values, so ties never depend on a
sort's order: a row's result is the same alone or in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch

from .transfer import to_device

if TYPE_CHECKING:  # ops stays importable without the engine package
    from qwen3next.engine.sampling_params import SamplingParams

__all__ = [
    "SampleOutput",
    "SamplingTensors",
    "apply_min_p",
    "apply_penalties",
    "apply_top_k_top_p",
    "make_generator",
    "processed_logits",
    "sample",
]


class SampleOutput(NamedTuple):
    """What one sampling step produces for a batch of B rows.

    token_ids:    [B] long, the chosen tokens.
    logprobs:     [B] float, raw logprob of each chosen token (log_softmax of the
                  unmodified model logits).
    top_ids:      [B, K] long, the K most likely tokens under the raw logits,
                  most likely first; K = the largest `logprobs` asked for in the
                  batch (0 if none).  A row that asked for fewer uses a prefix.
    top_logprobs: [B, K] float, their raw logprobs.
    The last three are None when the batch was built with
    `with_logprobs=False` (no row asked for logprobs: the engine then skips
    the reduction over the vocabulary that they cost).
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The per-request generator for a seeded request.

    Create it once when the request arrives and pass the same object at every
    step: its state advancing is what makes step t+1 differ from step t.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _count_tokens(token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, vocab_size] int32 occurrence counts of each row's tokens, built in one scatter.

    Only the padded ids travel to the device; the [B, V] counts are made there.
    """
    longest = max((len(t) for t in token_lists), default=0)
    # Pad with an extra "vocab_size" column that is dropped afterwards.
    padded = [list(t) + [vocab_size] * (longest - len(t)) for t in token_lists]
    ids = to_device(torch.tensor(padded, dtype=torch.long).reshape(len(token_lists), longest), torch.long, device)
    counts = torch.zeros((len(token_lists), vocab_size + 1), dtype=torch.int32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))
    return counts[:, :vocab_size]


@dataclass
class SamplingTensors:
    """Per-row sampling settings of one batch as tensors on the logits' device.

    Rows are in batch order.  `top_k` holds vocab_size where top-k is off so that
    one comparison covers every row.  Greedy rows hold neutral values (they are
    decided by an argmax before temperature and filters) and never make the
    batch run a stage.  The `do_*` flags and `max_top_k` (Python
    values, so no device sync is needed to read them) let `sample` skip whole
    stages that no row uses: a sort of [B, V] is the expensive part.
    """

    temperature: torch.Tensor  # [B] float32, 1.0 on greedy rows (never divided by 0)
    top_k: torch.Tensor  # [B] long, in [1, vocab_size]; 1 on greedy rows
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    repetition_penalty: torch.Tensor  # [B] float32
    presence_penalty: torch.Tensor  # [B] float32
    frequency_penalty: torch.Tensor  # [B] float32
    greedy: torch.Tensor  # [B] bool
    output_counts: torch.Tensor | None  # [B, V] int32, occurrences in the output so far
    prompt_mask: torch.Tensor | None  # [B, V] bool, token occurs in the prompt
    banned: torch.Tensor | None  # [B, V] bool, min_tokens not reached: -inf
    generators: list[torch.Generator | None]  # per row; None = the shared generator
    shared_generator: torch.Generator | None  # None = torch's default RNG
    num_logprobs: int  # K of SampleOutput.top_ids
    do_penalties: bool
    do_top_k_top_p: bool
    max_top_k: int  # vocab_size when some row has no top-k
    do_min_p: bool
    any_greedy: bool
    all_greedy: bool
    with_logprobs: bool = True  # False: `sample` returns token ids only

    @classmethod
    def from_params(
        cls,
        params_list: Sequence[SamplingParams],
        output_token_ids_list: Sequence[Sequence[int]],
        prompt_token_ids_list: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None] | None,
        device: torch.device | str,
        vocab_size: int,
        *,
        shared_generator: torch.Generator | None = None,
        eos_token_ids: Sequence[int] = (),
        pending: Sequence[int] | None = None,
        pending_ids: torch.Tensor | None = None,
        with_logprobs: bool = True,
    ) -> "SamplingTensors":
        """Gather a batch's settings.

        generators[i] is row i's persistent generator (see `make_generator`), or
        None to draw from `shared_generator`.  eos_token_ids (with each row's
        stop_token_ids) are banned on rows that have fewer than min_tokens
        output tokens.  pending[i] (0 or 1): an output token of row i sampled
        but not in its list yet, whose id is pending_ids[i] on the device
        (overlap scheduling: the host has not seen it); it counts for
        min_tokens and, added on the device, for the penalties.
        with_logprobs=False: `sample` computes no logprobs (a caller that
        knows no row wants them).
        """
        device = torch.device(device)
        batch = len(params_list)
        if not (len(output_token_ids_list) == len(prompt_token_ids_list) == batch):
            raise ValueError("params_list, output_token_ids_list and prompt_token_ids_list must have one entry per row")
        if generators is None:
            generators = [None] * batch
        if len(generators) != batch:
            raise ValueError("generators must have one entry (or None) per row")

        greedy = [p.greedy for p in params_list]
        top_k = [p.top_k if p.top_k >= 1 else vocab_size for p in params_list]
        top_k = [min(k, vocab_size) for k in top_k]

        # Greedy rows: temperature 1 (no division by 0), top_k 1 (never raises
        # max_top_k, so never forces a full sort on the batch).
        temperature = [1.0 if g else p.temperature for g, p in zip(greedy, params_list)]
        top_p = [1.0 if g else p.top_p for g, p in zip(greedy, params_list)]
        min_p = [0.0 if g else p.min_p for g, p in zip(greedy, params_list)]
        top_k = [1 if g else k for g, k in zip(greedy, top_k)]

        pending = list(pending) if pending is not None else [0] * batch
        if len(pending) != batch or any(n not in (0, 1) for n in pending):
            raise ValueError("pending must have one entry, 0 or 1, per row")
        do_repetition = any(p.repetition_penalty != 1.0 for p in params_list)
        do_output_penalties = do_repetition or any(
            p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params_list
        )
        output_counts = _count_tokens(output_token_ids_list, vocab_size, device) if do_output_penalties else None
        if output_counts is not None and any(pending):      # the pending tokens, counted where they are
            if pending_ids is None or pending_ids.shape != (batch,):
                raise ValueError("penalties over rows with a pending token need pending_ids, one id per row")
            add = to_device(pending, torch.int32, device)[:, None]
            output_counts.scatter_add_(1, pending_ids.to(device)[:, None].clamp(0, vocab_size - 1), add)
        prompt_mask = _count_tokens(prompt_token_ids_list, vocab_size, device) > 0 if do_repetition else None

        banned_at = []      # (row, token id) pairs: min_tokens not reached
        for row, (p, out, n) in enumerate(zip(params_list, output_token_ids_list, pending)):
            if len(out) + n < p.min_tokens:
                banned_at += [(row, t) for t in (*eos_token_ids, *p.stop_token_ids) if 0 <= t < vocab_size]
        banned = None
        if banned_at:
            banned = torch.zeros((batch, vocab_size), dtype=torch.bool, device=device)
            banned[tuple(to_device(list(zip(*banned_at)), torch.long, device))] = True

        # every per-row setting in one copy to the device (float32 holds top_k exactly: vocabularies < 2**24)
        columns = to_device([temperature, top_k, top_p, min_p, [p.repetition_penalty for p in params_list],
                             [p.presence_penalty for p in params_list], [p.frequency_penalty for p in params_list],
                             [float(g) for g in greedy]], torch.float32, device)
        return cls(
            temperature=columns[0],
            top_k=columns[1].long(),
            top_p=columns[2],
            min_p=columns[3],
            repetition_penalty=columns[4],
            presence_penalty=columns[5],
            frequency_penalty=columns[6],
            greedy=columns[7] > 0.5,
            output_counts=output_counts,
            prompt_mask=prompt_mask,
            banned=banned,
            # A greedy row needs no randomness: leave its own generator untouched.
            generators=[None if g else gen for g, gen in zip(greedy, generators)],
            shared_generator=shared_generator,
            num_logprobs=min(max((p.logprobs or 0 for p in params_list), default=0), vocab_size),
            do_penalties=do_output_penalties or banned is not None,
            do_top_k_top_p=any(not g and (k < vocab_size or p < 1.0) for g, k, p in zip(greedy, top_k, top_p)),
            max_top_k=max(top_k, default=vocab_size),
            do_min_p=any(m > 0.0 for m in min_p),
            any_greedy=any(greedy),
            all_greedy=all(greedy),
            with_logprobs=with_logprobs,
        )


def apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Penalised logits (new tensor): min_tokens ban, repetition, frequency, presence."""
    logits = logits.clone()
    if t.banned is not None:
        logits.masked_fill_(t.banned, float("-inf"))
    if t.prompt_mask is not None:
        # Repetition penalty (CTRL / HF convention): shrink a seen token's logit
        # towards "less likely" whatever its sign.
        seen = t.prompt_mask | (t.output_counts > 0)
        penalty = t.repetition_penalty.unsqueeze(1)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if t.output_counts is not None:
        counts = t.output_counts.to(logits.dtype)
        logits -= t.frequency_penalty.unsqueeze(1) * counts
        logits -= t.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, max_top_k: int | None = None
) -> torch.Tensor:
    """Set to -inf every token outside each row's top-k, then outside its top-p nucleus.

    Both filters are thresholds on the logit value, so tokens with equal logits
    are always kept or dropped together and the result never depends on how a
    sort orders ties (bf16 logits tie often):
      top-k keeps the tokens whose logit is >= the k-th largest logit;
      top-p then keeps, on the top-k set renormalised, the tokens whose
        probability mass strictly above theirs is < top_p: the smallest most
        likely set reaching top_p, so the most likely token always survives.
    Rows with top_p == 1 skip the nucleus test, so rounding in the cumulative
    sum can never drop a tail token.

    max_top_k: the largest top_k of the batch if known (saves a device sync).
    When every row has a top-k, only the max_top_k largest logits are sorted
    (torch.topk) instead of the whole vocabulary.
    """
    vocab = logits.shape[-1]
    if max_top_k is None:
        max_top_k = int(top_k.max())
    if max_top_k < vocab:
        sorted_logits = torch.topk(logits, max_top_k, dim=-1).values
    else:
        sorted_logits = torch.sort(logits, dim=-1, descending=True).values

    kth_largest = sorted_logits.gather(-1, (top_k - 1).unsqueeze(1))
    logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))

    # Normalise over the whole (top-k filtered) row: with topk, tokens tied with
    # the k-th largest may lie beyond the sorted prefix.
    sorted_probs = (sorted_logits - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    # mass_before is nondecreasing, so the kept positions are a prefix; its last
    # logit is the threshold (ties straddling the cut have the same logit, so
    # they are kept with it).
    num_kept = (mass_before < top_p.unsqueeze(1)).sum(dim=-1, keepdim=True).clamp_(1, sorted_logits.shape[-1])
    threshold = sorted_logits.gather(-1, num_kept - 1)
    threshold = threshold.masked_fill((top_p >= 1.0).unsqueeze(1), float("-inf"))
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the tokens whose probability is below min_p * the row's top probability."""
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def processed_logits(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """The logits whose softmax non-greedy rows sample from (float32, -inf = filtered out).

    Greedy rows come out as their argmax (every other token -inf), the token
    `sample` picks for them.
    """
    penalised = logits.float()
    if t.do_penalties:
        penalised = apply_penalties(penalised, t)
    processed = _temperature_and_filters(penalised, t)
    if t.any_greedy:
        greedy = t.greedy.unsqueeze(1)
        is_argmax = torch.zeros_like(processed, dtype=torch.bool)
        is_argmax.scatter_(-1, penalised.argmax(dim=-1, keepdim=True), True)
        processed = torch.where(greedy, penalised, processed).masked_fill(greedy & ~is_argmax, float("-inf"))
    return processed


def _temperature_and_filters(penalised: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    logits = penalised / t.temperature.unsqueeze(1)
    if t.do_top_k_top_p:
        logits = apply_top_k_top_p(logits, t.top_k, t.top_p, t.max_top_k)
    if t.do_min_p:
        logits = apply_min_p(logits, t.min_p)
    return logits


def _exponential_race(probs: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """argmax(probs / E), E ~ Exp(1) drawn per row from that row's generator."""
    race = torch.empty_like(probs)
    seeded = [row for row, g in enumerate(t.generators) if g is not None]
    for row in seeded:
        race[row].exponential_(generator=t.generators[row])
    if len(seeded) < probs.shape[0]:
        # All unseeded rows share one draw from the shared generator.
        unseeded = torch.empty_like(probs).exponential_(generator=t.shared_generator)
        if seeded:
            is_seeded = to_device([g is not None for g in t.generators], torch.bool, probs.device)
            race = torch.where(is_seeded.unsqueeze(1), race, unseeded)
        else:
            race = unseeded
    # Exp(1) can round to 0 in float32; 0/0 on a filtered token would be NaN.
    race.clamp_min_(torch.finfo(race.dtype).tiny)
    return (probs / race).argmax(dim=-1)


def sample(logits: torch.Tensor, params: SamplingTensors) -> SampleOutput:
    """Pick one token per row of `logits` [B, V] under each row's settings.

    Greedy rows (temperature ~0 or top_k == 1) take the argmax of the penalised
    logits and never advance their own generator.  See the module docstring for the order
    of the stages and the meaning of the returned logprobs.
    """
    raw = logits.float()
    penalised = apply_penalties(raw, params) if params.do_penalties else raw
    token_ids = penalised.argmax(dim=-1)

    if not params.all_greedy:
        probs = torch.softmax(_temperature_and_filters(penalised, params), dim=-1)
        sampled = _exponential_race(probs, params)
        token_ids = torch.where(params.greedy, token_ids, sampled)

    if not params.with_logprobs:
        return SampleOutput(token_ids, None, None, None)
    # Raw logprobs: only a logsumexp and gathers, no [B, V] log_softmax kept.
    log_normaliser = torch.logsumexp(raw, dim=-1, keepdim=True)
    chosen_logprobs = raw.gather(-1, token_ids.unsqueeze(1)).sub_(log_normaliser).squeeze(1)
    top_values, top_ids = torch.topk(raw, params.num_logprobs, dim=-1)
    return SampleOutput(token_ids, chosen_logprobs, top_ids, top_values - log_normaliser)
