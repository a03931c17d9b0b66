"""Shared pieces of the server tests (this module holds no tests).

- `tiny_checkpoint()`: a random Qwen3-Next small enough for CPU, with the real Qwen vocabulary so text works;
  written once per test session.
- `ScriptedEngine`: an AsyncEngine stand-in that "generates" a text chosen by the test, token by token, so the
  reasoning and tool-call paths can be checked exactly (a random model never writes a valid tool call).
- `serve(target, **create_app_kwargs)`: a real uvicorn server on 127.0.0.1 and a free port, in a thread.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import shutil
import tempfile
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the server dependencies are not installed")
pytest.importorskip("uvicorn", reason="the server dependencies are not installed")

from qwen3next import LLM, ModelConfig, random_model, save_model
from qwen3next.engine.sequence import CompletionOutput, RequestOutput
from qwen3next.server import ServerThread, create_app
from qwen3next.tokenizer import IncrementalDetokenizer, load_tokenizer

MODEL_NAME = "tiny-qwen3next"
CFG = ModelConfig(vocab_size=151936, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                  linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=16, shared_expert_intermediate_size=16, num_nextn_predict_layers=0)


@functools.lru_cache(maxsize=None)
def tiny_checkpoint() -> str:
    path = tempfile.mkdtemp(prefix="qwen3next_server_ck_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    model = random_model(CFG, seed=5)
    with torch.no_grad():        # favour the first 1000 ids (mostly ASCII pieces) so outputs are readable-ish
        model.lm_head.weight[:, 1000:].mul_(0.2)
    save_model(model, path)
    return path


def tiny_llm(**engine_args) -> LLM:
    """A fresh LLM on the tiny checkpoint (each server needs its own: the server's worker owns the engine)."""
    engine_args.setdefault("max_model_len", 256)
    return LLM(tiny_checkpoint(), device="cpu", **engine_args)


@contextlib.contextmanager
def serve(target, **app_kwargs):
    app_kwargs.setdefault("served_model_name", MODEL_NAME)
    app = create_app(target, **app_kwargs)
    with ServerThread(app) as srv:
        srv.app = app
        yield srv


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll `predicate` until it is truthy; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def engine_idle(llm: LLM) -> bool:
    u = llm.engine.usage()
    return u["running"] == 0 and u["waiting"] == 0 and u["slots_used"] == 0 and u["pages_used"] == 0


class ScriptedEngine:
    """Answers every request with `reply(prompt_text)`, one token per step; records prompts and aborts."""

    def __init__(self, reply, step_delay: float = 0.0):
        self.tokenizer = load_tokenizer()
        self.reply = reply
        self.step_delay = step_delay
        self.prompts: list[str] = []
        self.aborted: list[str] = []

    async def generate(self, prompt, params, request_id):
        text = prompt["prompt"] if isinstance(prompt, dict) else prompt
        prompt_ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else self.tokenizer.encode(prompt)
        self.prompts.append(text)
        ids = self.tokenizer.encode(self.reply(text))
        if params.max_tokens is not None:
            ids = ids[:params.max_tokens]
        detok = IncrementalDetokenizer(self.tokenizer)
        done_text = ""
        for i, tok in enumerate(ids):
            last = i == len(ids) - 1
            delta = detok.add(tok) + (detok.flush() if last else "")
            done_text += delta
            finish = ("stop" if len(ids) < (params.max_tokens or 1 << 30) else "length") if last else None
            comp = CompletionOutput(0, done_text, ids[:i + 1], None, None, finish, None, delta, [tok])
            yield RequestOutput(request_id, text, prompt_ids, [comp], last,
                                {"arrival_time": 0.0, "first_token_time": 0.0, "finish_time": 0.0})
            await asyncio.sleep(self.step_delay)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def usage(self) -> dict:
        return {"running": 0, "waiting": 0, "slots_used": 0, "slots_total": 1, "pages_used": 0, "pages_total": 1}
