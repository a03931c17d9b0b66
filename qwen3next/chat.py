"""Qwen3 chat rendering: ChatML messages -> prompt text.

A checkpoint's own Jinja template is untrusted input (it comes from a downloaded
directory), so every template runs in Jinja's immutable sandbox: attribute names
starting with ``_`` are refused, so the usual escapes (``''.__class__.__mro__``,
``cycler.__init__.__globals__``) fail with :class:`ChatTemplateError` instead of
reaching Python internals. The environment otherwise matches what Hugging Face
templates expect (``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, a
``tojson`` that keeps non-ASCII, ``raise_exception``, ``strftime_now``,
``{% generation %}`` blocks), so real checkpoint templates render unchanged.
"""
from __future__ import annotations

import datetime
import functools
import json
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

__all__ = ["QWEN3_CHAT_TEMPLATE", "ChatTemplateError", "render_chat", "normalize_messages"]

ROLES = ("system", "user", "assistant", "tool")

# The built-in template reproduces Qwen3's ChatML conventions:
# - a system turn first (merged with the tool list when tools are given);
# - tool results go back to the model as <tool_response> blocks inside a *user* turn,
#   consecutive tool messages sharing one turn;
# - assistant turns before the last real user query keep only their final answer
#   (reasoning is dropped: the model never sees its old thoughts); turns after it, i.e.
#   the current tool-calling loop, keep their <think> block;
# - enable_thinking=False pre-fills an empty <think></think> so the model answers directly.
QWEN3_CHAT_TEMPLATE = r"""
{%- set has_system = messages[0].role == 'system' %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if has_system %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments '
        'within <tool_call></tool_call> XML tags:\n<tool_call>\n'
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif has_system %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{#- The last user turn that is a real query (not tool results wrapped by a client). #}
{%- set state = namespace(last_query=messages | length - 1) %}
{%- for m in messages %}
    {%- if m.role == 'user' and not (m.content.startswith('<tool_response>') and m.content.endswith('</tool_response>')) %}
        {%- set state.last_query = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for m in messages %}
    {%- set content = m.content if m.content is string else '' %}
    {%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + m.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif m.role == 'assistant' %}
        {%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' %}
        {%- if m.reasoning_content is not string and '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > state.last_query and (loop.last or reasoning) %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {%- for call in m.tool_calls or [] %}
            {%- set fn = call.function if call.function else call %}
            {%- if content or not loop.first %}
                {{- '\n' }}
            {%- endif %}
            {{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' }}
            {{- fn.arguments if fn.arguments is string else (fn.arguments | tojson) }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif m.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
""".strip()


class ChatTemplateError(ValueError):
    """A chat template failed to compile, raised an error itself, or tried an unsafe operation."""


# ---------------------------------------------------------------- message validation

def _content_text(content: Any, where: str) -> str:
    """Content as one string; OpenAI list-of-parts content keeps only text parts, joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise ValueError(f"{where}[{j}]: a content part must be a dict, got {type(part).__name__}")
            kind = part.get("type")
            if kind != "text":
                raise ValueError(f"{where}[{j}]: content part type {kind!r} is not supported (only 'text')")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{where}[{j}]: a 'text' part needs a string 'text' field")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def _check_tool_calls(calls: Any, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise ValueError(f"{where}: tool_calls must be a list, got {type(calls).__name__}")
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where}[{j}]: a tool call needs a function with a non-empty string 'name'")
        args = fn.get("arguments", {})
        if not isinstance(args, (str, dict)):
            raise ValueError(f"{where}[{j}]: arguments must be a JSON string or a dict, got {type(args).__name__}")
    return calls


def normalize_messages(messages: Any) -> list[dict]:
    """Validate chat messages and return copies whose ``content`` is always a string.

    Raises ValueError naming the offending message. The caller's dicts are not modified.
    """
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ValueError(f"{where} must be a dict, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r} (allowed: {', '.join(ROLES)})")
        msg = dict(msg)
        content = msg.get("content")
        if content is None and role == "assistant":
            content = ""  # an assistant turn made only of tool calls
        elif content is None:
            raise ValueError(f"{where}: a {role} message needs content")
        msg["content"] = _content_text(content, f"{where}.content")
        if msg.get("reasoning_content") is not None and not isinstance(msg["reasoning_content"], str):
            raise ValueError(f"{where}.reasoning_content must be a string")
        if msg.get("tool_calls") is not None:
            if role != "assistant":
                raise ValueError(f"{where}: only assistant messages can carry tool_calls, not {role!r}")
            msg["tool_calls"] = _check_tool_calls(msg["tool_calls"], f"{where}.tool_calls")
        out.append(msg)
    return out


# ---------------------------------------------------------------- sandboxed Jinja

class _GenerationBlock(jinja2.ext.Extension):
    """Accept HF's ``{% generation %}…{% endgeneration %}`` (assistant-mask markers) and render the body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str):
    raise ChatTemplateError(f"chat template raised an error: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters and ASCII-fies text; prompts need the raw JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile (line {e.lineno}): {e.message}") from e


def render_chat(
    messages: list[dict],
    template: str | None = None,
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    enable_thinking: bool | None = None,
    bos_token: str | None = None,
    eos_token: str | None = "<|im_end|>",
    **extra: Any,
) -> str:
    """Render ``messages`` with ``template`` (a checkpoint's Jinja text) or the built-in Qwen3 template.

    ``enable_thinking`` is passed to the template only when given, because Qwen3 templates test
    ``enable_thinking is defined``. Token strings that are None are left undefined, as HF does.
    """
    msgs = normalize_messages(messages)
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise ValueError("tools must be a list of dicts (OpenAI function-tool JSON)")
    variables: dict[str, Any] = dict(extra)
    variables.update(messages=msgs, tools=tools or None, add_generation_prompt=add_generation_prompt)
    if enable_thinking is not None:
        variables["enable_thinking"] = enable_thinking
    if bos_token is not None:
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    compiled = _compile(QWEN3_CHAT_TEMPLATE if template is None else template)
    try:
        return compiled.render(**variables)
    except ChatTemplateError:
        raise
    except jinja2.sandbox.SecurityError as e:
        raise ChatTemplateError(f"chat template tried an unsafe operation and was stopped by the sandbox: {e}") from e
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e
    except Exception as e:  # a template bug (TypeError on None + str, ...) is still the template's fault
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
