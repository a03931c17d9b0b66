"""MTP speculative decoding: the model's own multi-token-prediction head drafts k tokens, the main model verifies
them (and the token before them) in one forward of k+1 positions, and the longest acceptable prefix is kept.

- Drafting: the MTP head at position p reads h_p (the main model's hidden) and t_{p+1} and predicts t_{p+2}. Before
  drafting, it catches up on every position whose true hidden it has not seen (its own KV stays exact there); the
  first draft comes from the last true position, further drafts re-apply the head to its own hidden state.
- Acceptance: rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft d ~ q is kept with probability
  min(1, p(d)/q(d)); the first rejected one is replaced by a sample of norm(max(p - q, 0)); if all k survive, a bonus
  token is drawn from p. The output distribution is exactly the target's; greedy rows reduce to "draft == argmax".
- The recurrent state cannot be truncated: verification keeps the Gated DeltaNet state after every position and the
  engine commits the one after the last accepted token (HybridCache.commit_step_states). KV of rejected positions
  is simply overwritten later (it lies beyond the sequence's length).
- Drafting stops paying when verification costs more than the accepted drafts save; where that happens depends on
  the device, the batch and the text. `SpeculationPolicy` measures it: per batch-size bucket it compares the
  tokens per second of decode steps with and without drafts and drafts only where that pays (re-probing now and
  then); at `disable_batch_size` or more decoding sequences it never drafts. The stats say what it chose.
Requests with penalties, min_tokens or logprobs decode normally (their per-token processing is sequential).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ..model.cache import BatchMeta, HybridCache
from ..ops.sampling import SamplingTensors, processed_logits
from .sequence import Sequence


class SpeculativeStats:
    def __init__(self, k: int):
        self.k = k
        self.verify_steps = 0            # sequence-steps that verified drafts
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.proposed_at = [0] * k       # drafts proposed at position j (1-based j+1)
        self.accepted_at = [0] * k
        self.disabled_steps = 0          # engine steps in which drafting was switched off (large batch)

    def as_dict(self) -> dict:
        return {
            "speculative_tokens": self.k,
            "verify_steps": self.verify_steps,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": self.accepted_tokens / self.draft_tokens if self.draft_tokens else None,
            # tokens gained per verification (accepted drafts + the token the verifier adds)
            "mean_accepted_length": (self.accepted_tokens + self.verify_steps) / self.verify_steps
            if self.verify_steps else None,
            "per_position_acceptance": [a / p if p else None for a, p in zip(self.accepted_at, self.proposed_at)],
            "disabled_steps": self.disabled_steps,
        }


class SpeculationPolicy:
    """Whether to draft at this batch size, from measured throughput rather than a fixed rule.

    Decoding sequences are bucketed by batch size (1, 2-3, 4-7, 8-15, ...). For each bucket it keeps an
    exponential average of tokens emitted per second over pure decode steps, with drafting on and off. It tries
    each mode `warmup` times (after one discarded step each, which may include compilation), then drafts only if
    that was faster, and every `probe_every` steps of the bucket takes the other mode once, since acceptance and
    costs drift with the text and the load. `adaptive=False` keeps only the hard cap."""

    def __init__(self, disable_batch_size: int = 16, adaptive: bool = True, warmup: int = 3,
                 probe_every: int = 64, alpha: float = 0.25):
        self.disable_batch_size, self.adaptive = disable_batch_size, adaptive
        self.warmup, self.probe_every, self.alpha = warmup, probe_every, alpha
        self.buckets: dict[int, dict] = {}

    @staticmethod
    def bucket(num_decoding: int) -> int:
        return num_decoding.bit_length()

    def _state(self, b: int) -> dict:
        return self.buckets.setdefault(b, {"rate": {True: None, False: None}, "seen": {True: 0, False: 0},
                                           "steps": 0, "choice": True})

    def choose(self, num_decoding: int) -> bool:
        """True to draft in this step."""
        if num_decoding >= self.disable_batch_size:
            return False
        if not self.adaptive:
            return True
        st = self._state(self.bucket(num_decoding))
        st["steps"] += 1
        for mode in (True, False):                          # explore: each mode, warmup + 1 times
            if st["seen"][mode] <= self.warmup:
                return mode
        best = st["rate"][True] >= st["rate"][False]
        st["choice"] = best
        return (not best) if st["steps"] % self.probe_every == 0 else best

    def observe(self, num_decoding: int, drafted: bool, tokens: int, seconds: float) -> None:
        """One pure decode step: `tokens` emitted by `num_decoding` sequences in `seconds`."""
        if not self.adaptive or seconds <= 0 or num_decoding >= self.disable_batch_size:
            return
        st = self._state(self.bucket(num_decoding))
        st["seen"][drafted] += 1
        if st["seen"][drafted] == 1:                        # the first one may include compilation: dropped
            return
        rate, old = tokens / seconds, st["rate"][drafted]
        st["rate"][drafted] = rate if old is None else (1 - self.alpha) * old + self.alpha * rate

    def as_dict(self) -> dict:
        out = {}
        for b, st in sorted(self.buckets.items()):
            lo, hi = (1 << (b - 1)), (1 << b) - 1
            out[f"{lo}-{hi}" if hi > lo else f"{lo}"] = {
                "tokens_per_s_drafting": st["rate"][True], "tokens_per_s_plain": st["rate"][False],
                "drafting": st["choice"]}
        return {"adaptive": self.adaptive, "disable_batch_size": self.disable_batch_size, "by_batch_size": out}


class Speculator:
    def __init__(self, model, cache: HybridCache, k: int, page_size: int, disable_batch_size: int = 16,
                 adaptive: bool = True):
        if model.mtp is None:
            raise ValueError("speculative_tokens needs a model with an MTP head (num_nextn_predict_layers >= 1)")
        if k < 1:
            raise ValueError(f"speculative_tokens must be >= 1 to speculate, got {k}")
        self.model, self.cache, self.k, self.page_size = model, cache, k, page_size
        self.policy = SpeculationPolicy(disable_batch_size, adaptive)
        self.pending: dict[str, list[torch.Tensor]] = defaultdict(list)   # true hiddens the MTP has not seen
        self.mtp_done: dict[str, int] = defaultdict(int)                   # positions with exact MTP KV
        self.stats = SpeculativeStats(k)

    # ---- bookkeeping ----------------------------------------------------------------------------------------------
    @staticmethod
    def eligible(seq: Sequence) -> bool:
        p = seq.params
        return (p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
                and p.min_tokens == 0 and p.logprobs is None)

    def drafts_for(self, num_decoding: int) -> int:
        if not self.policy.choose(num_decoding):
            self.stats.disabled_steps += 1
            return 0
        return self.k

    def record(self, seq: Sequence, hidden_rows: torch.Tensor) -> None:
        """The main model's hiddens for the positions it just computed (in order)."""
        self.pending[seq.request_id].append(hidden_rows)

    def forget(self, seq: Sequence) -> None:
        """Finished or preempted (a preempted sequence is recomputed from scratch, its MTP cache too)."""
        self.pending.pop(seq.request_id, None)
        self.mtp_done.pop(seq.request_id, None)

    # ---- drafting -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def draft(self, seqs: list[Sequence], shared_generator: torch.Generator) -> None:
        """Set seq.draft_tokens (k each, k = seq.spec_k) and seq.draft_probs [k, V] for every sequence."""
        dev = self.model.model.embed_tokens.weight.device
        # 1. catch up: positions mtp_done .. L-2 with their true hiddens, then the first draft from the last one
        hid, nxt, q_lens, starts = [], [], [], []
        for s in seqs:
            L = s.num_tokens
            h = torch.cat(self.pending.pop(s.request_id))
            start = self.mtp_done[s.request_id]
            if h.shape[0] != L - 1 - start:
                raise RuntimeError(f"speculator out of step for request {s.request_id}: {h.shape[0]} hiddens for "
                                   f"positions {start}..{L - 2}")
            hid.append(h)
            nxt.extend(s.token_slice(start + 1, L))
            q_lens.append(h.shape[0])
            starts.append(start)
            self.mtp_done[s.request_id] = L - 1
        meta = BatchMeta.build(q_lens, starts, [s.slot for s in seqs], [s.pages for s in seqs], self.page_size, dev)
        logits, h_mtp, _ = self.model.mtp_forward(torch.cat(hid)[None], torch.tensor([nxt], device=dev),
                                                  cache=self.cache, meta=meta)
        last = meta.cu_seqlens[1:] - 1
        logits, h_mtp = logits[0, last], h_mtp[0, last]
        for s in seqs:
            s.draft_tokens, s.draft_probs = [], []
        active, j = seqs, 0
        while True:
            st = SamplingTensors.from_params([s.params for s in active], [[]] * len(active), [[]] * len(active),
                                             [s.generator for s in active], dev, logits.shape[-1],
                                             shared_generator=shared_generator)
            probs = torch.softmax(processed_logits(logits.float(), st), dim=-1)
            toks = [_draw(probs[i], s, shared_generator) for i, s in enumerate(active)]
            for i, s in enumerate(active):
                s.draft_tokens.append(toks[i])
                s.draft_probs.append(probs[i])
            keep = [i for i, s in enumerate(active) if s.spec_k > j + 1]
            if not keep:
                break
            # 2. further drafts: the head again, fed its own hidden and its last draft, one position on
            active = [active[i] for i in keep]
            sel = torch.tensor(keep, device=dev)
            meta = BatchMeta.build([1] * len(active), [s.num_tokens - 1 + j for s in active],
                                   [s.slot for s in active], [s.pages for s in active], self.page_size, dev)
            lg, h_mtp, _ = self.model.mtp_forward(h_mtp[sel][None], torch.tensor([[toks[i] for i in keep]], device=dev),
                                                  cache=self.cache, meta=meta)
            logits, h_mtp = lg[0], h_mtp[0]
            j += 1
        for s in seqs:
            s.draft_probs = torch.stack(s.draft_probs) if s.draft_probs else None

    # ---- verification ---------------------------------------------------------------------------------------------
    def accept(self, seq: Sequence, target_logits: torch.Tensor, shared_generator: torch.Generator) -> list[int]:
        """target_logits [k+1, V]: the main model's logits at the token before the drafts and at each draft.
        Returns the new tokens (accepted drafts + one more); updates the stats."""
        k = len(seq.draft_tokens)
        st = SamplingTensors.from_params([seq.params] * (k + 1), [[]] * (k + 1), [[]] * (k + 1),
                                         [seq.generator] * (k + 1), target_logits.device, target_logits.shape[-1],
                                         shared_generator=shared_generator)
        p = torch.softmax(processed_logits(target_logits.float(), st), dim=-1)
        out = []
        for j, d in enumerate(seq.draft_tokens):
            q = seq.draft_probs[j]
            ratio = (p[j, d] / q[d]).item() if q[d] > 0 else 0.0
            self.stats.proposed_at[j] += 1
            if ratio >= 1.0 or _uniform(seq, shared_generator) < ratio:
                out.append(d)
                self.stats.accepted_at[j] += 1
                continue
            residual = (p[j] - q).clamp_min(0)
            out.append(_draw(residual / residual.sum() if residual.sum() > 0 else p[j], seq, shared_generator))
            break
        else:
            out.append(_draw(p[k], seq, shared_generator))      # every draft kept: a bonus token
        self.stats.verify_steps += 1
        self.stats.draft_tokens += k
        self.stats.accepted_tokens += len(out) - 1
        return out


def _draw(probs: torch.Tensor, seq: Sequence, shared: torch.Generator) -> int:
    if seq.params.greedy:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=seq.generator or shared))


def _uniform(seq: Sequence, shared: torch.Generator) -> float:
    gen = seq.generator or shared
    return float(torch.rand((), generator=gen, device=gen.device))
