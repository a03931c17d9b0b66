"""The OpenAI-compatible server through the official `openai` client and raw HTTP, against a real uvicorn server.

The model is a tiny random checkpoint (greedy outputs are deterministic); the reasoning / tool-call tests use a
scripted engine whose output the test chooses.
"""
import json
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from test_server_fixtures import MODEL_NAME, ScriptedEngine, engine_idle, serve, tiny_llm, wait_until

KEY = "test-key-123"
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def llm():
    return tiny_llm(max_num_seqs=4)


@pytest.fixture(scope="module")
def server(llm):
    with serve(llm, api_key=KEY, max_body_bytes=MAX_BODY) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)
    return httpx.post(server.url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                      timeout=60, **kw)


def assert_openai_error(r: httpx.Response, status: int, param=None, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and "Traceback" not in r.text
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})


# ---------------------------------------------------------------- happy paths

def test_models_list(client, llm):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].model_extra["max_model_len"] == llm.engine.max_model_len


def test_completion_plain_and_streamed_agree(client, llm):
    whole = client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", **GREEDY)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens == len(llm.tokenizer.encode("The quick brown fox"))
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_a_request_not_streamed_gets_only_its_final_output(client, llm):
    """The engine builds no per-step outputs for it (output_kind final_only); a streamed one gets one per step,
    each holding only that step's tokens (delta), and its usage still counts them all."""
    eng, seen = llm.engine, []
    step = eng.step
    eng.step = lambda: (lambda outs: (seen.extend(outs), outs)[1])(step())     # the worker thread's next steps
    try:
        whole = client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", **GREEDY)
        assert len(seen) == 1 and seen[0].finished and len(seen[0].outputs[0].token_ids) == 12
        assert whole.usage.completion_tokens == 12
        seen.clear()
        chunks = list(client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", stream=True,
                                                stream_options={"include_usage": True}, logprobs=2, **GREEDY))
        assert len(seen) == 12 and all(len(o.outputs[0].token_ids) == 1 for o in seen)
        assert chunks[-1].usage.completion_tokens == 12
        assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices and c.choices[0].logprobs) == 12
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finally:
        del eng.step


def test_completion_token_ids_prompt_and_logprobs(client, llm):
    ids = llm.tokenizer.encode("Hello world")
    out = client.completions.create(model=MODEL_NAME, prompt=ids, logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert tlp <= 0 and tok in top and len(top) in (3, 4)
        assert max(top.values()) == pytest.approx(tlp)        # greedy: the chosen token is the most likely


def test_stop_string_truncates(client):
    free = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", **GREEDY).choices[0].text
    stop = free[5:8]
    cut = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", stop=[stop], **GREEDY).choices[0]
    assert cut.text == free[:free.index(stop)] and cut.finish_reason == "stop"
    assert cut.model_extra["stop_reason"] == stop


def test_seed_makes_sampling_reproducible(client):
    kw = dict(model=MODEL_NAME, prompt="Random", max_tokens=10, temperature=1.0, top_p=0.9,
              extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1})
    a = client.completions.create(seed=7, presence_penalty=0.5, frequency_penalty=0.5, **kw).choices[0].text
    b = client.completions.create(seed=7, presence_penalty=0.5, frequency_penalty=0.5, **kw).choices[0].text
    assert a == b


def test_chat_plain_streamed_and_usage(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    whole = client.chat.completions.create(model=MODEL_NAME, messages=msgs, **GREEDY)
    msg = whole.choices[0].message
    assert msg.role == "assistant" and msg.content and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=msgs, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_chat_max_completion_tokens_and_logprobs(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                         temperature=0, max_completion_tokens=5, logprobs=True, top_logprobs=2,
                                         extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert out.usage.completion_tokens == 5 and len(content) == 5
    for item in content:
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token and len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)


def test_chat_template_kwargs_enable_thinking(client):
    msgs = [{"role": "user", "content": "Hi"}]
    on = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=1, temperature=0)
    off = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=1, temperature=0,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.usage.prompt_tokens > on.usage.prompt_tokens     # the empty <think></think> prefill


