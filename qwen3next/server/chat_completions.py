"""POST /v1/chat/completions: messages in, an assistant message out (reasoning, content, tool calls).

tool_choice (there is no constrained decoding, so forcing is done by prefilling the assistant turn):
  "none"             tools are left out of the prompt and no tool calls are parsed;
  "auto" (default)   tools are in the prompt; `<tool_call>` blocks in the output become `tool_calls`;
  "required"         as auto, and the answer is prefilled with `<tool_call>\\n`, so the model must write one;
  {"function": ...}  prefilled up to `"arguments": ` for that function; the model writes the arguments.
A forced call the model botches (invalid JSON) comes back as plain content, as any malformed call does.
"""
from __future__ import annotations

import json
import re
import time

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..chat import render_chat
from .chat_output import ChatOutputParser, MessageDelta, prompt_ends_in_reasoning
from .errors import ENGINE_FAILED, APIError, bad_request, error_body
from .logprobs import TokenText, chat_logprobs
from .protocol import ChatCompletionRequest
from .serving import Serving, usage
from .streaming import (ClientDisconnected, SSEResponse, first_and_rest, framed_events, last_item, sse,
                        until_disconnected)

_MESSAGE_PATH = re.compile(r"^(messages\[\d+\](?:[.\w]+|\[\d+\])*)")   # where normalize_messages points

# chat_template_kwargs that would collide with what the server passes to the template itself
_RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
                             "template", "chat_template"}


# ---------------------------------------------------------------- request -> prompt

