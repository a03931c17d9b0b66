"""From generated text to an assistant message: reasoning, content and tool calls, whole or streamed.

The text goes through the `<think>` parser first, then its content part through the `<tool_call>` parser. Both
parsers give the same result streamed as whole, so a streamed answer adds up to the non-streamed one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..parsers import ReasoningParser, ToolCallParser


@dataclass
class MessageDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


def prompt_ends_in_reasoning(prompt: str) -> bool:
    """True when the rendered prompt leaves the assistant inside an open `<think>` block (thinking templates)."""
    turn = prompt.rfind("<|im_start|>")
    tail = prompt[turn:] if turn >= 0 else prompt
    return tail.rfind("<think>") > tail.rfind("</think>")


class ChatOutputParser:
    """`feed` each text delta, then `finish` once; or `parse` a whole text. Use one instance per generation."""

    def __init__(self, starts_in_reasoning: bool, parse_tool_calls: bool):
        self.reasoning = ReasoningParser(starts_in_reasoning)
        self.tools = ToolCallParser() if parse_tool_calls else None

    def feed(self, text: str) -> MessageDelta:
        reasoning, content = self.reasoning.feed(text)
        return self._content(reasoning, content, final=False)

    def finish(self) -> MessageDelta:
        reasoning, content = self.reasoning.flush()
        return self._content(reasoning, content, final=True)

    def _content(self, reasoning: str, content: str, final: bool) -> MessageDelta:
        if self.tools is None:
            return MessageDelta(reasoning, content)
        content, calls = self.tools.feed(content)
        if final:
            rest, more = self.tools.flush()
            content, calls = content + rest, calls + more
        return MessageDelta(reasoning, content, calls)

    def parse(self, text: str) -> tuple[str | None, str, list[dict]]:
        """(reasoning or None, content, tool calls) of a whole generation."""
        reasoning, content = self.reasoning.parse(text)
        calls: list[dict] = []
        if self.tools is not None:
            content, calls = self.tools.parse(content)
        return reasoning, content, calls
