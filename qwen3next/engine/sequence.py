"""A request as the engine tracks it, and the outputs it hands back (vLLM's names, so users feel at home)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .sampling_params import SamplingParams
from .stop import StopChecker


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class CompletionOutput:
    index: int
    text: str                                    # everything generated so far
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None      # per generated token: {token id: raw logprob}, sampled + top-k
    finish_reason: str | None = None             # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None         # the stop token id or stop string that ended it
    delta_text: str = ""                         # what this step added (for streaming)
    delta_token_ids: list[int] = field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict | None = None                  # arrival / first token / finish times, preemptions
    error: str | None = None


@dataclass
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0            # tokens whose KV / recurrent state is in the cache
    slot: int | None = None          # Gated DeltaNet state slot
    pages: list[int] = field(default_factory=list)   # KV pages, in position order
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    detokenizer: object | None = None
    stop_checker: StopChecker | None = None
    text: str = ""
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    error: str | None = None
    # speculative decoding: drafts to verify in this step
    spec_k: int = 0
    draft_tokens: list[int] = field(default_factory=list)
    # what the last step added, for streaming
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids[start:] if start < n else []) + self.output_token_ids[max(start - n, 0):end - n]

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def to_output(self) -> RequestOutput:
        logprobs = list(self.logprobs) if self.logprobs is not None else None   # a copy: the engine appends on
        comp = CompletionOutput(0, self.text, list(self.output_token_ids),
                                self.cumulative_logprob if logprobs is not None else None, logprobs,
                                self.finish_reason, self.stop_reason, self.delta_text, list(self.delta_token_ids))
        metrics = {"arrival_time": self.arrival_time, "first_token_time": self.first_token_time,
                   "finish_time": self.finish_time, "num_preemptions": self.num_preemptions}
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, [comp], self.is_finished, metrics,
                             self.error)
