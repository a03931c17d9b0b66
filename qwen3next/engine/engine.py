"""LLMEngine: requests in, tokens out — tokenizer, scheduler, cache manager, runner and sampler put together.

`add_request` validates and queues; `step` runs one scheduled batch and returns what changed; `abort` frees a
request's slot and pages at once. The engine never touches weights (the runner does) and holds no tensors but the
per-request random generators.
"""
from __future__ import annotations

import itertools
import logging
from collections import deque
import math
import os
import time

import torch

from ..ops.sampling import SamplingTensors, make_generator, sample
from ..ops.transfer import to_device
from ..tokenizer import IncrementalDetokenizer
from .cache import CacheManager
from .prefill_graphs import PREFILL_GRAPH_MAX_TOKENS
from .runner import ModelRunner
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence
from .stop import StopChecker

log = logging.getLogger("qwen3next.engine")


class EngineStats:
    """Counters the server exports as metrics."""

    def __init__(self):
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished_requests = 0
        self.ttft: deque[float] = deque(maxlen=1000)   # recent time-to-first-token samples (s)
        self.tpot: deque[float] = deque(maxlen=1000)   # recent time-per-output-token samples (s)


def default_batched_tokens(device: torch.device) -> int:
    """Tokens per engine step (the prefill chunk) when the user sets none. On a GPU 8192, as vLLM's and SGLang's
    servers: every chunk of a Qwen3-Next prompt reads nearly all 512 experts of every layer, so small chunks
    multiply the weight traffic; a new 4K prompt through the engine, 8 layers of 80B-A3B on an H100, took 163-210
    ms to its first token in 512-token chunks and 27-30 ms in one (its forward alone 26 ms;
    benchmarks/engine_prefill.py, results/engine_prefill_2026-11-24.json). On a CPU 512, where a step's time
    grows with its tokens and decoding requests should not wait long behind a prompt."""
    return 8192 if device.type == "cuda" else 512


class SampledStep:
    """A step's sampled tokens (and logprobs) on their way to the host: the copies are queued behind the
    sampling kernels, and `to_host` waits only for them."""

    def __init__(self, seqs: list[Sequence], out):
        self.seqs = seqs
        # non_blocking device-to-host copies land in pinned memory; the event marks their completion (no logprobs
        # computed: zeros and empty top lists, which only requests that asked for logprobs would read)
        self.host = [t.to("cpu", non_blocking=True) if t is not None else None for t in out]
        self.rows = len(seqs)
        self.ready = None
        if out.token_ids.is_cuda:
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(out.token_ids.device))

    def to_host(self) -> list[list]:
        if self.ready is not None:
            self.ready.synchronize()
        empty = ([0.0] * self.rows, [[]] * self.rows, [[]] * self.rows)
        return [self.host[0].tolist()] + [t.tolist() if t is not None else e for t, e in zip(self.host[1:], empty)]


