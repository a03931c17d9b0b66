"""MTP speculative decoding: the model's own multi-token-prediction head drafts k tokens, the main model verifies
them (and the token before them) in one forward of k+1 positions, and the longest acceptable prefix is kept.

- Drafting: the MTP head at position p reads h_p (the main model's hidden) and t_{p+1} and predicts t_{p+2}. Before
  drafting, it catches up on every position whose true hidden it has not seen (its own KV stays exact there); the
  first draft comes from the last true position, further drafts re-apply the head to its own hidden state. Drafts
  are greedy (the head's argmax), so on a GPU the catch-up and all k drafts run as one CUDA graph
  (engine/draft_graphs.py) and the verification as another (engine/graphs.py).
- Acceptance: rejection sampling (Leviathan et al. 2023; Chen et al. 2023) with a draft distribution q that puts
  all its mass on the draft d: d is kept with probability min(1, p(d)/q(d)) = p(d); the first rejected one is
  replaced by a sample of norm(max(p - q, 0)) (p without d); if all k survive, a bonus token is drawn from p. The
  output distribution is exactly the target's; greedy rows reduce to "draft == argmax".
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


# unseen positions up to this many per sequence are caught up through the drafting graph, q at a time
GRAPH_CATCH_UP_MAX = 64


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
    that was faster, and now and then takes the other mode once (a probe), since acceptance and costs drift with
    the text and the load. The probes start `probe_every` steps apart; each probe that leaves the choice as it was
    doubles the gap (up to `max_probe_every`), one that changes it resets the gap: a probe is not free, since
    drafting after plain steps first catches the MTP head up on the positions it skipped (through the drafting
    graph q at a time, or one eager forward of the head). `adaptive=False` keeps only the hard cap."""

    def __init__(self, disable_batch_size: int = 16, adaptive: bool = True, warmup: int = 3,
                 probe_every: int = 64, max_probe_every: int = 1024, alpha: float = 0.25):
        self.disable_batch_size, self.adaptive = disable_batch_size, adaptive
        self.warmup, self.probe_every, self.max_probe_every = warmup, probe_every, max_probe_every
        self.alpha = alpha
        self.buckets: dict[int, dict] = {}

    @staticmethod
    def bucket(num_decoding: int) -> int:
        return num_decoding.bit_length()

    def _state(self, b: int) -> dict:
        return self.buckets.setdefault(b, {"rate": {True: None, False: None}, "seen": {True: 0, False: 0},
                                           "steps": 0, "choice": True, "gap": self.probe_every,
                                           "next_probe": None, "probed": None})

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
        if st["probed"] is not None:                        # the first choice after a probe: the next gap
            kept = best == st["probed"]
            st["gap"] = min(2 * st["gap"], self.max_probe_every) if kept else self.probe_every
            st["probed"], st["next_probe"] = None, st["steps"] - 1 + st["gap"]     # counted from the probe
        st["choice"] = best
        if st["next_probe"] is None:
            st["next_probe"] = st["steps"] + st["gap"]
        if st["steps"] >= st["next_probe"]:                 # probe the other mode once
            st["probed"] = best
            return not best
        return best

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
                "drafting": st["choice"], "probe_gap": st["gap"]}
        return {"adaptive": self.adaptive, "disable_batch_size": self.disable_batch_size, "by_batch_size": out}