def _tool_plan(req: ChatCompletionRequest) -> tuple[list[dict] | None, bool, str]:
    """(tools for the template, whether to parse tool calls, text to prefill the answer with)."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if choice == "none":
        return None, False, ""
    if not tools:
        raise bad_request("tool_choice other than 'none' needs a non-empty tools list", "tool_choice")
    if choice == "auto":
        return tools, True, ""
    if choice == "required":
        return tools, True, "<tool_call>\n"
    name = choice.function.name
    if name not in {t["function"]["name"] for t in tools}:
        raise bad_request(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
    return tools, True, '<tool_call>\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '


def _messages(req: ChatCompletionRequest) -> list[dict]:
    out = []
    for m in req.messages:
        d = m.model_dump(exclude_none=True)
        if d["role"] == "developer":         # OpenAI's newer name for the system role
            d["role"] = "system"
        out.append(d)
    return out


def _template_kwargs(req: ChatCompletionRequest) -> tuple[bool | None, dict]:
    kwargs = dict(req.chat_template_kwargs or {})
    clash = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if clash:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(clash)}", "chat_template_kwargs")
    thinking = kwargs.pop("enable_thinking", None)
    if thinking is not None and not isinstance(thinking, bool):
        raise bad_request("chat_template_kwargs.enable_thinking must be true or false",
                          "chat_template_kwargs.enable_thinking")
    return thinking, kwargs


def _render(serving: Serving, messages, tools, thinking, kwargs) -> str:
    tok = serving.client.tokenizer
    try:
        if serving.chat_template is not None:
            return render_chat(messages, serving.chat_template, tools=tools, add_generation_prompt=True,
                               enable_thinking=thinking, bos_token=tok.bos_token, eos_token=tok.eos_token, **kwargs)
        return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, enable_thinking=thinking,
                                       **kwargs)
    except ValueError as e:      # ChatTemplateError is one: an invalid message, or the template refused it
        where = _MESSAGE_PATH.match(str(e))
        raise bad_request(str(e), where.group(1) if where else "messages") from None


# ---------------------------------------------------------------- the route

async def create_chat_completion(serving: Serving, req: ChatCompletionRequest, request: Request) -> Response:
    model = serving.model_for(req.model)
    if req.response_format is not None and req.response_format.type != "text":
        raise bad_request(f"response_format {req.response_format.type!r} is not supported (only 'text')",
                          "response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = serving.sampling_params(req, max_tokens, k)
    tools, parse_tools, prefix = _tool_plan(req)
    thinking, kwargs = _template_kwargs(req)
    messages = _messages(req)

    def prepare():      # in a worker thread: templates and tokenization of a long chat take a while
        text = _render(serving, messages, tools, thinking, kwargs)
        starts_in_reasoning = prompt_ends_in_reasoning(text)
        fill = ("</think>\n\n" + prefix) if prefix and starts_in_reasoning else prefix
        text += fill
        return text, serving.client.tokenizer.encode(text), starts_in_reasoning, fill

    prompt, ids, starts_in_reasoning, prefix = await anyio.to_thread.run_sync(prepare)
    rid, created = serving.new_id("chatcmpl"), int(time.time())
    stream = serving.client.stream({"prompt": prompt, "prompt_token_ids": ids}, params, rid, prompt_param="messages")
    parser = ChatOutputParser(starts_in_reasoning, parse_tools)
    text = TokenText(serving.client.tokenizer) if k is not None else None
    try:
        if not req.stream:
            final = await until_disconnected(request, last_item(stream))
            return JSONResponse(_whole(final, parser, prefix, rid, created, model, k, text))
        _, outputs = await until_disconnected(request, first_and_rest(stream))
    except ClientDisconnected:
        return Response(status_code=499)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return SSEResponse(_events(outputs, parser, prefix, rid, created, model, k, text, include_usage))


def _finish_reason(reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and reason == "stop" else reason


# ---------------------------------------------------------------- whole response

def _whole(out, parser: ChatOutputParser, prefix: str, rid, created, model, k, text) -> dict:
    comp = out.outputs[0]
    if comp.finish_reason == "error":
        raise APIError(500, ENGINE_FAILED, type="server_error")
    reasoning, content, calls = parser.parse(prefix + comp.text)
    message = {"role": "assistant", "content": (content or None) if calls else content,
               "reasoning_content": reasoning or None, "tool_calls": calls}
    logprobs = {"content": chat_logprobs(comp.token_ids, comp.logprobs or [], k, text)} if k is not None else None
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                         "finish_reason": _finish_reason(comp.finish_reason, bool(calls)),
                         "stop_reason": comp.stop_reason}],
            "usage": usage(out)}


# ---------------------------------------------------------------- streamed response

def _delta_json(d: MessageDelta, first_call_index: int) -> dict:
    out: dict = {}
    if d.reasoning:
        out["reasoning_content"] = d.reasoning
    if d.content:
        out["content"] = d.content
    if d.tool_calls:
        out["tool_calls"] = [{"index": first_call_index + i, **call} for i, call in enumerate(d.tool_calls)]
    return out


def _events(outputs, parser: ChatOutputParser, prefix, rid, created, model, k, text, include_usage):
    seen: dict = {}
    return framed_events(_chunks(outputs, parser, prefix, rid, created, model, k, text, include_usage, seen),
                         outputs, seen, "chat.completion.chunk", rid, created, model, include_usage)


async def _chunks(outputs, parser: ChatOutputParser, prefix, rid, created, model, k, text, include_usage, seen):
    def chunk(delta: dict, logprobs=None, finish=None, stop_reason=None):
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = stop_reason
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    calls = 0
    yield chunk({"role": "assistant", "content": ""})
    pending = parser.feed(prefix) if prefix else MessageDelta()     # a prefill is never content on its own
    async for out in outputs:
        seen["out"] = out
        comp = out.outputs[0]
        if comp.finish_reason == "error":
            yield sse(error_body(500, ENGINE_FAILED))
            break
        d = parser.feed(comp.delta_text)
        if out.finished:
            rest = parser.finish()
            d = MessageDelta(d.reasoning + rest.reasoning, d.content + rest.content, d.tool_calls + rest.tool_calls)
        if pending:
            d = MessageDelta(pending.reasoning + d.reasoning, pending.content + d.content,
                             pending.tool_calls + d.tool_calls)
            pending = MessageDelta()
        logprobs = None       # (delta outputs: each holds its step's new tokens only)
        if k is not None and comp.token_ids:
            logprobs = {"content": chat_logprobs(comp.token_ids, comp.logprobs, k, text)}
        if d or logprobs:
            yield chunk(_delta_json(d, calls), logprobs)
            calls += len(d.tool_calls)
        if out.finished:
            yield chunk({}, finish=_finish_reason(comp.finish_reason, calls > 0), stop_reason=comp.stop_reason)
