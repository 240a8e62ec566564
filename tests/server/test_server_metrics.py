"""/metrics of a real server: exact counts after known requests, gauges back to zero after
clients disconnect mid-stream (counted as aborts), and preemption under a tiny KV budget that
leaves greedy outputs unchanged."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from server_utils import metric, remote_server, scrape, until_metrics
from transformers import AutoTokenizer

MODEL = "tiny-llm"
# 40 blocks of 4 tokens: one request of ~20 + 40 tokens (15 blocks) fits alone, 8 at once do not
SERVER_ARGS = ("--served-model-name", MODEL, "--max-model-len", "128", "--block-size", "4",
               "--num-kv-blocks", "40", "--max-num-seqs", "8")


@pytest.fixture(scope="module")
def server(tiny_llm_dir):
    with remote_server(tiny_llm_dir, *SERVER_ARGS) as s:
        yield s


def completion(server, prompt: str, max_tokens: int) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def wait_idle(server, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server.url)
        gauges = [metric(samples, f"leanserve:{name}", model_name=MODEL)
                  for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")]
        if gauges == [0, 0, 0]:
            return samples
        assert time.monotonic() < deadline, f"gauges stuck at {gauges}"
        time.sleep(0.05)


def test_exposition(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "num_preemptions_total", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_bucket", "cache_config_info"):
        assert f"leanserve:{name}" in text, name
    assert 'block_size="4"' in text and 'num_gpu_blocks="40"' in text
    assert 'le="2560.0"' in text  # vLLM's TTFT buckets


def test_exact_counts(server, tiny_llm_dir):
    n, max_tokens, prompt = 5, 6, "7 + 7 ="
    prompt_len = len(AutoTokenizer.from_pretrained(tiny_llm_dir)(prompt)["input_ids"])
    before = wait_idle(server)
    for _ in range(n):
        assert completion(server, prompt, max_tokens)["usage"]["completion_tokens"] == max_tokens
    after = wait_idle(server)

    def delta(name, **labels):
        return metric(after, f"leanserve:{name}", model_name=MODEL, **labels) - \
            metric(before, f"leanserve:{name}", model_name=MODEL, **labels)

    assert delta("time_to_first_token_seconds_count") == n
    assert delta("inter_token_latency_seconds_count") == n * (max_tokens - 1)
    assert delta("e2e_request_latency_seconds_count") == n
    assert delta("request_queue_time_seconds_count") == n
    assert delta("prompt_tokens_total") == n * prompt_len
    assert delta("generation_tokens_total") == n * max_tokens
    assert delta("request_success_total", finished_reason="length") == n
    assert delta("request_generation_tokens_sum") == n * max_tokens
    # the same prompt again: every later request hits the prefix cache
    assert delta("prefix_cache_queries_total") > 0 and delta("prefix_cache_hits_total") > 0
    assert delta("time_to_first_token_seconds_sum") > 0


def test_http_middleware_metrics(server):
    """Counted per route template, method and status; ops routes and scrapes are not counted."""
    before = scrape(server.url)
    for _ in range(2):
        assert httpx.get(server.url + f"/v1/models/{MODEL}").status_code == 200
    assert httpx.post(server.url + "/v1/completions", json={"model": MODEL}).status_code == 400
    assert httpx.get(server.url + "/no/such/route").status_code == 404
    httpx.get(server.url + "/health")
    after = scrape(server.url)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("http_requests_total", handler="/v1/models/{model_id:path}", method="GET", status="200") == 2
    assert delta("http_requests_total", handler="/v1/completions", method="POST", status="400") == 1
    assert delta("http_requests_total", handler="other", method="GET", status="404") == 1
    assert delta("http_request_duration_seconds_count", handler="/v1/completions", method="POST") == 1
    assert not any(name == "http_requests_total" and ("handler", path) in labels
                   for name, labels in after for path in ("/health", "/metrics"))


def test_disconnects_abort_and_gauges_return_to_zero(server):
    before = wait_idle(server)
    k = 3

    async def read_then_disconnect():
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 100, "ignore_eos": True, "stream": True}
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            async def one():
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    events = 0
                    async for line in r.aiter_lines():
                        events += line.startswith("data:")
                        if events == 2:
                            return  # leaving the block closes the connection mid-stream

            await asyncio.gather(*(one() for _ in range(k)))

    async def disconnect_non_streaming():
        # the clients go once the engine holds all k requests: a fixed 0.1 s client timeout raced the first
        # request, which alone in the KV cache ran its 120 tokens inside 0.1 s on an idle CPU
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 120, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            posts = [asyncio.create_task(c.post("/v1/completions", json=body)) for _ in range(k)]
            await until_metrics(server.url, f"the engine to hold {k} requests", lambda samples: sum(
                metric(samples, f"leanserve:num_requests_{state}", model_name=MODEL) for state in ("running", "waiting")
            ) == k)
            assert not any(post.done() for post in posts), posts
            for post in posts:
                post.cancel()
            results = await asyncio.gather(*posts, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results

    asyncio.run(read_then_disconnect())
    asyncio.run(disconnect_non_streaming())
    after = wait_idle(server)

    def delta(reason):
        return metric(after, "leanserve:request_success_total", model_name=MODEL, finished_reason=reason) - \
            metric(before, "leanserve:request_success_total", model_name=MODEL, finished_reason=reason)

    # none ran to its end: streams and non-streaming handlers were all cancelled and aborted
    assert delta("abort") == 2 * k and delta("length") == 0
    assert completion(server, "hello", 3)["choices"][0]["finish_reason"] == "length"


def test_preemption_keeps_greedy_outputs(server):
    prompts = [f"{a} + {b} = {a + b}, {b} + {a} =" for a, b in [(1, 2), (3, 4), (10, 20), (7, 7), (39, 1),
                                                                  (5, 0), (12, 30), (2, 9)]]
    alone = [completion(server, p, 40)["choices"][0]["text"] for p in prompts]
    before = wait_idle(server)

    async def together():
        body = {"model": MODEL, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/v1/completions", json={**body, "prompt": p}) for p in prompts))
        return [r.json()["choices"][0]["text"] for r in rs]

    assert asyncio.run(together()) == alone
    after = wait_idle(server)
    preempted = metric(after, "leanserve:num_preemptions_total", model_name=MODEL) - \
        metric(before, "leanserve:num_preemptions_total", model_name=MODEL)
    assert preempted > 0
