"""Server-sent events, and noticing a client that hung up before its response started.

Once an SSE response has started, Starlette cancels its body generator when the client disconnects, and the
engine stream's cleanup aborts the request. Before that (a non-streaming request, or a streaming one waiting for
its first token) nothing is listening to the connection, so `until_disconnected` polls for it.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

T = TypeVar("T")

DISCONNECT_POLL_S = 0.25
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientDisconnected(Exception):
    """The client went away before its response started; there is no one to answer."""


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it (and so aborting its generation) if the client disconnects meanwhile."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())   # nothing left unretrieved


async def first_and_rest(stream: AsyncIterator[T]) -> tuple[T, AsyncIterator[T]]:
    """The first item of `stream`, and an iterator over all of it (that first item included)."""
    first = await stream.__anext__()

    async def rest():
        try:
            yield first
            async for item in stream:
                yield item
        finally:
            await stream.aclose()
    return first, rest()


async def last_item(stream: AsyncIterator[T]) -> T:
    last = None
    async for last in stream:
        pass
    return last


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def framed_events(chunks: AsyncIterator[str], outputs, seen: dict, obj: str, rid: str, created: int,
                        model: str, include_usage: bool) -> AsyncIterator[str]:
    """What every streamed endpoint does around its own chunks: the final usage chunk (stream_options), the
    [DONE] line, a clean error event if a bug of ours breaks the stream mid-way, and closing the engine stream
    (which aborts the request if the client left). `seen["out"]` is the last engine output the chunks saw."""
    from .errors import error_body, log   # errors imports fastapi handlers; keep this module import-light
    from .serving import usage
    try:
        async for chunk in chunks:
            yield chunk
        if include_usage and seen.get("out") is not None:
            yield sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                       "usage": usage(seen["out"])})
        yield SSE_DONE
    except Exception:                       # a bug of ours, mid-stream: tell the client, log the details
        log.exception("%s stream %s failed", obj, rid)
        yield sse(error_body(500, "internal server error; see the server log"))
        yield SSE_DONE
    finally:
        await outputs.aclose()


class SSEResponse(StreamingResponse):
    """A StreamingResponse that closes its event generator as soon as the response ends, however it ends.

    Starlette stops iterating when the client disconnects but leaves the generator to the garbage collector;
    closing it here runs the cleanup that aborts the generation (and frees its cache) right away.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, headers=SSE_HEADERS)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
