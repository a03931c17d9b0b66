"""OpenAI-compatible HTTP server for qwen3next: /v1/completions, /v1/chat/completions, /v1/models, /health,
/metrics, and a chat page at /.

    from qwen3next import LLM
    from qwen3next.server import create_app, run_server
    run_server(LLM("path/to/checkpoint"), port=8000)        # or: uvicorn on create_app(llm, "my-model")

`create_app` is imported on first use, so `from qwen3next.server import add_serve_args` stays light.
"""
from __future__ import annotations

from .run import ServerThread, add_serve_args, run_server, serve_main

__all__ = ["ServerThread", "add_serve_args", "create_app", "run_server", "serve_main"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app
        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
