"""The FastAPI application: routes, middlewares and error handlers put together by `create_app`."""
from __future__ import annotations

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..chat import render_chat
from .chat_completions import create_chat_completion
from .completions import create_completion
from .engine_client import DEFAULT_MAX_QUEUE, EngineClient
from .errors import install_error_handlers
from .metrics import CONTENT_TYPE_LATEST
from .middleware import DEFAULT_MAX_BODY_BYTES, ApiKeyAuth, BodySizeLimit
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                       ErrorResponse, Health, ModelCard, ModelList)
from .serving import Serving

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 503)}
_STREAM_DOC = {"text/event-stream": {"schema": {"type": "string",
                                                "description": "`data: {chunk}` events, then `data: [DONE]`"}}}

DESCRIPTION = """OpenAI-compatible API of a Qwen3-Next model served by `qwen3next`.

With an API key set, `/v1/*` and `/metrics` need `Authorization: Bearer <key>`; `/`, `/health` and the API docs do
not. Errors are `{"error": {"message", "type", "param", "code"}}`."""


def create_app(llm_or_engine, served_model_name: str | list[str] = "qwen3next", api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_queue: int = DEFAULT_MAX_QUEUE,
               chat_template: str | None = None) -> FastAPI:
    """An app serving `llm_or_engine` (an LLM, LLMEngine or AsyncEngine).

    served_model_name: the name(s) clients use as `model`; the first is listed first.
    api_key: when set, required as a Bearer token on /v1/* and /metrics.
    max_body_bytes: larger request bodies get 413. max_queue: requests in flight (queued + running) before 503;
        ignored when an AsyncEngine is given (it has its own). chat_template: Jinja text overriding the checkpoint's.
    Given an LLM or LLMEngine, the app starts the engine's worker thread and stops it on shutdown; the engine must
    then not be used directly at the same time.
    """
    if max_body_bytes < 1 or max_queue < 1:
        raise ValueError(f"max_body_bytes and max_queue must be >= 1, got {max_body_bytes}, {max_queue}")
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"served_model_name must be a non-empty string or list of them, got {served_model_name!r}")
    if getattr(llm_or_engine, "tokenizer", None) is None:
        raise ValueError("the server needs a tokenizer: the engine was made with skip_tokenizer_init")
    if chat_template is not None:        # fail at startup, not on every request
        render_chat([{"role": "user", "content": "hi"}], chat_template)
    client = EngineClient(llm_or_engine, max_queue=max_queue)      # starts the engine's worker thread
    serving = Serving(client, names, chat_template)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        client.shutdown()

    app = FastAPI(title="qwen3next", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.serving = serving
    install_error_handlers(app)
    _add_routes(app, serving)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # added last = runs first: the key is checked before a byte of the body is read
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyAuth, api_key=api_key)
    return app


def _add_routes(app: FastAPI, serving: Serving) -> None:
    client = serving.client

    @app.get("/health", response_model=Health, responses={503: {"model": ErrorResponse}}, tags=["server"])
    async def health():
        """200 while the engine's worker is alive."""
        thread = getattr(client.engine, "_thread", None)
        if thread is not None and not thread.is_alive():
            return JSONResponse({"error": {"message": "the engine worker has stopped", "type": "server_error",
                                           "param": None, "code": "engine_dead"}}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS, tags=["openai"])
    async def list_models():
        return {"object": "list", "data": [ModelCard(id=n, created=serving.created,
                                                     max_model_len=client.max_model_len) for n in serving.model_names]}

    @app.post("/v1/completions", response_model=CompletionResponse, tags=["openai"],
              responses={**_ERRORS, 200: {"content": _STREAM_DOC}})
    async def completions(body: CompletionRequest, request: Request):
        """A completion of one prompt; `stream: true` sends it as server-sent events."""
        return await create_completion(serving, body, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["openai"],
              responses={**_ERRORS, 200: {"content": _STREAM_DOC}})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """The assistant's next message; `stream: true` sends it as server-sent events."""
        return await create_chat_completion(serving, body, request)

    @app.get("/metrics", tags=["server"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    async def metrics():
        """Prometheus text format."""
        return Response(client.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))
