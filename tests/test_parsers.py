"""Reasoning and tool-call parsers: whole text, and streamed fragments of any split."""
import itertools
import json
import random

import pytest

from qwen3next.parsers import ReasoningParser, ToolCallParser
from qwen3next.tokenizer import IncrementalDetokenizer, load_tokenizer

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'


def counter_ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def random_splits(text, rng, count):
    """``count`` random cuts of ``text`` into fragments, plus the two extreme cuts."""
    yield [text]
    yield list(text)
    for _ in range(count):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def stream_reasoning(fragments, starts_in_reasoning=False):
    parser = ReasoningParser(starts_in_reasoning)
    pairs = [parser.feed(f) for f in fragments] + [parser.flush()]
    reasoning = "".join(r for r, _ in pairs)
    return (reasoning if parser.saw_reasoning else None), "".join(c for _, c in pairs), pairs


def stream_tools(fragments):
    parser = ToolCallParser(counter_ids())
    content, calls = [], []
    for f in [*fragments, None]:
        text, done = parser.flush() if f is None else parser.feed(f)
        content.append(text)
        calls.extend(done)
    return "".join(content), calls, content


# ------------------------------------------------------------------ reasoning

@pytest.mark.parametrize("text, starts_in_reasoning, expected", [
    ("<think>\nLet me think.\n\n2+2=4\n</think>\n\nThe answer is 4.", False, ("Let me think.\n\n2+2=4", "The answer is 4.")),
    ("The answer is 4.", False, (None, "The answer is 4.")),
    ("<think>\n\n</think>\n\nDirect answer.", False, ("", "Direct answer.")),
    ("\n<think>cut off by max_tokens", False, ("cut off by max_tokens", "")),
    ("Use the <think> tag like this.", False, (None, "Use the <think> tag like this.")),
    ("<think>a</thinking> is not a close</think>b", False, ("a</thinking> is not a close", "b")),
    ("<think>x</think>y</think>z", False, ("x", "y</think>z")),
    ("<thi", False, (None, "<thi")),
    # Qwen3-Thinking: <think> is in the prompt, the output only closes it.
    ("Reasoning here.\n</think>\n\nFinal.", True, ("Reasoning here.", "Final.")),
    ("<think>\nredundant open\n</think>\n\nFinal.", True, ("redundant open", "Final.")),
    ("still thinking", True, ("still thinking", "")),
    ("</thi", True, ("</thi", "")),
])
def test_reasoning_whole_text(text, starts_in_reasoning, expected):
    assert ReasoningParser(starts_in_reasoning).parse(text) == expected


REASONING_TEXTS = [
    "<think>\nLet me think about 你好 👨‍👩‍👧.\n\nStep </thin 2\n</think>\n\nAnswer: <think> is a tag.\n",
    "  <think>x</think>",
    "\n\n<think>\n\n\n</think>\n\n\n",
    "<thinking> is not a think tag",
    "<think>unterminated\n\n",
    "plain answer </think> with a stray close",
    "</think>\n\nafter close",
    "",
]


@pytest.mark.parametrize("starts_in_reasoning", [False, True])
@pytest.mark.parametrize("text", REASONING_TEXTS)
def test_reasoning_streaming_matches_whole_text(text, starts_in_reasoning):
    expected = ReasoningParser(starts_in_reasoning).parse(text)
    rng = random.Random(len(text))
    for fragments in random_splits(text, rng, 150):
        reasoning, content, _ = stream_reasoning(fragments, starts_in_reasoning)
        assert (reasoning, content) == expected, fragments


def test_reasoning_never_leaks_partial_tags():
    text = "<think>\nabc\n</think>\n\ndef"
    _, _, pairs = stream_reasoning(list(text))
    emitted = [piece for pair in pairs for piece in pair if piece]
    assert "".join(emitted) == "abcdef"
    assert not any(c in piece for piece in emitted for c in "<>/\n")


def test_reasoning_streams_without_waiting_for_the_close():
    parser = ReasoningParser()
    assert parser.feed("<think>\nfirst ") == ("first ", "")
    assert parser.feed("second</th") == ("second", "")
    assert parser.feed("ink>\n\nan") == ("", "an")
    assert parser.feed("swer") == ("", "swer")


