"""The OpenAI-compatible API of a real `leanserve serve` process: protocol, SSE framing, the
official openai client, determinism under concurrency, seeds, tokenize, and SIGTERM draining."""
from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time

import httpx
import openai
import pytest
from server_utils import remote_server, sse_data
from transformers import AutoTokenizer

MODEL = "tiny-llm"
MESSAGES = [{"role": "user", "content": "What is 12 + 7?"}]


@pytest.fixture(scope="module")
def server(tiny_llm_dir):
    with remote_server(tiny_llm_dir, "--served-model-name", MODEL, "--max-model-len", "256") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_llm_dir):
    return AutoTokenizer.from_pretrained(tiny_llm_dir)


def chat_prompt_len(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def stream_events(server, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_data(r.iter_lines())


def test_ops_endpoints(server):
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json() == {}
    from leanserve import __version__
    assert httpx.get(server.url + "/version").json() == {"version": __version__}
    assert httpx.get(server.url + "/load").json() == {"server_load": 0}
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.status_code == 200
    assert f'leanserve:num_requests_running{{model_name="{MODEL}"}}' in metrics.text


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "leanserve"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_openai_client(client, tokenizer):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=7,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == chat_prompt_len(tokenizer, MESSAGES)
    assert resp.usage.completion_tokens == 7
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 7
    # list-form content (what vLLM's bench client sends) renders to the same prompt
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is 12 "}, {"type": "text", "text": "+ 7?"}]}]
    same = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=7, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert same.choices[0].message.content == choice.message.content
    assert same.usage.prompt_tokens == resp.usage.prompt_tokens


def test_chat_stream_sse_framing(server, client, tokenizer):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    events = stream_events(server, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    # role chunk first, then one content chunk per token, the last carrying finish_reason
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = chunks[1:-1]
    assert len(content) == 6
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    # usage: null everywhere but the final choices-less chunk, whose counts match the tokenizer
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    usage = chunks[-1]
    assert usage["choices"] == []
    assert usage["usage"]["prompt_tokens"] == chat_prompt_len(tokenizer, MESSAGES)
    assert usage["usage"]["completion_tokens"] == 6
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1])
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert text == full.choices[0].message.content

    # without include_usage there is no usage key and no usage chunk
    body.pop("stream_options")
    plain = [json.loads(e) for e in stream_events(server, "/v1/chat/completions", body)[:-1]]
    assert all("usage" not in c and c["choices"] for c in plain)

    # the official client reads the same stream
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_completions(client, tokenizer):
    prompt = "1 + 2 ="
    ids = tokenizer(prompt)["input_ids"]
    resp = client.completions.create(model=MODEL, prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == 16  # OpenAI's default max_tokens
    text = resp.choices[0].text

    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == text
    echo = client.completions.create(model=MODEL, prompt=prompt, echo=True, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert echo.choices[0].text == prompt + text

    batch = client.completions.create(model=MODEL, prompt=[prompt, "hello"], n=2, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == text[:len(batch.choices[0].text)]
    assert batch.usage.prompt_tokens == len(ids) + len(tokenizer("hello")["input_ids"])
    assert batch.usage.completion_tokens == 16

    lp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2,
                                   extra_body={"ignore_eos": True})
    logprobs = lp.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 3
    assert all(0 < len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0
    # greedy: the chosen token is the most likely one
    assert all(lp_ == pytest.approx(max(top.values())) for lp_, top in zip(logprobs.token_logprobs,
                                                                            logprobs.top_logprobs))


def test_completion_stream(server):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "stream": True, "echo": True}
    events = stream_events(server, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 5 and all(c["object"] == "text_completion" for c in chunks)
    assert chunks[0]["choices"][0]["text"].startswith("hello")
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_logprobs(client):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == 3
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_concurrent_greedy_equals_sequential(server):
    prompts = [f"{a} + {b} =" for a, b in [(1, 2), (3, 4), (10, 20), (7, 7), (39, 1), (5, 0), (12, 30), (2, 2)]]

    def body(p):
        return {"model": MODEL, "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True}

    sequential = [httpx.post(server.url + "/v1/completions", json=body(p), timeout=60).json()["choices"][0]["text"]
                  for p in prompts]

    async def concurrent():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/v1/completions", json=body(p)) for p in prompts))
        return [r.json()["choices"][0]["text"] for r in rs]

    assert asyncio.run(concurrent()) == sequential


def test_seeded_sampling(client):
    def sample(seed, n):
        resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=1.0,
                                              seed=seed, n=n, extra_body={"ignore_eos": True})
        return [c.index for c in resp.choices], [c.message.content for c in resp.choices]

    indices, texts = sample(1234, 2)
    assert indices == [0, 1]
    assert sample(1234, 2)[1] == texts          # same seed, same text
    assert sample(1235, 1)[1] == [texts[1]]      # choice i uses seed + i
    assert sample(999, 1)[1] != [texts[0]]       # a different seed samples something else


def test_tokenize_detokenize(server, tokenizer):
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": "hello world"}).json()
    assert r["tokens"] == tokenizer("hello world")["input_ids"] and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256
    chat = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}).json()
    assert chat["count"] == chat_prompt_len(tokenizer, MESSAGES)
    back = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()
    assert back["prompt"] == tokenizer.decode(r["tokens"])


def test_request_id_header_echoed(server):
    r = httpx.post(server.url + "/v1/completions", headers={"X-Request-Id": "abc-123"},
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"


def test_sigterm_drains_stream_and_exits(tiny_llm_dir):
    with remote_server(tiny_llm_dir, "--served-model-name", MODEL, "--shutdown-timeout", "0.5") as server:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            server.proc.send_signal(signal.SIGTERM)
            # while draining: health and new requests are refused with 503
            deadline = time.monotonic() + 10
            while httpx.get(server.url + "/health").status_code != 503:
                assert time.monotonic() < deadline
            refused = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
            assert refused.status_code == 503
            assert refused.json()["error"]["type"] == "ServiceUnavailableError"
            events = sse_data([first, *lines])
        assert events[-1] == "[DONE]"
        final = json.loads(events[-2])["choices"][0]
        assert final["finish_reason"] in ("abort", "length")
        assert server.proc.wait(timeout=30) == 0


def test_stop_and_default_max_tokens(client, tokenizer):
    base = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    stop = base[4:6]
    stopped = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                             stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == base[:base.index(stop)]
    # no max_tokens: generate up to the end of the context
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 256 - chat_prompt_len(tokenizer, MESSAGES)
    assert resp.choices[0].finish_reason == "length"


def test_temperature_default_from_generation_config(tiny_llm_dir, tmp_path):
    from starlette.testclient import TestClient

    from leanserve.server.app import create_app
    from leanserve.server.engine.async_engine import AsyncLLMEngine
    from leanserve.server.engine.config import EngineConfig
    from leanserve.server.settings import ServerSettings

    model_dir = tmp_path / "greedy-by-default"
    shutil.copytree(tiny_llm_dir, model_dir)
    config = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0}))
    engine = AsyncLLMEngine(EngineConfig(model=str(model_dir), max_model_len=128, num_kv_blocks=32))
    app = create_app(ServerSettings(log_stats_interval=0), {engine.model_name: engine})
    body = {"model": engine.model_name, "prompt": "1 + 2 =", "max_tokens": 10, "ignore_eos": True}
    with TestClient(app) as c:
        texts = [c.post("/v1/completions", json=b).json()["choices"][0]["text"]
                 for b in (body, body, {**body, "temperature": 0}, {**body, "temperature": 1.0, "seed": 1})]
    assert texts[0] == texts[1] == texts[2] != texts[3]


def test_chat_template_flag(tiny_llm_dir, tmp_path):
    """--chat-template replaces the tokenizer's template for rendering chat requests."""
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    messages = [{"role": "user", "content": "1 + 2 ="}]
    expected = AutoTokenizer.from_pretrained(tiny_llm_dir)("user: 1 + 2 =\nassistant:", add_special_tokens=False)
    with remote_server(tiny_llm_dir, "--served-model-name", MODEL, "--chat-template", str(template),
                       "--num-kv-blocks", "64") as server:
        r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": messages})
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == expected["input_ids"]
