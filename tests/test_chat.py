"""Qwen3 ChatML rendering: exact prompts for the documented cases, validation, sandbox."""
import pytest

from qwen3next.chat import QWEN3_CHAT_TEMPLATE, ChatTemplateError, normalize_messages, render_chat

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo d'une ville",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Météo d\'une ville", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)


def test_system_user_generation_prompt():
    msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi 你好"}]
    assert render_chat(msgs) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi 你好<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_chat(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi 你好<|im_end|>\n"
    )


def test_enable_thinking():
    msgs = [{"role": "user", "content": "2+2?"}]
    base = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(msgs) == base
    assert render_chat(msgs, enable_thinking=True) == base
    assert render_chat(msgs, enable_thinking=False) == base + "<think>\n\n</think>\n\n"


def test_multi_turn_drops_past_reasoning():
    msgs = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "thoughts 1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>\nthoughts 2\n</think>\n\nA2"},
        {"role": "user", "content": "Q3"},
    ]
    assert render_chat(msgs) == (
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n"
        "<|im_start|>user\nQ3<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tools_with_and_without_system():
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    tail = "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(msgs, tools=[WEATHER_TOOL]) == "<|im_start|>system\n" + TOOLS_HEADER + tail
    with_system = [{"role": "system", "content": "Be brief."}] + msgs
    assert render_chat(with_system, tools=[WEATHER_TOOL]) == "<|im_start|>system\nBe brief.\n\n" + TOOLS_HEADER + tail


def test_tool_calls_and_grouped_tool_responses():
    msgs = [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": "", "reasoning_content": "Two cities: two calls.", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        ]},
        {"role": "tool", "tool_call_id": "a", "content": "18°C"},
        {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "9°C"}]},
    ]
    assert render_chat(msgs, tools=[WEATHER_TOOL]) == (
        "<|im_start|>system\n" + TOOLS_HEADER
        + "<|im_start|>user\nWeather in Paris and Oslo?<|im_end|>\n"
        # After the last user query the reasoning of the ongoing tool loop is kept.
        "<|im_start|>assistant\n<think>\nTwo cities: two calls.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18°C\n</tool_response>\n<tool_response>\n9°C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_tool_call_after_text_and_content_none():
    msgs = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "g", "arguments": {"x": 1}}}]},
    ]
    out = render_chat(msgs, add_generation_prompt=False)
    assert out == (
        "<|im_start|>user\ngo<|im_end|>\n"
        '<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n"
        '<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n{"name": "g", "arguments": {"x": 1}}\n'
        "</tool_call><|im_end|>\n"
    )


def test_list_of_text_parts_is_joined():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render_chat(msgs, add_generation_prompt=False) == "<|im_start|>user\na\nb<|im_end|>\n"


def test_caller_messages_are_not_modified():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}]}]
    render_chat(msgs)
    assert msgs == [{"role": "user", "content": [{"type": "text", "text": "a"}]}]


@pytest.mark.parametrize("messages, match", [
    ("hello", "must be a list"),
    ([], "empty"),
    (["hi"], r"messages\[0\] must be a dict"),
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"content": "x"}], "unknown role None"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\.content: .*got int"),
    ([{"role": "user"}], "needs content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "'image_url' is not supported"),
    ([{"role": "user", "content": [{"type": "text"}]}], "string 'text'"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}],
     r"messages\[1\]\.tool_calls\[0\]"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "only assistant"),
])
def test_validation_errors(messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(messages)


def test_tools_must_be_dicts():
    with pytest.raises(ValueError, match="tools must be a list"):
        render_chat([{"role": "user", "content": "x"}], tools=["get_weather"])


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__['__builtins__'] }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__['open']('/etc/passwd').read() }}",
    "{% set x = messages.append({'role': 'user'}) %}",  # immutable sandbox: no mutation of inputs
])
def test_sandbox_blocks_escapes(template):
    with pytest.raises(ChatTemplateError, match="unsafe operation"):
        render_chat([{"role": "user", "content": "x"}], template)


def test_template_errors_are_clear():
    with pytest.raises(ChatTemplateError, match="raised an error: no system allowed"):
        render_chat([{"role": "user", "content": "x"}], "{{ raise_exception('no system allowed') }}")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat([{"role": "user", "content": "x"}], "{% if %}")
    with pytest.raises(ChatTemplateError, match="failed"):
        render_chat([{"role": "user", "content": "x"}], "{{ messages[0].content + 1 }}")


def test_hf_environment_features():
    template = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}\n{% endfor %}{{ bos_token is defined }}|{{ eos_token }}"
    )
    out = render_chat([{"role": "user", "content": "héllo <b>"}, {"role": "user", "content": "x"}], template)
    # tojson keeps non-ASCII and HTML characters; trim_blocks eats the newline after a block tag.
    assert out == '{"role": "user", "content": "héllo <b>"}False|<|im_end|>'


def test_extra_variables_and_undefined_thinking():
    template = "{{ enable_thinking is defined }} {{ date }}"
    assert render_chat([{"role": "user", "content": "x"}], template, date="today") == "False today"
    assert render_chat([{"role": "user", "content": "x"}], template, enable_thinking=False, date="d") == "True d"


def test_normalize_messages_flattens_content():
    msgs = normalize_messages([{"role": "assistant", "content": None, "tool_calls": []}])
    assert msgs[0]["content"] == ""


def test_builtin_template_is_exported():
    assert QWEN3_CHAT_TEMPLATE.startswith("{%-") and "<tool_response>" in QWEN3_CHAT_TEMPLATE