# ------------------------------------------------------------------ tool calls

def test_tool_calls_whole_text():
    text = f"I'll check both.\n\n{CALL}\n" + '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>'
    content, calls = ToolCallParser(counter_ids()).parse(text)
    assert content == "I'll check both."
    assert calls == [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}},
    ]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Zürich"}


@pytest.mark.parametrize("text, expected_content, names", [
    ("No tools needed.\n", "No tools needed.\n", []),
    ("<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    ('<tool_call>["a list"]</tool_call>', '<tool_call>["a list"]</tool_call>', []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": "f", "arguments": {}', '<tool_call>{"name": "f", "arguments": {}', []),  # unclosed
    ('<tool_call>{"name": "f"}</tool_call>', "", ["f"]),  # no arguments -> "{}"
    (f"{CALL} and then text", "and then text", ["get_weather"]),
    (f"bad <tool_call>x</tool_call> {CALL}", "bad <tool_call>x</tool_call>", ["get_weather"]),
])
def test_tool_calls_edge_cases(text, expected_content, names):
    content, calls = ToolCallParser().parse(text)
    assert content == expected_content
    assert [c["function"]["name"] for c in calls] == names
    for call in calls:
        assert call["id"].startswith("call_") and len(call["id"]) > 10 and call["type"] == "function"
        json.loads(call["function"]["arguments"])


def test_tool_call_ids_are_unique():
    _, calls = ToolCallParser().parse(CALL * 20)
    assert len({c["id"] for c in calls}) == 20


TOOL_TEXTS = [
    f"Let me look that up 🔎.\n\n{CALL}\n{CALL}",
    f"{CALL}",
    f"  text <tool_call> {{broken</tool_call>  more {CALL}\n\n tail  ",
    "<tool_cal not a tag <tool_call",
    f"<tool_call><tool_call>{CALL}",
    "trailing spaces stay when no call follows   \n",
    "",
]


@pytest.mark.parametrize("text", TOOL_TEXTS)
def test_tool_calls_streaming_matches_whole_text(text):
    expected = ToolCallParser(counter_ids()).parse(text)
    rng = random.Random(len(text))
    for fragments in random_splits(text, rng, 150):
        content, calls, _ = stream_tools(fragments)
        assert (content, calls) == expected, fragments


def test_tool_calls_stream_completed_calls_and_hold_tags():
    parser = ToolCallParser(counter_ids())
    assert parser.feed("Sure. <tool") == ("Sure.", [])
    assert parser.feed("_call>\n{\"name\": \"f\", ") == ("", [])
    content, calls = parser.feed("\"arguments\": {}}\n</tool_call>")
    assert content == "" and [c["function"]["name"] for c in calls] == ["f"]
    assert parser.flush() == ("", [])


# ------------------------------------------------------------------ end to end

def test_token_stream_through_detokenizer_and_both_parsers():
    """Qwen3 output ids -> text deltas -> reasoning/content -> tool calls, as a server streams them."""
    tok = load_tokenizer(None)
    output = f"<think>\n用户想知道苏黎世的天气。\n</think>\n\nJe vérifie 🌦️.\n{CALL}<|im_end|>"
    ids = tok.encode(output)
    assert 151667 in ids and 151657 in ids and ids[-1] == 151645

    detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
    reasoning_parser, tool_parser = ReasoningParser(), ToolCallParser(counter_ids())
    reasoning, content, calls = [], [], []
    for text in [*(detok.add(i) for i in ids), detok.flush()]:
        r, c = reasoning_parser.feed(text)
        reasoning.append(r)
        c, done = tool_parser.feed(c)
        content.append(c)
        calls += done
    r, c = reasoning_parser.flush()
    reasoning.append(r)
    for piece, final in ((c, False), ("", True)):
        c2, done = tool_parser.flush() if final else tool_parser.feed(piece)
        content.append(c2)
        calls += done

    assert "".join(reasoning) == "用户想知道苏黎世的天气。"
    assert "".join(content) == "Je vérifie 🌦️."
    assert calls == [{"id": "call_0", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}]
