"""Every error leaves the server in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Client mistakes (bad JSON, wrong types, values out of range, unknown routes or models) are 4xx with a message that
names the field. Only a bug of ours becomes a 500, logged with its traceback here and never sent to the client.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("qwen3next.server")

# HTTP status -> OpenAI error type
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               503: "service_unavailable_error"}

# An engine step failed (the engine logged the traceback); the client learns no internals.
ENGINE_FAILED = "the generation failed inside the engine; see the server log"


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "server_error")


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict:
    return {"error": {"message": message, "type": type or ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, **kw) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(status, message, **kw), status_code=status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


_TYPE_NAMES = {"str", "int", "float", "bool", "none", "dict", "list"}


def _is_union_branch(part) -> bool:
    """pydantic names the union member that failed in `loc` ('str', 'list[ContentPart]', 'NamedToolChoice')."""
    return isinstance(part, str) and (part in _TYPE_NAMES or "[" in part or part[:1].isupper())


def _loc_to_param(loc) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'."""
    out = ""
    for p in loc:
        if p == "body" or _is_union_branch(p):
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail})".replace(" ()", ""), None
    param = _loc_to_param(first.get("loc", ()))
    if first.get("type") == "missing" and param is None:
        return "the request needs a JSON object body", None
    # every alternative of a union fails at once: report them together
    same = [e for e in errors if _loc_to_param(e.get("loc", ())) == param]
    msgs = list(dict.fromkeys(str(e.get("msg")) for e in same))
    msg = f"{param or 'request body'}: {'; or '.join(msgs)}"
    others = len({_loc_to_param(e.get("loc", ())) for e in errors} - {param})
    if others:
        msg += f" (and problems with {others} more field{'s' if others > 1 else ''})"
    return msg, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, type=exc.type)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(404, f"no route {request.method} {request.url.path}", code="not_found")
        if exc.status_code == 405:
            resp = error_response(405, f"method {request.method} is not allowed on {request.url.path}",
                                  code="method_not_allowed")
            if exc.headers and "allow" in {k.lower() for k in exc.headers}:
                resp.headers.update(exc.headers)
            return resp
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error; see the server log", type="server_error")
