"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget. Running sequences go first (a decode costs 1 token, an unfinished prefill takes the
next chunk of its prompt), then waiting sequences are admitted in arrival order while slots, pages and budget last.
Long prompts are thus prefilled in chunks interleaved with other sequences' decode steps. When KV pages run out
for a running sequence, the most recently admitted one is preempted: its slot and pages are freed and it will be
recomputed from its prompt + output so far (a recurrent state cannot be partially kept, so recompute is the rule).
Under overlap scheduling a sequence's last sampled token may still be on the device (`Sequence.num_pending`): it
is scheduled like a known token, unless the tokens sampled so far already end the request by length.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .cache import CacheManager
from .sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]                        # new tokens of each sequence in this step

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int | None = None):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.cache = cache
        self.max_num_seqs = min(max_num_seqs, cache.num_slots)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len if max_model_len is not None else cache.num_pages * cache.page_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.on_preempt = None                   # callback (the speculator forgets a preempted sequence)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Release everything `seq` holds (finished or aborted)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.free(seq)
        seq.status = Status.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.spec_k = 0
        if self.on_preempt is not None:
            self.on_preempt(seq)
        self.cache.free(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        # 1. running sequences, oldest first
        for seq in list(self.running):
            if seq not in self.running:          # preempted below to make room for an older sequence
                continue
            if seq.num_pending and seq.length_reached(self.max_model_len):
                continue                         # overlap scheduling: its last sampled token ends it
            remaining = seq.num_tokens - seq.num_computed
            # a decoding sequence with drafts verifies them in the same step: 1 + spec_k tokens
            n = min(remaining + (seq.spec_k if remaining == 1 else 0), budget)
            if n <= 0:
                break
            seq.spec_k = n - 1 if remaining == 1 else 0
            while not self.cache.can_allocate(seq, n):
                victims = [s for s in self.running if s is not seq and s not in batch.seqs]
                self._preempt(victims[-1] if victims else seq)
                if not victims:
                    break
            if seq.status != Status.RUNNING:
                continue
            self.cache.allocate(seq, n)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        # 2. admit waiting sequences while there is room; never preempt to admit
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.cache.can_allocate(seq, n):
                break
            self.waiting.popleft()
            seq.spec_k = 0
            self.cache.allocate(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        return batch
