"""Parsers for Qwen3 generations: ``<think>`` reasoning and hermes-style ``<tool_call>`` blocks.

Each parser works on a whole text (``parse``) and on a stream of text fragments (``feed`` then
``flush``). Streaming never leaks part of a tag: a fragment ending in ``</thi`` is held until
the next fragment tells whether it is ``</think>`` or ordinary text. For every way of cutting a
text into fragments, the concatenated stream output equals ``parse`` of the whole text.

Whitespace conventions (the same in both modes):

* reasoning: newlines right after ``<think>`` and right before ``</think>`` are dropped;
  newlines right after ``</think>`` are dropped from the content;
* tool calls: whitespace between the content and a tool call block, and between blocks, is dropped.
"""
from __future__ import annotations

import json
import secrets
from collections.abc import Callable

__all__ = ["ReasoningParser", "ToolCallParser", "new_tool_call_id"]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def _held_tag_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that could be the start of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningParser:
    """Splits a generation into ``reasoning_content`` (inside ``<think>…</think>``) and ``content``.

    With ``starts_in_reasoning=True`` (Qwen3-Thinking: the prompt already ends with ``<think>``)
    the output starts inside the reasoning and only ``</think>`` ends it (a redundant leading
    ``<think>`` is dropped). Otherwise a reasoning block is recognised only at the very start of
    the output (after optional whitespace), so a ``<think>`` mentioned later in an answer stays
    content. Text after ``</think>`` is always content, and an unfinished reasoning (no
    ``</think>`` before the end) is all reasoning.
    """

    def __init__(self, starts_in_reasoning: bool = False):
        self.starts_in_reasoning = starts_in_reasoning
        self._state = "start"
        self._buf = ""
        self.saw_reasoning = starts_in_reasoning

    # ---- whole text
    def parse(self, text: str) -> tuple[str | None, str]:
        """``(reasoning_content, content)``; reasoning is None when the output has no reasoning block."""
        stripped = text.lstrip()
        if stripped.startswith(THINK_OPEN):
            inner = stripped[len(THINK_OPEN):]
        elif self.starts_in_reasoning:
            inner = text
        else:
            return None, text
        reasoning, closed, content = inner.partition(THINK_CLOSE)
        return reasoning.strip("\n"), content.lstrip("\n") if closed else ""

    # ---- streaming
    def feed(self, delta: str) -> tuple[str, str]:
        """Consume a text fragment; returns ``(reasoning_delta, content_delta)`` ready to send."""
        self._buf += delta
        reasoning, content = [], []
        while self._buf:
            state, buf = self._state, self._buf
            if state == "start":
                head = buf.lstrip()
                if head.startswith(THINK_OPEN):
                    self._buf, self._state, self.saw_reasoning = head[len(THINK_OPEN):], "reasoning_start", True
                elif not head or THINK_OPEN.startswith(head):
                    break  # only whitespace or a partial '<think' so far
                else:
                    self._state = "reasoning_start" if self.starts_in_reasoning else "content"
            elif state in ("reasoning_start", "content_start"):
                self._buf = buf.lstrip("\n")
                if self._buf:
                    self._state = state.replace("_start", "")
            elif state == "reasoning":
                end = buf.find(THINK_CLOSE)
                if end >= 0:
                    reasoning.append(buf[:end].rstrip("\n"))
                    self._buf, self._state = buf[end + len(THINK_CLOSE):], "content_start"
                    continue
                # Hold a possible partial '</think>' and the newlines before it (dropped if it closes).
                safe = buf[:len(buf) - _held_tag_prefix(buf, THINK_CLOSE)].rstrip("\n")
                reasoning.append(safe)
                self._buf = buf[len(safe):]
                break
            else:  # content
                content.append(buf)
                self._buf = ""
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """End of stream: release held text (a partial tag was just text after all)."""
        buf, self._buf = self._buf, ""
        if self._state == "start":
            return (buf.strip("\n"), "") if self.starts_in_reasoning else ("", buf)
        if self._state == "reasoning":
            return buf.rstrip("\n"), ""
        return "", ""


