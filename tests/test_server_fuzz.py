"""Property-based fuzzing of the served OpenAPI schema with schemathesis: no request, valid or not, gets a 5xx.

Schemathesis generates bodies that follow the schema (positive) and that break it (negative: wrong types,
missing fields, out-of-range numbers); every one goes through the real server and the real tiny model. The
context is short (64 tokens) so that a fuzzed `max_tokens` cannot make an example slow.
"""
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

schemathesis = pytest.importorskip("schemathesis")

from schemathesis import GenerationMode

from test_server_fixtures import serve, tiny_llm

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_EXAMPLES = 100


@pytest.fixture(scope="module")
def fuzz_server():
    with serve(tiny_llm(max_model_len=64, max_num_seqs=4), api_key=KEY, max_body_bytes=256 * 1024) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                    max_examples=MAX_EXAMPLES)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_no_server_errors(case):
    response = case.call(headers=AUTH, timeout=30)
    assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


# Schemathesis mostly produces bodies the server refuses; this one stays inside the documented ranges (edges
# included) so that every example reaches the sampler with unusual settings.
_floats = dict(allow_nan=False, allow_infinity=False)
SAMPLING = st.fixed_dictionaries({}, optional={
    "temperature": st.floats(0, 2, **_floats),
    "top_p": st.floats(0, 1, exclude_min=True, **_floats),
    "top_k": st.one_of(st.sampled_from([-1, 0, 1]), st.integers(1, 10 ** 12)),
    "min_p": st.floats(0, 1, **_floats),
    "presence_penalty": st.floats(-2, 2, **_floats),
    "frequency_penalty": st.floats(-2, 2, **_floats),
    "repetition_penalty": st.floats(0, 100, exclude_min=True, **_floats),
    "seed": st.integers(-(2 ** 63), 2 ** 64 - 1),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, 2 ** 40), max_size=3),
    "min_tokens": st.integers(0, 4),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20),
    "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "stream": st.booleans(),
})


@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(sampling=SAMPLING, content=st.text(min_size=1, max_size=40), max_tokens=st.integers(4, 8))
def test_valid_sampling_settings_always_answer(fuzz_server, sampling, content, max_tokens):
    if "top_logprobs" in sampling and not sampling.get("logprobs"):
        sampling["logprobs"] = True
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **sampling}
    r = httpx.post(fuzz_server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    if sampling.get("stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text
    else:
        assert r.json()["usage"]["completion_tokens"] >= 1