class Speculator:
    def __init__(self, model, cache: HybridCache, k: int, page_size: int, disable_batch_size: int = 16,
                 adaptive: bool = True, graphs=None):
        if model.mtp is None:
            raise ValueError("speculative_tokens needs a model with an MTP head (num_nextn_predict_layers >= 1)")
        if k < 1:
            raise ValueError(f"speculative_tokens must be >= 1 to speculate, got {k}")
        self.model, self.cache, self.k, self.page_size = model, cache, k, page_size
        self.policy = SpeculationPolicy(disable_batch_size, adaptive)
        self.pending: dict[str, list[torch.Tensor]] = defaultdict(list)   # true hiddens the MTP has not seen
        self.mtp_done: dict[str, int] = defaultdict(int)                   # positions with exact MTP KV
        self.stats = SpeculativeStats(k)
        self.graphs = graphs            # engine/draft_graphs.DraftGraphs (GPU) or None: drafting runs eagerly

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
    def draft(self, seqs: list[Sequence], shared_generator: torch.Generator | None = None) -> None:
        """Set seq.draft_tokens (seq.spec_k greedy drafts) for every sequence. (Greedy drafts draw no random
        numbers: `shared_generator` is accepted for the engine's call and unused.)"""
        dev = self.model.model.embed_tokens.weight.device
        rows = []
        for s in seqs:
            L = s.num_tokens
            h = torch.cat(self.pending.pop(s.request_id))
            start = self.mtp_done[s.request_id]
            if h.shape[0] != L - 1 - start:
                raise RuntimeError(f"speculator out of step for request {s.request_id}: {h.shape[0]} hiddens for "
                                   f"positions {start}..{L - 2}")
            rows.append((s, start, h))
            self.mtp_done[s.request_id] = L - 1
        graphs = self.graphs
        if graphs is not None and graphs.applies(seqs):
            rows = self._catch_up_older(rows, dev)
            out = graphs.run(rows)
            if out is not None:
                for s, toks in zip(seqs, out.tolist()):
                    s.draft_tokens = toks[:s.spec_k]
                return
        self._draft_eagerly(rows, dev)

    def _catch_up_older(self, rows, dev):
        """The drafting graph catches up on at most q = k + 1 positions per sequence; older unseen positions
        (after a prefill, or after steps without drafting) go first. A few of them run through the same graph, q
        at a time, its drafts discarded (their keys land on positions the next piece rewrites): fixed shapes. (An
        eager catch-up of a new length took 70 ms to 2 s on an H100, mostly cuDNN building an attention plan for
        each new shape, which ops/sdpa.py now avoids; 14-32 ms per eager catch-up since, default model.) Many of
        them (a prompt) run eagerly, as one prefill-like forward of the head."""
        q = self.k + 1
        many = [(s, p, h[:-q]) for s, p, h in rows if h.shape[0] > GRAPH_CATCH_UP_MAX]
        if many:
            self._catch_up(many, dev, want_logits=False)
            rows = [(s, p + h.shape[0] - q, h[-q:]) if h.shape[0] > GRAPH_CATCH_UP_MAX else (s, p, h)
                    for s, p, h in rows]
        while True:
            older = [i for i, (_, _, h) in enumerate(rows) if h.shape[0] > q]
            if not older:
                return rows
            if self.graphs.run([(rows[i][0], rows[i][1], rows[i][2][:q]) for i in older]) is None:
                self._catch_up([(rows[i][0], rows[i][1], rows[i][2][:q]) for i in older], dev, want_logits=False)
            for i in older:
                s, p, h = rows[i]
                rows[i] = (s, p + q, h[q:])

    def _catch_up(self, rows, dev, want_logits: bool = True):
        """The MTP head over each row's true positions (KV written); logits and hidden at each row's last one."""
        meta = BatchMeta.build([h.shape[0] for _, _, h in rows], [p for _, p, _ in rows],
                               [s.slot for s, _, _ in rows], [s.pages for s, _, _ in rows], self.page_size, dev)
        nxt = [t for s, p, h in rows for t in s.token_slice(p + 1, p + 1 + h.shape[0])]
        last = meta.cu_seqlens[1:] - 1
        logits, h_mtp, _ = self.model.mtp_forward(torch.cat([h for _, _, h in rows])[None],
                                                  torch.tensor([nxt], device=dev), cache=self.cache, meta=meta,
                                                  logits_to_keep=last if want_logits else last[:0])
        return logits[0], h_mtp[0, last]

    def _draft_eagerly(self, rows, dev) -> None:
        """The same greedy drafts as the graph, one MTP forward per draft with the batch shrinking as sequences
        reach their own spec_k (fewer drafts when the scheduler's budget or the context length cut it)."""
        logits, h_mtp = self._catch_up(rows, dev)
        active = [s for s, _, _ in rows]
        for s in active:
            s.draft_tokens = []
        j = 0
        while True:
            toks = logits.argmax(-1).tolist()
            for s, t in zip(active, toks):
                s.draft_tokens.append(t)
            keep = [i for i, s in enumerate(active) if s.spec_k > j + 1]
            if not keep:
                return
            # further drafts: the head again, fed its own hidden and its last draft, one position on
            active = [active[i] for i in keep]
            sel = torch.tensor(keep, device=dev)
            meta = BatchMeta.build([1] * len(active), [s.num_tokens - 1 + j for s in active],
                                   [s.slot for s in active], [s.pages for s in active], self.page_size, dev)
            lg, h, _ = self.model.mtp_forward(h_mtp[sel][None], torch.tensor([[toks[i] for i in keep]], device=dev),
                                              cache=self.cache, meta=meta)
            logits, h_mtp = lg[0], h[0]
            j += 1

    # ---- verification ---------------------------------------------------------------------------------------------
    def accept(self, verified: list[tuple[Sequence, torch.Tensor]], shared_generator: torch.Generator) -> list[list[int]]:
        """verified: (sequence, its target logits [k+1, V]: the main model's logits at the token before the drafts
        and at each draft). Returns each sequence's new tokens (accepted drafts + one more); updates the stats.
        One softmax and one device-to-host copy for the whole batch; greedy rows need nothing else."""
        seqs = [s for s, _ in verified]
        counts = [len(s.draft_tokens) + 1 for s in seqs]
        logits = torch.cat([lg for _, lg in verified])
        st = SamplingTensors.from_params([s.params for s, n in zip(seqs, counts) for _ in range(n)],
                                         [[]] * len(logits), [[]] * len(logits),
                                         [s.generator for s, n in zip(seqs, counts) for _ in range(n)],
                                         logits.device, logits.shape[-1], shared_generator=shared_generator)
        p = torch.softmax(processed_logits(logits.float(), st), dim=-1)          # [R, V]
        starts = [sum(counts[:i]) for i in range(len(seqs))]
        draft_rows = [r + j for r, s in zip(starts, seqs) for j in range(len(s.draft_tokens))]
        drafts = [d for s in seqs for d in s.draft_tokens]
        idx = torch.tensor(draft_rows, dtype=torch.long, device=p.device)
        # q(d) = 1: the acceptance ratio of draft d is p(d); greedy rows have p one-hot at their argmax
        p_d, best = torch.cat([p[idx, torch.tensor(drafts, dtype=torch.long, device=p.device)],
                               p.argmax(-1).to(p.dtype)]).tolist(), None
        p_d, best = p_d[:len(drafts)], [int(b) for b in p_d[len(drafts):]]
        out_all, at = [], 0
        for s, r in zip(seqs, starts):
            out = []
            for j, d in enumerate(s.draft_tokens):
                ratio = p_d[at + j]
                self.stats.proposed_at[j] += 1
                if ratio >= 1.0 or (ratio > 0.0 and _uniform(s, shared_generator) < ratio):
                    out.append(d)
                    self.stats.accepted_at[j] += 1
                    continue
                if s.params.greedy:
                    out.append(best[r + j])
                else:                                   # norm(max(p - q, 0)): p without the draft
                    residual = p[r + j].clone()
                    residual[d] = 0
                    out.append(_draw(residual / residual.sum() if residual.sum() > 0 else p[r + j], s,
                                     shared_generator))
                break
            else:                                       # every draft kept: a bonus token
                k = len(s.draft_tokens)
                out.append(best[r + k] if s.params.greedy else _draw(p[r + k], s, shared_generator))
            at += len(s.draft_tokens)
            self.stats.verify_steps += 1
            self.stats.draft_tokens += len(s.draft_tokens)
            self.stats.accepted_tokens += len(out) - 1
            out_all.append(out)
        return out_all


def _draw(probs: torch.Tensor, seq: Sequence, shared: torch.Generator) -> int:
    if seq.params.greedy:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=seq.generator or shared))


def _uniform(seq: Sequence, shared: torch.Generator) -> float:
    gen = seq.generator or shared
    return float(torch.rand((), generator=gen, device=gen.device))
