"""The server's one handle on the engine, whatever `create_app` was given (LLM, LLMEngine or AsyncEngine).

`stream()` is how every route generates: it turns the engine's refusals into HTTP errors (QueueFull -> 503, a
bad prompt -> 400), records metrics, and makes sure a request that is not seen to its end is aborted, so that
its state slot and KV pages are freed whatever way the route stops listening (client gone, server shutdown).
"""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from ..engine.async_engine import AsyncEngine, QueueFull
from ..engine.engine import LLMEngine
from ..engine.sampling_params import SamplingParams
from ..engine.sequence import RequestOutput
from .errors import APIError
from .metrics import ServerMetrics

DEFAULT_MAX_QUEUE = 256


class EngineClient:
    def __init__(self, target, max_queue: int = DEFAULT_MAX_QUEUE):
        given = target
        inner = getattr(target, "engine", None)
        if isinstance(target, LLMEngine):
            target = AsyncEngine(target, max_queue=max_queue)
        elif isinstance(inner, LLMEngine) and not isinstance(target, AsyncEngine):   # an LLM
            target = AsyncEngine(inner, max_queue=max_queue)
        if not all(hasattr(target, a) for a in ("generate", "abort", "usage", "tokenizer")):
            raise TypeError(f"create_app needs an LLM, LLMEngine or AsyncEngine, got {type(given).__name__}")
        self.engine = target                     # AsyncEngine or anything shaped like it (tests use fakes)
        self.owns_engine = target is not given   # we started its worker thread, so we stop it
        self.core = getattr(target, "engine", None)   # the LLMEngine behind it, if any
        self.metrics = ServerMetrics(target.usage, getattr(self.core, "stats", None),
                                     getattr(target, "num_pending", lambda: 0))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int | None:
        return getattr(self.core, "max_model_len", None)

    def sampling_params(self, **given) -> SamplingParams:
        """The checkpoint's generation_config defaults, overridden by what the request set.

        Raises APIError(400) naming the field when the engine refuses a value.
        """
        base = self.core.default_sampling_params() if hasattr(self.core, "default_sampling_params") \
            else SamplingParams()
        try:
            return dataclasses.replace(base, **given)
        except ValueError as e:
            raise _engine_refusal(e, given) from None

    async def stream(self, prompt, params: SamplingParams, request_id: str,
                     prompt_param: str = "prompt") -> AsyncIterator[RequestOutput]:
        """The request's outputs; the last has `finished=True`. Refusals raise APIError before the first one."""
        accepted = finished = first_tokens_seen = False
        gen = self.engine.generate(prompt, params, request_id)
        try:
            try:
                first = await gen.__anext__()
            except QueueFull as e:
                self.metrics.rejected.labels("queue_full").inc()
                raise APIError(503, f"the server is busy: {e}; retry later", code="queue_full") from None
            except StopAsyncIteration:
                return
            except ValueError as e:      # the engine refused the prompt (empty, too long, bad token ids)
                self.metrics.rejected.labels("invalid").inc()
                err = _engine_refusal(e, {})
                if err.param == "prompt":
                    err.param = prompt_param
                raise err from None
            accepted = True
            out = first
            while True:
                has_tokens = bool(out.outputs and out.outputs[0].token_ids)
                self.metrics.observe(out, first=has_tokens and not first_tokens_seen)
                first_tokens_seen = first_tokens_seen or has_tokens
                finished = out.finished
                yield out
                if finished:
                    return
                try:
                    out = await gen.__anext__()
                except StopAsyncIteration:
                    return
        finally:
            if not finished:
                # Idempotent; covers a cancellation at any await above, including before the engine accepted
                # the request (the abort is queued after the add, so it still finds it).
                self.engine.abort(request_id)
                if accepted:
                    self.metrics.finished.labels("abort").inc()
            await gen.aclose()           # the engine stream's own cleanup, now rather than whenever GC runs

    def shutdown(self) -> None:
        if self.owns_engine:
            self.engine.shutdown()


def _engine_refusal(e: ValueError, given: dict) -> APIError:
    """A ValueError of the engine as a 400; `param` is the field it names, when it starts the message."""
    msg = str(e)
    first_word = msg.split(" ", 1)[0]
    param = first_word if first_word in given or first_word in ("prompt", "n", "seed") else None
    if msg.startswith("the prompt"):
        param = "prompt"
    return APIError(400, msg, param=param)
