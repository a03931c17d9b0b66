"""AsyncEngine: the engine on a background thread, with asyncio streams per request (what the server uses).

The worker thread owns the LLMEngine: requests and aborts reach it through a thread-safe inbox, and each step's
outputs are handed to the waiting coroutines with `call_soon_threadsafe`. A failing step fails only the requests
it touched; the loop goes on. A consumer that stops listening (client disconnected) aborts its request, which
frees its slot and pages.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import traceback
from typing import AsyncIterator

from .engine import LLMEngine
from .sampling_params import SamplingParams
from .sequence import CompletionOutput, RequestOutput

log = logging.getLogger("qwen3next.engine")


class QueueFull(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 503)."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue: int = 1024):
        self.engine = engine
        self.max_queue = max_queue
        self._inbox: list[tuple] = []
        self._cond = threading.Condition()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="qwen3next-engine", daemon=True)
        self._thread.start()

    # ---- public ---------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def num_pending(self) -> int:
        return len(self._streams)

    async def generate(self, prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs for one request; the last one has `finished=True`."""
        if len(self._streams) >= self.max_queue:
            raise QueueFull(f"{len(self._streams)} requests are already queued (limit {self.max_queue})")
        request_id = request_id or f"req-{next(self._ids)}"
        params = params or self.engine.default_sampling_params()
        # validate here, in the caller's context, so a bad request raises to its own caller only
        text, ids = self.engine._prompt_ids(prompt)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, queue)
        accepted = loop.create_future()
        self._post(("add", {"prompt_token_ids": ids, "prompt": text}, params, request_id, loop, accepted))
        try:
            await accepted
        except BaseException:
            self._streams.pop(request_id, None)
            self._post(("abort", request_id))   # the add may already be in: never leave it running unheard
            raise
        finished = False
        try:
            while True:
                out = await queue.get()
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._post(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def usage(self) -> dict:
        return self.engine.usage()

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ---- worker thread --------------------------------------------------------------------------------------------
    def _post(self, item: tuple) -> None:
        with self._cond:
            self._inbox.append(item)
            self._cond.notify()

    def _deliver(self, out: RequestOutput) -> None:
        target = self._streams.get(out.request_id)
        if target is not None:
            loop, queue = target
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:      # the consumer's event loop is gone
                self.engine.abort(out.request_id)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self.engine.has_unfinished() and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                inbox, self._inbox = self._inbox, []
            for item in inbox:
                if item[0] == "add":
                    _, prompt, params, rid, loop, accepted = item
                    try:
                        self.engine.add_request(prompt, params, rid)
                        result = (accepted.set_result, None)
                    except Exception as e:  # noqa: BLE001 - reported to the one caller
                        result = (accepted.set_exception, e)
                    try:
                        loop.call_soon_threadsafe(lambda f=result[0], v=result[1]: f(v) if not accepted.done() else None)
                    except RuntimeError:
                        self.engine.abort(rid)
                else:
                    out = self.engine.abort(item[1])
                    if out is not None:
                        self._deliver(out)      # a consumer still listening sees its request end
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - one bad step must not take the server down
                log.error("engine step failed: %s\n%s", e, traceback.format_exc())
                outputs = self._fail_running(f"internal error: {type(e).__name__}: {e}")
            for out in outputs:
                self._deliver(out)

    def _fail_running(self, message: str) -> list[RequestOutput]:
        outs = []
        for seq in list(self.engine.scheduler.running):
            self.engine.abort(seq.request_id)
            outs.append(RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids,
                                      [CompletionOutput(0, seq.text, list(seq.output_token_ids), None, None,
                                                        "error")], True, None, message))
        return outs