def new_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolCallParser:
    """Extracts hermes-style tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

    Each valid block becomes an OpenAI tool call
    ``{"id": "call_…", "type": "function", "function": {"name": str, "arguments": json_str}}``.
    A block whose body is not a JSON object with a string ``name`` (or is never closed) is kept in
    the content verbatim, tags included: a malformed call is the model's text, not an error.
    """

    def __init__(self, id_factory: Callable[[], str] = new_tool_call_id):
        self._new_id = id_factory
        self._in_call = False
        self._buf = ""         # undecided text: a partial '<tool_call>' or an unfinished call body
        self._scan = 0         # where to resume looking for '</tool_call>' in a long call body
        self._held_ws = ""     # content whitespace that is dropped if a tool call follows
        self._after_call = False

    def _to_call(self, body: str) -> dict | None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, dict):
            args = json.dumps(args, ensure_ascii=False)
        elif not isinstance(args, str):
            return None
        return {"id": self._new_id(), "type": "function", "function": {"name": obj["name"], "arguments": args}}

    def _content(self, text: str) -> str:
        """Content text to emit now, keeping trailing whitespace back until we know what follows."""
        if self._after_call:
            text = text.lstrip()
            if not text:
                return ""
            self._after_call = False
        text = self._held_ws + text
        emit = text.rstrip()
        self._held_ws = text[len(emit):]
        return emit

    # ---- whole text
    def parse(self, text: str) -> tuple[str, list[dict]]:
        """``(content, tool_calls)`` for a whole generation."""
        segments, calls, text_so_far, pos = [], [], "", 0
        while True:
            start = text.find(CALL_OPEN, pos)
            end = text.find(CALL_CLOSE, start + len(CALL_OPEN)) if start >= 0 else -1
            if end < 0:  # no further complete block: the rest is content
                segments.append(text_so_far + text[pos:])
                break
            call = self._to_call(text[start + len(CALL_OPEN):end])
            if call is None:
                text_so_far += text[pos:end + len(CALL_CLOSE)]
            else:
                segments.append(text_so_far + text[pos:start])
                calls.append(call)
                text_so_far = ""
            pos = end + len(CALL_CLOSE)
        # Whitespace touching a tool call is dropped; text between calls is stripped on both sides.
        last = len(segments) - 1
        content = "".join(
            (seg.lstrip() if i > 0 else seg).rstrip() if i < last else (seg.lstrip() if i > 0 else seg)
            for i, seg in enumerate(segments)
        )
        return content, calls

    # ---- streaming
    def feed(self, delta: str) -> tuple[str, list[dict]]:
        """Consume a fragment; returns ``(content_delta, tool calls completed by it)``."""
        self._buf += delta
        out, calls = [], []
        while self._buf:
            if self._in_call:
                end = self._buf.find(CALL_CLOSE, self._scan)
                if end < 0:
                    self._scan = max(0, len(self._buf) - len(CALL_CLOSE) + 1)
                    break
                body, self._buf, self._in_call = self._buf[:end], self._buf[end + len(CALL_CLOSE):], False
                call = self._to_call(body)
                if call is None:
                    out.append(self._content(CALL_OPEN + body + CALL_CLOSE))
                else:
                    calls.append(call)
                    self._held_ws, self._after_call = "", True
            else:
                start = self._buf.find(CALL_OPEN)
                if start < 0:
                    keep = _held_tag_prefix(self._buf, CALL_OPEN)
                    out.append(self._content(self._buf[:len(self._buf) - keep]))
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                out.append(self._content(self._buf[:start]))
                self._buf, self._in_call, self._scan = self._buf[start + len(CALL_OPEN):], True, 0
        return "".join(out), calls

    def flush(self) -> tuple[str, list[dict]]:
        """End of stream: an unclosed block or partial tag is content; held whitespace is released."""
        rest = (CALL_OPEN if self._in_call else "") + self._buf
        self._buf, self._in_call = "", False
        text = self._content(rest) + self._held_ws
        self._held_ws = ""
        return text, []
