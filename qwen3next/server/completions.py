"""POST /v1/completions: one prompt (text or token ids) in, one completion out, whole or as SSE chunks."""
from __future__ import annotations

import time

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .errors import ENGINE_FAILED, APIError, bad_request, error_body
from .logprobs import TokenText, completion_logprobs
from .protocol import CompletionRequest
from .serving import Serving, usage
from .streaming import (ClientDisconnected, SSEResponse, first_and_rest, framed_events, last_item, sse,
                        until_disconnected)

DEFAULT_MAX_TOKENS = 16     # OpenAI's default for this endpoint


def _single_prompt(prompt) -> str | list[int]:
    """The API allows a batch of prompts; this server answers one per request."""
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request(f"only one prompt per request is supported, got {len(prompt)}", "prompt")
        return prompt[0]
    return list(prompt)


def _refuse_unsupported(req: CompletionRequest) -> None:
    if req.echo:
        raise bad_request("echo is not supported by this server", "echo")
    if req.suffix:
        raise bad_request("suffix is not supported by this server", "suffix")
    if req.best_of is not None and req.best_of > 1:
        raise bad_request("best_of > 1 is not supported: one completion per request", "best_of")


async def create_completion(serving: Serving, req: CompletionRequest, request: Request) -> Response:
    model = serving.model_for(req.model)
    _refuse_unsupported(req)
    prompt = _single_prompt(req.prompt)
    if isinstance(prompt, str):      # tokenized in a worker thread: a long prompt would stall every stream
        ids = await anyio.to_thread.run_sync(serving.client.tokenizer.encode, prompt)
        prompt = {"prompt": prompt, "prompt_token_ids": ids}
    max_tokens = req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS
    params = serving.sampling_params(req, max_tokens, req.logprobs)
    rid = serving.new_id("cmpl")
    created = int(time.time())
    stream = serving.client.stream(prompt, params, rid)
    text = TokenText(serving.client.tokenizer) if req.logprobs is not None else None
    try:
        if not req.stream:
            final = await until_disconnected(request, last_item(stream))
            return JSONResponse(_whole(final, rid, created, model, req.logprobs, text))
        _, outputs = await until_disconnected(request, first_and_rest(stream))
    except ClientDisconnected:
        return Response(status_code=499)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return SSEResponse(_events(outputs, rid, created, model, req.logprobs, text, include_usage))


def _whole(out, rid, created, model, k, text) -> dict:
    comp = out.outputs[0]
    if comp.finish_reason == "error":
        raise APIError(500, ENGINE_FAILED, type="server_error")
    logprobs = completion_logprobs(comp.token_ids, comp.logprobs or [], k, text) if k is not None else None
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": comp.text, "logprobs": logprobs, "finish_reason": comp.finish_reason,
                         "stop_reason": comp.stop_reason}],
            "usage": usage(out)}


def _events(outputs, rid, created, model, k, text, include_usage):
    seen: dict = {}
    return framed_events(_chunks(outputs, rid, created, model, k, text, include_usage, seen), outputs, seen,
                         "text_completion", rid, created, model, include_usage)


async def _chunks(outputs, rid, created, model, k, text, include_usage, seen):
    def chunk(choice_text, logprobs=None, finish=None, stop_reason=None):
        body = {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": choice_text, "logprobs": logprobs, "finish_reason": finish,
                             "stop_reason": stop_reason}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    offset = 0
    async for out in outputs:      # delta outputs: each holds its step's new tokens only
        seen["out"] = out
        comp = out.outputs[0]
        logprobs = None
        if k is not None and comp.token_ids:
            logprobs = completion_logprobs(comp.token_ids, comp.logprobs, k, text, offset)
            offset += sum(len(t) for t in logprobs["tokens"])
        if comp.finish_reason == "error":
            yield sse(error_body(500, ENGINE_FAILED))
            break
        if comp.delta_text or logprobs or out.finished:
            yield chunk(comp.delta_text, logprobs, comp.finish_reason, comp.stop_reason)
