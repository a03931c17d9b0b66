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


@dataclass(eq=False)     # identity: the scheduler's `in` / `remove` on lists of sequences must not compare fields
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
    # overlap scheduling: tokens sampled on the device whose values the host does not know yet (they follow
    # output_token_ids); the newest of them is row `pending_row` of the runner's sampled-token buffer
    num_pending: int = 0
    pending_row: int | None = None
    # speculative decoding: drafts to verify in this step
    spec_k: int = 0
    draft_tokens: list[int] = field(default_factory=list)
    # what the last step added, for streaming
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Prompt, output and pending tokens: the positions the cache will hold."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_known(self) -> int:
        """Tokens whose values the host knows (all but the pending ones)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end); a pending position reads 0 (the runner fills in the value the
        device sampled: `pending_row`)."""
        n, known = len(self.prompt_token_ids), self.num_known
        ids = self.prompt_token_ids[start:min(end, n)] if start < n else []
        ids = ids + self.output_token_ids[max(start - n, 0):max(min(end, known) - n, 0)]
        return ids + [0] * (end - max(start, known)) if end > known else ids

    def length_reached(self, max_model_len: int) -> bool:
        """The tokens sampled so far (pending ones included) end the request by length: max_tokens or the
        engine's context. Such a sequence is not stepped again while its last tokens are pending."""
        m = self.params.max_tokens
        return (m is not None and len(self.output_token_ids) + self.num_pending >= m) or \
            self.num_tokens >= max_model_len

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def to_output(self) -> RequestOutput:
        """What the request has produced, as its `output_kind` asks: everything so far (copies: the engine appends
        on), or only the last step's part (`delta`)."""
        delta = list(self.delta_token_ids)
        if self.params.output_kind == "delta":
            text, ids = self.delta_text, delta
            logprobs = self.logprobs[len(self.logprobs) - len(delta):] if self.logprobs is not None else None
        else:
            text, ids = self.text, list(self.output_token_ids)
            logprobs = list(self.logprobs) if self.logprobs is not None else None
        comp = CompletionOutput(0, text, ids, self.cumulative_logprob if logprobs is not None else None, logprobs,
                                self.finish_reason, self.stop_reason, self.delta_text, delta)
        metrics = {"arrival_time": self.arrival_time, "first_token_time": self.first_token_time,
                   "finish_time": self.finish_time, "num_preemptions": self.num_preemptions,
                   "num_output_tokens": len(self.output_token_ids)}
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, [comp], self.is_finished, metrics,
                             self.error)
