"""Errors of a real server: every bad request gets a 4xx in the OpenAI/vLLM envelope, the
official client maps them to its exception types, auth guards /v1/* only, a full queue answers
429 with Retry-After, and the server keeps answering afterwards."""
from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest
from server_utils import remote_server, sse_data

MODEL = "tiny-llm"
KEY = "sk-test-key"
MAX_MODEL_LEN = 128
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
CONTEXT_MESSAGE = re.compile(
    r"^This model's maximum context length is 128 tokens\. However, you requested (\d+) tokens "
    r"\((\d+) in the messages, (\d+) in the completion\)\. Please reduce the length of the messages or completion\.$")


@pytest.fixture(scope="module")
def server(tiny_llm_dir):
    # one running sequence and one waiting slot: a third concurrent request must get 429
    with remote_server(tiny_llm_dir, "--served-model-name", MODEL, "--api-key", KEY,
                       "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "64",
                       "--max-num-seqs", "1", "--max-queued-requests", "1") as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.api_url, api_key=KEY, max_retries=0)


def assert_error(r: httpx.Response, status: int, param: str | None = None, contains: str = "") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"]
    if param is not None:
        assert error["param"] == param
    assert contains in error["message"]
    return error


def assert_still_serving(http):
    r = http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("content, contains", [
    (b"{not json", "Invalid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'"a string"', "JSON object"),
])
def test_malformed_body(http, content, contains):
    r = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert assert_error(r, 400, contains=contains)["type"] == "BadRequestError"
    assert_still_serving(http)


@pytest.mark.parametrize("change, param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"n": 9}, "n"),
    ({"seed": 2**63}, "seed"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ({"logit_bias": {"1": 500}}, "logit_bias.1"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"logit_bias": {"hello": 1}}, "logit_bias"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format.type"),
    ({"top_logprobs": 2}, None),
    ({"chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "chat_template_kwargs"),
])
def test_invalid_chat_fields(http, change, param):
    r = http.post("/v1/chat/completions", json={**CHAT, **change})
    error = assert_error(r, 400)
    if param is not None:
        assert error["param"] == param, error
    assert_still_serving(http)


def test_unknown_fields_are_ignored(http):
    r = http.post("/v1/chat/completions", json={**CHAT, "some_future_field": {"x": 1}, "user": "u1"})
    assert r.status_code == 200


@pytest.mark.parametrize("max_tokens", [10_000, MAX_MODEL_LEN])
def test_context_overflow_message(http, max_tokens):
    error = assert_error(http.post("/v1/chat/completions", json={**CHAT, "max_tokens": max_tokens}), 400)
    m = CONTEXT_MESSAGE.match(error["message"])
    assert m, error["message"]
    total, prompt, completion = map(int, m.groups())
    assert completion == max_tokens and total == prompt + completion and prompt > 0
    # an over-long prompt with no max_tokens reports too (the default is the remaining context)
    long = {**CHAT, "messages": [{"role": "user", "content": "1 + 2 = 3 " * 100}]}
    long.pop("max_tokens")
    assert CONTEXT_MESSAGE.match(assert_error(http.post("/v1/chat/completions", json=long), 400)["message"])


def test_completion_errors(http):
    base = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert_error(http.post("/v1/completions", json={**base, "suffix": "x"}), 400, "suffix")
    assert_error(http.post("/v1/completions", json={**base, "prompt": ""}), 400, "prompt")
    assert_error(http.post("/v1/completions", json={**base, "prompt": []}), 400, "prompt")
    assert_error(http.post("/v1/completions", json={**base, "prompt": [1, 10**6]}), 400, "prompt")
    assert_error(http.post("/v1/completions", json={**base, "max_tokens": 500}), 400, contains="maximum context length")
    assert_error(http.post("/detokenize", json={"tokens": [10**6]}), 400, "tokens")
    assert_still_serving(http)


def test_not_found(http):
    error = assert_error(http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"}), 404, "model")
    assert error["type"] == "NotFoundError" and "gpt-4" in error["message"]
    assert_error(http.get("/v1/models/gpt-4"), 404)
    assert_error(http.get("/v1/no/such/route"), 404, contains="/v1/no/such/route")
    assert_error(http.get("/nowhere"), 404)
    assert_still_serving(http)


def test_content_type_and_size(http):
    r = http.post("/v1/chat/completions", content=b"model=x", headers={"Content-Type": "text/plain"})
    assert_error(r, 415)
    big = {**CHAT, "padding": "x" * (3 * 1024 * 1024)}
    assert_error(http.post("/v1/chat/completions", json=big), 413)

    def chunked():  # no Content-Length: the limit must hold for streamed bodies too
        for _ in range(5):
            yield b" " * (1024 * 1024)
    assert_error(http.post("/v1/chat/completions", content=chunked(),
                           headers={"Content-Type": "application/json"}), 413)
    assert_still_serving(http)


def test_openai_client_exceptions(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[])
    assert e.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128 tokens"):
        client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=1000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT["messages"])
    wrong = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_api_key_guards_v1_only(server, http):
    assert_error(httpx.get(server.url + "/v1/models"), 401)
    assert_error(httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    assert_error(httpx.post(server.url + "/v1/chat/completions", json=CHAT,
                            headers={"Authorization": KEY}), 401)  # not a Bearer token
    assert http.get("/v1/models").status_code == 200
    for path in ("/health", "/metrics", "/version", "/load"):
        assert httpx.get(server.url + path).status_code == 200, path


def test_queue_full_429(server, http):
    # n=3 fans out into three engine requests, more than the one waiting slot can ever hold: a 400,
    # since retrying (what a 429 invites) could never succeed
    r = http.post("/v1/chat/completions", json={**CHAT, "n": 3, "max_tokens": 50, "ignore_eos": True})
    assert_error(r, 400, "n", contains="split it")

    async def load():
        body = {**CHAT, "max_tokens": 100, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=server.url, headers=http.headers, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(5)))

    responses = asyncio.run(load())
    statuses = [r.status_code for r in responses]
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
    assert all(r.headers["retry-after"].isdigit() for r in responses if r.status_code == 429)
    assert_still_serving(http)

    async def openai_load():
        client = openai.AsyncOpenAI(base_url=server.api_url, api_key=KEY, max_retries=0)
        return await asyncio.gather(*(client.chat.completions.create(
            model=MODEL, messages=CHAT["messages"], max_tokens=100, extra_body={"ignore_eos": True})
            for _ in range(4)), return_exceptions=True)

    assert any(isinstance(r, openai.RateLimitError) for r in asyncio.run(openai_load()))


@pytest.fixture(params=["stream", "full"])
def dying_engine_app(request, tiny_llm_dir, crash_core_at_step):
    """An in-process app whose real engine core process dies on its 3rd step (an engine crash)."""
    from starlette.testclient import TestClient

    from leanserve.server.app import create_app
    from leanserve.server.engine.async_engine import AsyncLLMEngine
    from leanserve.server.engine.config import EngineConfig
    from leanserve.server.settings import ServerSettings

    crash_core_at_step(3)
    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_llm_dir), served_model_name=MODEL, max_model_len=128,
                                         num_kv_blocks=32))
    with TestClient(create_app(ServerSettings(log_stats_interval=0), {MODEL: engine})) as c:
        yield c, request.param


def test_engine_death(dying_engine_app):
    c, mode = dying_engine_app
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 20, "ignore_eos": True}
    if mode == "stream":  # 200 already sent: an error event, then [DONE]
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            events = sse_data(r.iter_lines())
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 500 and error["type"] == "InternalServerError"
        assert "simulated device failure" in error["message"]
    else:
        error = assert_error(c.post("/v1/completions", json=body), 500, contains="simulated device failure")
        assert error["type"] == "InternalServerError"
    assert_error(c.get("/health"), 503, contains="Engine dead")
    assert_error(c.post("/v1/completions", json=body), 500, contains="dead")  # new requests too
    assert c.get("/metrics").status_code == 200


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "does not exist"),
    (["--model", "{image}"], "names no pipeline class"),
    (["--model", "{tiny}", "--chat-template", "/no/such/template.jinja"], "no such file"),
    (["--model", "{tiny}", "--model", "{tiny}", "--served-model-name", "a"], "one per model"),
])
def test_serve_cli_errors(args, message, tiny_llm_dir, tmp_path, capsys):
    from leanserve.cli import main

    (tmp_path / "model_index.json").write_text("{}")
    args = [a.format(image=tmp_path, tiny=tiny_llm_dir) for a in args]
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