class LLMEngine:
    def __init__(self, model, tokenizer=None, *, max_num_seqs: int = 16, max_model_len: int | None = None,
                 max_num_batched_tokens: int | None = None, num_kv_pages: int | None = None, page_size: int = 16,
                 kv_cache_gib: float | None = None, seed: int = 0, generation_config: dict | None = None,
                 speculative_tokens: int = 0, speculative_disable_batch_size: int = 16,
                 speculative_adaptive: bool = True, cuda_graphs: bool = True, warm_up: bool = True,
                 prefill_graph_tokens: int = PREFILL_GRAPH_MAX_TOKENS, overlap: bool | None = None):
        cfg = model.config
        self.model, self.tokenizer, self.config = model, tokenizer, cfg
        max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        pages_per_seq = math.ceil(max_model_len / page_size)
        n_attn = cfg.layer_types.count("full_attention")
        if num_kv_pages is None:
            bytes_per_page = max(n_attn, 1) * 2 * page_size * cfg.num_key_value_heads * cfg.head_dim * \
                model.model.embed_tokens.weight.element_size()
            budget = (kv_cache_gib if kv_cache_gib is not None else 2.0) * (1 << 30)
            num_kv_pages = max(1, min(max_num_seqs * pages_per_seq, int(budget // bytes_per_page)))
        # one sequence must always fit alone, else preemption could never make progress
        self.max_model_len = min(max_model_len, num_kv_pages * page_size)
        self.cache = CacheManager(max_num_seqs, num_kv_pages, page_size)
        if max_num_batched_tokens is None:
            max_num_batched_tokens = default_batched_tokens(model.model.embed_tokens.weight.device)
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_num_batched_tokens, self.max_model_len)
        # overlap scheduling: step t+1 is scheduled and launched before step t's sampled tokens reach the host, so
        # the host's work (detokenising, stop checks, scheduling, the next step's inputs) runs while the GPU
        # computes. Default: on for CUDA without speculative decoding (drafting needs the tokens on the host)
        device = model.model.embed_tokens.weight.device
        if overlap is None:
            overlap = device.type == "cuda" and not speculative_tokens
        if overlap and speculative_tokens:
            raise ValueError("overlap scheduling does not combine with speculative decoding (MTP drafting needs "
                             "the last sampled token on the host): pass overlap=False or speculative_tokens=0")
        self.overlap = bool(overlap)
        self._in_flight: SampledStep | None = None     # the last step's sampled tokens, on their way to the host
        self._sampling_cache = None                     # the last batch's sampling settings (_sampling_tensors)
        # cuda_graphs: on CUDA, pure decode steps replay a CUDA graph per batch-size bucket (graphs.py), and a
        # prompt's first chunk of up to prefill_graph_tokens tokens (alone or beside decoding sequences) one per
        # token bucket (prefill_graphs.py; 0 = never); QWEN3NEXT_CUDA_GRAPHS=0 also switches them off
        if prefill_graph_tokens < 0:
            raise ValueError(f"prefill_graph_tokens must be >= 0, got {prefill_graph_tokens}")
        self.runner = ModelRunner(model, max_num_seqs, num_kv_pages, page_size, include_mtp=speculative_tokens > 0,
                                  max_model_len=self.max_model_len, cuda_graphs=cuda_graphs,
                                  prefill_graph_tokens=min(prefill_graph_tokens, max_num_batched_tokens),
                                  overlap=self.overlap)
        self.speculator = None
        if speculative_tokens < 0:
            raise ValueError(f"speculative_tokens must be >= 0, got {speculative_tokens}")
        if speculative_tokens:
            from .speculative import Speculator
            # on a GPU with graphs: MTP drafting and verification as CUDA graphs per batch-size bucket, up to the
            # batch size at which drafting stops (graphs.py, draft_graphs.py)
            drafts = self.runner.speculation_graphs(speculative_tokens,
                                                    min(max_num_seqs, speculative_disable_batch_size - 1))
            self.speculator = Speculator(model, self.runner.cache, speculative_tokens, page_size,
                                         speculative_disable_batch_size, speculative_adaptive, graphs=drafts)
            self.scheduler.on_preempt = self.speculator.forget
            if self.runner.device.type == "cuda" and drafts is None:
                log.warning("speculative decoding on a GPU without CUDA graphs: drafting and verification run "
                            "eagerly, which is slower than plain decoding at small batches (README, Benchmarks); "
                            "the adaptive policy switches drafting off where it measures a loss")
        # warm_up: on CUDA, compile the prefill kernels and capture the one-sequence decode graph now, not inside
        # the first requests (runner.warm_up)
        self.warm_up_s = self.runner.warm_up() if warm_up else 0.0
        self.generator = torch.Generator(device=self.runner.device).manual_seed(seed)
        self.generation_config = generation_config or {}
        gen_eos = self.generation_config.get("eos_token_id")
        eos = set(cfg.eos_token_ids) | set(gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos])
        if tokenizer is not None:
            eos |= set(tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)
        self.requests: dict[str, Sequence] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------------------------------
    def default_sampling_params(self) -> SamplingParams:
        if self.generation_config:
            return SamplingParams.from_generation_config(self.generation_config)
        return SamplingParams()

    def add_request(self, prompt: str | dict | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise ValueError("the prompt is empty: it must contain at least one token")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, but this engine's context is {self.max_model_len} "
                             f"tokens (prompt + at least one generated token must fit)")
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, text, ids, params)
        if params.seed is not None:
            seq.generator = make_generator(params.seed, self.runner.device)
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            seq.stop_checker = StopChecker(params.stop, params.include_stop_str_in_output)
        if params.logprobs is not None:
            seq.logprobs = []
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        self.stats.prompt_tokens += len(ids)
        return request_id

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                    raise ValueError("prompt_token_ids must be a list of ints")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt is a string, a list of token ids or a dict, got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer (skip_tokenizer_init): pass {'prompt_token_ids': [...]}")
        return prompt, self.tokenizer.encode(prompt)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self._finish(seq, "abort")
        return seq.to_output()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ---- one step -------------------------------------------------------------------------------------------------
    def _plan_drafts(self) -> None:
        spec = self.speculator
        decoding = [s for s in self.scheduler.running if s.num_tokens - s.num_computed == 1]
        k = spec.drafts_for(len(decoding)) if decoding else 0
        for s in self.scheduler.running:
            ok = k and s.num_tokens - s.num_computed == 1 and spec.eligible(s)
            s.spec_k = max(0, min(k, self.max_model_len - s.num_tokens)) if ok else 0

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; returns the requests that gained tokens or finished.

        Under overlap scheduling the tokens a step samples reach the host during the next call: this call launches
        its own batch first (its input tokens, where the host does not know them yet, are read from the device),
        and only then waits for the previous step's tokens, which the GPU finished before starting this batch."""
        spec = self.speculator
        started = time.perf_counter()
        done: list[Sequence] = []
        in_flight, self._in_flight = self._in_flight, None
        if spec is not None:
            self._plan_drafts()
        batch = self.scheduler.schedule()
        try:
            sampled, pure_decode, verified = self._run(batch, done) if batch else (None, False, False)
        finally:   # (also when this step failed: the earlier tokens are real, and no sequence may stay pending)
            if in_flight is not None:
                done[:0] = self._resolve(in_flight)   # older tokens first
        if sampled is not None:
            if self.overlap:
                self._in_flight = sampled
            else:
                done += self._resolve(sampled)
        if spec is not None and pure_decode:
            if spec.policy.adaptive and self.runner.device.type == "cuda":   # the step's queued GPU work (the
                # commit graph) is part of its cost
                torch.cuda.current_stream(self.runner.device).synchronize()
            spec.policy.observe(len(batch.seqs), verified, sum(len(s.delta_token_ids) for s in batch.seqs),
                                time.perf_counter() - started)
        return self._outputs(done)

    def _run(self, batch, done: list[Sequence]) -> tuple[SampledStep | None, bool, bool]:
        """Launch one batch: drafts, the forward, verification (appends to `done`), and the sampling of the
        sequences that need a new token. Returns that sampling (its tokens still on the device), whether the step
        was a pure decode step and whether it verified drafts (what the speculation policy learns from)."""
        spec = self.speculator
        if spec is not None:
            drafting = [s for s in batch.seqs if s.spec_k > 0]
            if drafting:
                spec.draft(drafting, self.generator)
        logits, row_of, hidden = self.runner.forward(batch)
        # a pure decode step (every sequence: its one new token, plus drafts): what the speculation policy
        # learns from (prefill chunks in the step would blur the comparison)
        pure_decode = spec is not None and all(n == 1 + (len(s.draft_tokens) if s.spec_k and s.draft_tokens else 0)
                                               for s, n in zip(batch.seqs, batch.num_tokens))
        rows, verified, offset = [], [], 0
        for i, (s, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            if s.spec_k and s.draft_tokens:
                verified.append((i, s, offset))
            else:
                s.num_computed += n
                if spec is not None:
                    spec.record(s, hidden[offset:offset + n])
                if i in row_of:
                    rows.append(i)
            offset += n
        if verified:
            self._verify(verified, logits, row_of, hidden)
            done += [s for _, s, _ in verified]
        sampled = self._sample([batch.seqs[i] for i in rows], _rows(logits, [row_of[i].start for i in rows])) \
            if rows else None
        return sampled, pure_decode, bool(verified)

    def _outputs(self, done: list[Sequence]) -> list[RequestOutput]:
        """One output per request that gained tokens or finished, unless it wants only its final one (its deltas
        then start afresh)."""
        outputs, seen = [], set()
        for s in done:
            if id(s) in seen:
                continue
            seen.add(id(s))
            if s.is_finished or (s.delta_token_ids and s.params.output_kind != "final_only"):
                outputs.append(s.to_output())
            if s.delta_token_ids or s.is_finished:
                s.delta_text, s.delta_token_ids = "", []
            if s.is_finished:
                self.requests.pop(s.request_id, None)
        return outputs

    def _verify(self, verified, logits, row_of, hidden) -> None:
        """Accept drafts; commit each sequence's GDN state after its last kept token."""
        spec = self.speculator
        accepted = spec.accept([(s, logits[row_of[i]]) for i, s, _ in verified], self.generator)
        self.runner.commit_drafts([(i, s.slot, len(toks) - 1) for (i, s, _), toks in zip(verified, accepted)])
        now = time.monotonic()
        for (i, s, off), toks in zip(verified, accepted):
            s.num_computed += len(toks)
            spec.record(s, hidden[off:off + len(toks)])
            for t in toks:
                self._append(s, t, 0.0, [], [], now)
                if s.is_finished:
                    break
            if not s.is_finished:
                self.cache.trim(s)          # pages that only held rejected drafts
        if spec.stats.verify_steps // 500 != (spec.stats.verify_steps - len(verified)) // 500:
            log.info("speculative decoding: %s", spec.stats.as_dict())
        for _, s, _ in verified:
            s.spec_k, s.draft_tokens = 0, []

    def _sample(self, seqs: list[Sequence], logits) -> SampledStep:
        """One new token for each sequence whose last token was just computed, sampled on the device; each
        sequence counts it as pending until `_resolve`."""
        out = sample(logits, self._sampling_tensors(seqs, logits))
        if self.runner.sampled is not None:    # the next step's input tokens, where the host does not know them
            self.runner.sampled[:len(seqs)].copy_(out.token_ids)
        for j, s in enumerate(seqs):
            s.num_pending += 1
            s.pending_row = j
        return SampledStep(seqs, out)

    def _sampling_tensors(self, seqs: list[Sequence], logits) -> SamplingTensors:
        """The batch's sampling settings on the device. A decode batch is usually the same requests step after
        step: their settings are reused then (built anew, ~0.1 ms of host time, only when the requests change or
        a row's settings depend on its output so far: penalties, a min_tokens ban)."""
        params = [s.params for s in seqs]
        generators = [s.generator for s in seqs]
        with_logprobs = any(s.logprobs is not None for s in seqs)
        fixed = not any(p.uses_output_history or len(s.output_token_ids) + s.num_pending < p.min_tokens
                        for s, p in zip(seqs, params))
        cached = self._sampling_cache
        if (fixed and cached is not None and cached[0] == (with_logprobs, logits.shape[-1])
                and len(cached[1]) == len(seqs) and all(a is b for a, b in zip(cached[1], params))
                and all(a is b for a, b in zip(cached[2], generators))):
            return cached[3]
        st = SamplingTensors.from_params(params, [s.output_token_ids for s in seqs],
                                         [s.prompt_token_ids for s in seqs], generators,
                                         logits.device, logits.shape[-1], shared_generator=self.generator,
                                         eos_token_ids=sorted(self.eos_token_ids),
                                         pending=[s.num_pending for s in seqs], pending_ids=self._pending_ids(seqs),
                                         with_logprobs=with_logprobs)
        # (the cache holds the params and generators themselves, so their identities cannot be reused)
        self._sampling_cache = ((with_logprobs, logits.shape[-1]), params, generators, st) if fixed else None
        return st

    def _pending_ids(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """The device's copy of each sequence's pending token (0 where none), for the penalties to count."""
        if not any(s.num_pending for s in seqs) or not any(s.params.uses_output_history for s in seqs):
            return None
        rows = to_device([s.pending_row if s.num_pending else 0 for s in seqs], torch.long, self.runner.device)
        return self.runner.sampled[rows]

    def _resolve(self, step: SampledStep) -> list[Sequence]:
        """Append a sampled step's tokens (waiting for them to reach the host): detokenise, check stops, finish.
        A sequence that finished in the meantime (aborted, or ended by an earlier token while this step ran)
        drops its token. Returns the sequences that took one."""
        toks, lps, top_ids, top_lps = step.to_host()
        now = time.monotonic()
        took = []
        for j, s in enumerate(step.seqs):
            if s.is_finished:
                continue
            s.num_pending -= 1
            self._append(s, toks[j], lps[j], top_ids[j], top_lps[j], now)
            took.append(s)
        return took

    def _append(self, s: Sequence, tok: int, lp: float, top_ids, top_lps, now: float) -> None:
        p = s.params
        if s.first_token_time is None:
            s.first_token_time = now
            self.stats.ttft.append(now - s.arrival_time)
        s.output_token_ids.append(tok)     # (after the known tokens; tokens still pending follow it)
        s.delta_token_ids.append(tok)
        self.stats.generation_tokens += 1
        if s.logprobs is not None:
            entry = {tok: lp}
            for i, l in zip(top_ids[:p.logprobs], top_lps[:p.logprobs]):
                entry.setdefault(i, l)
            s.logprobs.append(entry)
            s.cumulative_logprob += lp
        n_out = len(s.output_token_ids)
        finish = stop_reason = None
        if not p.ignore_eos and tok in self.eos_token_ids and n_out >= p.min_tokens:
            finish = "stop"
        elif tok in p.stop_token_ids and n_out >= p.min_tokens:
            finish, stop_reason = "stop", tok
        if s.detokenizer is not None:
            if finish is None:
                delta = s.detokenizer.add(tok)
                emit, stopped, matched = s.stop_checker.feed(delta)
                s.text += emit
                s.delta_text += emit
                if stopped and n_out >= p.min_tokens:
                    finish, stop_reason = "stop", matched
        if finish is None and p.max_tokens is not None and n_out >= p.max_tokens:
            finish = "length"
        if finish is None and s.num_known >= self.max_model_len:
            finish = "length"
        if finish is not None:
            s.stop_reason = stop_reason
            self._finish(s, finish)

    def _finish(self, s: Sequence, reason: str) -> None:
        if s.is_finished:
            return
        if s.detokenizer is not None and not s.stop_checker.stopped:
            # release what was held back: bytes of an unfinished character, a possible stop-string prefix
            emit, stopped, _ = s.stop_checker.feed(s.detokenizer.flush())
            if not stopped:
                emit += s.stop_checker.flush()
            s.text += emit
            s.delta_text += emit
        s.finish_reason = reason
        s.num_pending, s.pending_row = 0, None     # tokens still on the device are dropped
        s.finish_time = time.monotonic()
        if len(s.output_token_ids) > 1 and s.first_token_time is not None:
            self.stats.tpot.append((s.finish_time - s.first_token_time) / (len(s.output_token_ids) - 1))
        self.stats.finished_requests += 1
        self.scheduler.finish(s)
        if self.speculator is not None:
            self.speculator.forget(s)

    # ---- introspection --------------------------------------------------------------------------------------------
    def speculative_stats(self) -> dict | None:
        if self.speculator is None:
            return None
        return {**self.speculator.stats.as_dict(), "policy": self.speculator.policy.as_dict()}

    def usage(self) -> dict:
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "slots_used": self.cache.slots_used, "slots_total": self.cache.num_slots,
                "pages_used": self.cache.pages_used, "pages_total": self.cache.num_pages,
                "preemptions": self.scheduler.num_preemptions,
                **({"speculative": self.speculative_stats()} if self.speculator is not None else {}),
                **({"cuda_graphs": self.runner.graph_stats()} if self.runner.graphs is not None else {})}


def _rows(logits: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """logits[starts]: a view where the rows are consecutive (a decode step's), else a gather whose index is
    copied without waiting for the GPU."""
    if starts == list(range(starts[0], starts[0] + len(starts))):
        return logits[starts[0]:starts[0] + len(starts)]
    return logits[to_device(starts, torch.long, logits.device)]


def read_generation_config(path: str | None) -> dict:
    import json
    if not path:
        return {}
    f = os.path.join(path, "generation_config.json")
    if not os.path.exists(f):
        return {}
    with open(f, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from None
