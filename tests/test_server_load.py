"""Load: 64 concurrent streaming clients, a quarter of which hang up at random moments.

Every client that reads to the end must get exactly its single-request greedy answer (batching and aborts of
neighbours change nothing), /health must keep answering, and afterwards every state slot and KV page is free.
"""
import asyncio
import json
import random
import re
import time

import httpx

from test_server_fixtures import MODEL_NAME, engine_idle, serve, tiny_llm, wait_until

N_CLIENTS = 64
PROMPTS = [f"Request number {i} says" for i in range(16)]
MAX_TOKENS = 24


def _body(prompt: str, stream: bool) -> dict:
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": stream}


async def _client(http: httpx.AsyncClient, i: int, rng: random.Random) -> tuple[str, str, str]:
    """('done' | 'dropped', prompt, text). Drops: after a random number of chunks, or at a random time."""
    prompt = PROMPTS[i % len(PROMPTS)]
    drop = i % 4 == 3
    drop_after_chunks = rng.randint(1, MAX_TOKENS - 2) if drop and rng.random() < 0.5 else None
    drop_after_s = rng.uniform(0.0, 1.5) if drop and drop_after_chunks is None else None

    async def read() -> tuple[str, str, str]:
        text, chunks = "", 0
        async with http.stream("POST", "/v1/completions", json=_body(prompt, True)) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "done", prompt, text
                chunk = json.loads(line[len("data: "):])
                text += chunk["choices"][0]["text"]
                chunks += 1
                if drop_after_chunks is not None and chunks >= drop_after_chunks:
                    return "dropped", prompt, text          # leaving the block closes the connection
        raise AssertionError("stream ended without [DONE]")

    if drop_after_s is None:
        return await read()
    try:
        return await asyncio.wait_for(read(), timeout=drop_after_s)
    except asyncio.TimeoutError:
        return "dropped", prompt, ""


async def _probe_health(http: httpx.AsyncClient, stop: asyncio.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        t = time.monotonic()
        r = await http.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        latencies.append(time.monotonic() - t)
        await asyncio.sleep(0.05)


async def _run(url: str) -> tuple[list, list[float]]:
    rng = random.Random(1234)
    limits = httpx.Limits(max_connections=N_CLIENTS + 8, max_keepalive_connections=N_CLIENTS + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        stop, latencies = asyncio.Event(), []
        probe = asyncio.create_task(_probe_health(http, stop, latencies))
        results = await asyncio.gather(*(_client(http, i, rng) for i in range(N_CLIENTS)))
        stop.set()
        await probe
    return results, latencies


def test_many_streaming_clients_with_random_disconnects():
    llm = tiny_llm(max_num_seqs=16)
    with serve(llm, max_queue=4 * N_CLIENTS) as srv:
        singles = {}
        for p in PROMPTS:            # the reference: each prompt alone on an idle server
            r = httpx.post(srv.url + "/v1/completions", json=_body(p, False), timeout=60)
            singles[p] = r.json()["choices"][0]["text"]

        results, latencies = asyncio.run(_run(srv.url))

        done = [r for r in results if r[0] == "done"]
        dropped = [r for r in results if r[0] == "dropped"]
        assert len(done) == N_CLIENTS * 3 // 4 and len(dropped) == N_CLIENTS // 4
        for _, prompt, text in done:
            assert text == singles[prompt], prompt
        for _, prompt, text in dropped:
            assert singles[prompt].startswith(text)
        assert latencies and max(latencies) < 5.0

        assert wait_until(lambda: engine_idle(llm), timeout=10), llm.engine.usage()
        metrics = httpx.get(srv.url + "/metrics").text

        def gauge(name: str) -> float:
            return float(re.search(rf"^{name} (\S+)$", metrics, re.M).group(1))
        assert gauge("qwen3next_state_slots_used") == 0 and gauge("qwen3next_kv_pages_used") == 0
        assert gauge("qwen3next_requests_running") == 0 and gauge("qwen3next_requests_waiting") == 0
        assert gauge("qwen3next_requests_in_flight") == 0
        assert gauge("qwen3next_state_slots_total") == 16 and gauge("qwen3next_kv_pages_total") > 0
        finished = float(re.search(r'qwen3next_requests_finished_total\{finish_reason="length"\} (\S+)',
                                   metrics).group(1))
        assert finished >= len(done) + len(PROMPTS)
        print(f"\nload: {len(done)} completed, {len(dropped)} dropped, "
              f"health p100 {max(latencies) * 1000:.0f} ms over {len(latencies)} probes")