def test_health_openapi_docs_and_page(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"} <= set(spec["paths"])
    assert httpx.get(server.url + "/docs").status_code == 200
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert httpx.get(server.url + "/static/app.js").status_code == 200


def test_metrics(server, client):
    client.completions.create(model=MODEL_NAME, prompt="count me", **GREEDY)
    r = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("qwen3next_requests_running", "qwen3next_requests_waiting", "qwen3next_prompt_tokens_total",
                 "qwen3next_generation_tokens_total", "qwen3next_time_to_first_token_seconds_bucket",
                 "qwen3next_time_per_output_token_seconds_bucket", "qwen3next_state_slots_used",
                 "qwen3next_kv_pages_used", "qwen3next_kv_pages_total"):
        assert name in text, name
    assert 'qwen3next_requests_finished_total{finish_reason="length"}' in text


# ---------------------------------------------------------------- client errors

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path, body, param", [
    (CHAT, {"messages": USER, "max_tokens": -1}, "max_tokens"),
    (CHAT, {"messages": USER, "max_tokens": 0}, "max_tokens"),
    (CHAT, {"messages": USER, "temperature": 2.5}, "temperature"),
    (CHAT, {"messages": USER, "temperature": -0.1}, "temperature"),
    (CHAT, {"messages": USER, "top_p": 0}, "top_p"),
    (CHAT, {"messages": USER, "top_k": -2}, "top_k"),
    (CHAT, {"messages": USER, "presence_penalty": 3}, "presence_penalty"),
    (CHAT, {"messages": USER, "top_logprobs": 30, "logprobs": True}, "top_logprobs"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": USER, "n": 2}, "n"),
    (CHAT, {"messages": USER, "stop": [""]}, "stop"),
    (CHAT, {"messages": USER, "seed": 2 ** 70}, "seed"),
    (CHAT, {"messages": USER, "temperature": "hot"}, "temperature"),
    (CHAT, {"messages": USER, "max_tokens": 3.5}, "max_tokens"),
    (CHAT, {"messages": USER, "stream": "yes"}, "stream"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {}, "messages"),
    (CHAT, {"messages": "hello"}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user"}]}, "messages[0]"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    (CHAT, {"messages": [{"role": "user", "content": "x " * 300}]}, "messages"),
    (CHAT, {"messages": USER, "tool_choice": "required"}, "tool_choice"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"messages": USER, "logit_bias": {"42": 5}}, "logit_bias"),
    (CHAT, {"messages": USER, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": "x " * 300}, "prompt"),
    ("/v1/completions", {"prompt": [10 ** 9]}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 5, "max_tokens": 2}, None),
    ("/v1/completions", {"prompt": None}, "prompt"),
])
def test_invalid_fields_are_400(server, path, body, param):
    assert_openai_error(post(server, path, body), 400, param=param)


@pytest.mark.parametrize("raw", ["{bad json", "[1, 2]", "null", '"text"', "",
                                 '{"messages": [{"role": "user", "content": NaN}]}'])
def test_malformed_bodies_are_400(server, raw):
    assert_openai_error(post(server, CHAT, raw), 400)


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=USER, temperature=9)
    assert e.value.body["param"] == "temperature"


