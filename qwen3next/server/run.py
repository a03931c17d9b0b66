"""Running the server: `qwen3next serve` (flags and entry point) and `ServerThread` (in-process, for tests).

Nothing here imports FastAPI or uvicorn at module level, so the CLI can add the `serve` flags cheaply.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

API_KEY_ENV = "QWEN3NEXT_API_KEY"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of `qwen3next serve`."""
    from ..engine.flags import add_gpu_engine_flags
    from .engine_client import DEFAULT_MAX_QUEUE
    from .middleware import DEFAULT_MAX_BODY_BYTES
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: ${API_KEY_ENV})")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients send as 'model' (default: the checkpoint directory's name)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--max-model-len", type=int, default=None, help="context length to reserve")
    p.add_argument("--max-num-seqs", type=int, default=16, help="requests decoded together (state slots)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per engine step, i.e. the prefill chunk (default: 8192 on a GPU, 512 on a CPU)")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="memory for the attention KV cache")
    p.add_argument("--speculative-tokens", type=int, default=0,
                   help="MTP speculative decoding: draft K tokens per step (0 = off)")
    add_gpu_engine_flags(p)
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests in flight before new ones get 503 (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"larger request bodies get 413 (default {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file overriding the checkpoint's")
    p.add_argument("--seed", type=int, default=0, help="seed of unseeded sampling")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def serve_main(args: argparse.Namespace) -> int:
    """Entry point of `qwen3next serve`: load the model, then serve until Ctrl-C."""
    from ..engine.llm import LLM
    chat_template = None
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as f:
            chat_template = f.read()
    for flag in ("port", "max_num_seqs", "max_queue", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    engine_args = {k: getattr(args, k) for k in ("max_model_len", "max_num_seqs", "max_num_batched_tokens",
                                                 "kv_cache_gib", "speculative_tokens", "prefill_graph_tokens",
                                                 "overlap")
                   if getattr(args, k) is not None}
    llm = LLM(args.model, device=args.device, dtype=args.dtype, seed=args.seed, cuda_graphs=args.cuda_graphs, warm_up=args.warm_up,
              **engine_args)
    names = args.served_model_name or [os.path.basename(os.path.normpath(llm.model_path)) or "qwen3next"]
    run_server(llm, host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
               served_model_name=names, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
               chat_template=chat_template, log_level=args.log_level)
    return 0


def run_server(llm, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               served_model_name: str | list[str] = "qwen3next", log_level: str = "info", **app_kwargs) -> None:
    """Serve `llm` (LLM, LLMEngine or AsyncEngine) with uvicorn until interrupted. app_kwargs go to create_app."""
    import uvicorn

    from .app import create_app
    app = create_app(llm, served_model_name=served_model_name, api_key=api_key, **app_kwargs)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


class ServerThread:
    """A uvicorn server for `app` on 127.0.0.1 and a free port, in a background thread.

        with ServerThread(app) as srv:
            httpx.get(srv.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", log_level: str = "warning"):
        import uvicorn
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))                 # the kernel picks the port: no race with other test runs
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="uvicorn", daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
