"""ASGI middlewares that run before any route: the API key check and the request-body size limit.

Both are plain ASGI (not Starlette's BaseHTTPMiddleware), so streamed responses and client disconnects pass
through untouched.
"""
from __future__ import annotations

import hmac
import json

from .errors import error_body

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


async def send_json_error(send, status: int, message: str, code: str | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def is_protected(path: str) -> bool:
    """The API and the metrics need the key; the chat page, its assets, /health and the API docs do not."""
    return path.startswith("/v1/") or path == "/v1" or path == "/metrics"


class ApiKeyAuth:
    """`Authorization: Bearer <key>` on protected routes, compared in constant time."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not is_protected(scope["path"]):
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
                break
        if not given:
            return await send_json_error(send, 401, "missing API key: send 'Authorization: Bearer <key>'",
                                         code="missing_api_key")
        if not hmac.compare_digest(given, self.expected):
            return await send_json_error(send, 401, "invalid API key", code="invalid_api_key")
        return await self.app(scope, receive, send)


class BodySizeLimit:
    """Refuse bodies over `max_bytes` with 413: by Content-Length up front, else while the body streams in.

    The body is read here in full (it is at most `max_bytes`) and replayed to the app; after it, `receive` is the
    server's own again, so the app still sees the client's disconnect.
    """

    def __init__(self, app, max_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int | str) -> str:
        return f"the request body ({size} bytes) is larger than this server's limit of {self.max_bytes} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    return await send_json_error(send, 400, "invalid Content-Length header")
                if int(value) > self.max_bytes:
                    return await send_json_error(send, 413, self._too_large(int(value)), code="request_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await send_json_error(send, 413, self._too_large(f"over {size}"), code="request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