def test_api_key(server):
    for key in (None, "wrong-key", KEY + "x"):
        err = assert_openai_error(post(server, CHAT, {"messages": USER, "max_tokens": 1}, key=key), 401)
        assert err["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200           # open: for load balancers
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_model_route_and_method(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=USER, max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    assert_openai_error(post(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404, param="model")
    r = httpx.get(server.url + "/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"})
    assert_openai_error(r, 404)
    assert_openai_error(httpx.get(server.url + "/no/such/page"), 404)
    r = httpx.get(server.url + CHAT, headers={"Authorization": f"Bearer {KEY}"})
    assert_openai_error(r, 405, code="method_not_allowed")


def test_oversized_body_is_413(server):
    big = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}
    assert_openai_error(post(server, CHAT, big), 413, code="request_too_large")

    def chunks():                     # no Content-Length: the limit must hold while the body streams in
        for _ in range(MAX_BODY // 1000 + 10):
            yield b" " * 1000
    assert_openai_error(post(server, CHAT, chunks()), 413, code="request_too_large")
    assert httpx.get(server.url + "/health").status_code == 200


# ---------------------------------------------------------------- the queue and disconnects

def test_queue_full_is_503():
    llm = tiny_llm(max_num_seqs=1)
    with serve(llm, max_queue=1) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        long = c.completions.create(model=MODEL_NAME, prompt="busy", max_tokens=200, temperature=0, stream=True,
                                    extra_body={"ignore_eos": True})
        next(iter(long))                                     # the engine is now busy with it
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=MODEL_NAME, prompt="me too", max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
        long.close()
        assert wait_until(lambda: engine_idle(llm))
        assert c.completions.create(model=MODEL_NAME, prompt="now", max_tokens=2).usage.completion_tokens >= 1


def test_disconnects_abort_and_free_the_cache(server, llm):
    body = {"model": MODEL_NAME, "prompt": "go on", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=headers) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert llm.engine.usage()["slots_used"] == 1
    assert wait_until(lambda: engine_idle(llm), timeout=5)
    # a non-streaming client that gives up: noticed by polling the connection
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=0.4)
    assert wait_until(lambda: engine_idle(llm), timeout=5)
    assert time.monotonic() - started < 2.0        # 200 tokens would take longer: the request was aborted


def test_server_survives_concurrent_errors_and_successes(server, client):
    errors = []

    def bad():
        try:
            r = post(server, CHAT, {"messages": [{"role": "user", "content": "x " * 300}]})
            assert r.status_code == 400
        except Exception as e:        # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=bad) for _ in range(4)]
    for t in threads:
        t.start()
    out = client.chat.completions.create(model=MODEL_NAME, messages=USER, **GREEDY)
    for t in threads:
        t.join()
    assert not errors and out.usage.completion_tokens == 12


# ---------------------------------------------------------------- reasoning and tool calls (scripted engine)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_REPLY = ('<think>\nThe user wants the weather.\n</think>\n\nLet me check.\n<tool_call>\n'
              '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


def _scripted_reply(prompt: str) -> str:
    if prompt.endswith('"arguments": '):                # tool_choice named: the prefill stops here
        return '{"city": "Rome"}}\n</tool_call>'
    if prompt.endswith("<tool_call>\n"):                 # tool_choice required
        return '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    if prompt.rstrip().endswith("<think>"):              # a thinking template opened the block itself
        return "Hmm, a greeting.\n</think>\n\nHello!"
    return TOOL_REPLY


@pytest.fixture(scope="module")
def scripted():
    engine = ScriptedEngine(_scripted_reply)
    with serve(engine) as srv:
        srv.engine = engine
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        yield srv


def test_tool_calls_and_reasoning(scripted):
    out = scripted.client.chat.completions.create(model=MODEL_NAME, tools=[WEATHER_TOOL],
                                                  messages=[{"role": "user", "content": "Weather in Paris?"}])
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    assert choice.message.model_extra["reasoning_content"] == "The user wants the weather."
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert "get_weather" in scripted.engine.prompts[-1]           # the tools reached the prompt


def test_tool_calls_streamed(scripted):
    chunks = list(scripted.client.chat.completions.create(
        model=MODEL_NAME, tools=[WEATHER_TOOL], stream=True, messages=[{"role": "user", "content": "Paris?"}]))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert reasoning == "The user wants the weather." and content == "Let me check."
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_named_and_required(scripted):
    c, msgs = scripted.client, [{"role": "user", "content": "Weather?"}]
    none = c.chat.completions.create(model=MODEL_NAME, tools=[WEATHER_TOOL], tool_choice="none", messages=msgs)
    assert "get_weather" not in scripted.engine.prompts[-1]
    assert none.choices[0].message.tool_calls in (None, []) and "<tool_call>" in none.choices[0].message.content

    named = c.chat.completions.create(model=MODEL_NAME, tools=[WEATHER_TOOL], messages=msgs,
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = named.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Rome"} and named.choices[0].finish_reason == "tool_calls"

    required = c.chat.completions.create(model=MODEL_NAME, tools=[WEATHER_TOOL], tool_choice="required",
                                         messages=msgs)
    (call,) = required.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Oslo"}

    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL_NAME, tools=[WEATHER_TOOL], messages=msgs,
                                  tool_choice={"type": "function", "function": {"name": "nope"}})


def test_multi_turn_with_tool_results(scripted):
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    scripted.client.chat.completions.create(model=MODEL_NAME, tools=[WEATHER_TOOL], messages=msgs)
    prompt = scripted.engine.prompts[-1]
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt and '"city": "Paris"' in prompt


def test_reasoning_when_the_prompt_opens_the_think_block():
    thinking_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "<|im_start|>assistant\n<think>\n")
    engine = ScriptedEngine(_scripted_reply)
    with serve(engine, chat_template=thinking_template) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": "Hello"}]
        out = c.chat.completions.create(model=MODEL_NAME, messages=msgs).choices[0].message
        assert out.model_extra["reasoning_content"] == "Hmm, a greeting." and out.content == "Hello!"
        deltas = [ch.choices[0].delta for ch in c.chat.completions.create(model=MODEL_NAME, messages=msgs,
                                                                            stream=True) if ch.choices]
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "Hmm, a greeting."
        assert "".join(d.content or "" for d in deltas) == "Hello!"


# ---------------------------------------------------------------- our own bugs stay clean 500s

class _BrokenEngine(ScriptedEngine):
    """Fails before its first output, or (when `after_one`) after it."""

    def __init__(self, after_one: bool):
        super().__init__(lambda prompt: "Hello there, friend")
        self.after_one = after_one

    async def generate(self, prompt, params, request_id):
        if self.after_one:
            async for out in super().generate(prompt, params, request_id):
                yield out
                break
        raise RuntimeError("secret internal detail")


def test_internal_errors_are_clean_500s():
    with serve(_BrokenEngine(after_one=False)) as srv:
        for stream in (False, True):
            r = post(srv, CHAT, {"messages": USER, "stream": stream}, key=None)
            err = assert_openai_error(r, 500)
            assert err["type"] == "server_error" and "secret" not in r.text
    with serve(_BrokenEngine(after_one=True)) as srv:
        r = post(srv, "/v1/completions", {"prompt": "hi", "stream": True}, key=None)
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        assert '"type":"server_error"' in r.text and "secret" not in r.text


def test_a_failing_engine_step_is_a_clean_500_and_the_server_recovers(monkeypatch):
    llm = tiny_llm(max_num_seqs=2)
    with serve(llm) as srv:
        forward = llm.engine.runner.forward
        monkeypatch.setattr(llm.engine.runner, "forward", lambda batch: 1 / 0)
        r = post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 3}, key=None)
        assert assert_openai_error(r, 500)["type"] == "server_error" and "ZeroDivision" not in r.text
        r = post(srv, CHAT, {"messages": USER, "max_tokens": 3, "stream": True}, key=None)
        assert r.status_code == 200 and '"type":"server_error"' in r.text and r.text.rstrip().endswith("[DONE]")
        monkeypatch.setattr(llm.engine.runner, "forward", forward)
        assert engine_idle(llm)
        r = post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 3}, key=None)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_serve_flags(monkeypatch, llm):
    import argparse
    from qwen3next.server import add_serve_args, run
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args(["--model", llm.model_path, "--device", "cpu", "--max-num-seqs", "2"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.api_key is None
    seen = {}
    monkeypatch.setattr(run, "run_server", lambda llm, **kw: seen.update(kw, llm=llm))
    monkeypatch.setenv("QWEN3NEXT_API_KEY", "from-env")
    assert run.serve_main(args) == 0
    assert seen["api_key"] == "from-env" and seen["host"] == "127.0.0.1" and seen["port"] == 8000
    assert seen["served_model_name"] == [llm.model_path.rstrip("/").rsplit("/", 1)[-1]]
    assert seen["llm"].engine.scheduler.max_num_seqs == 2
    with pytest.raises(ValueError, match="--port"):
        run.serve_main(parser.parse_args(["--port", "0"]))
