"""OpenAI/vLLM behaviour of a real server through the official client: the developer role, null
content and tool calls, completion logprobs that join to the text, metrics counted per request,
impossible requests as 400, near-zero temperatures greedy, non-finite numbers refused, request ids
that never collide, and a connection that stays usable after an error."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from server_utils import metric, remote_server, scrape
from transformers import AutoTokenizer

from leanserve.server.app import FrontDoorMiddleware

MODEL = "tiny-llm"
MAX_QUEUED = 4
USER = {"role": "user", "content": "What is 12 + 7?"}


@pytest.fixture(scope="module")
def server(tiny_llm_dir):
    with remote_server(tiny_llm_dir, "--served-model-name", MODEL, "--max-model-len", "128",
                       "--max-queued-requests", str(MAX_QUEUED)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def tokenize(http, messages: list[dict]) -> list[int]:
    r = http.post("/tokenize", json={"model": MODEL, "messages": messages})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_developer_role_is_system(client, http):
    developer = [{"role": "developer", "content": "Answer briefly."}, USER]
    assert tokenize(http, developer) == tokenize(http, [{**developer[0], "role": "system"}, USER])
    resp = client.chat.completions.create(model=MODEL, messages=developer, max_tokens=3)
    assert resp.choices[0].message.role == "assistant"


def test_assistant_null_content_and_tool_calls(client, http):
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 12, "b": 7}'}}
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "user", "content": "So?"}]
    # null content is empty text (this template does not render tool calls)
    assert tokenize(http, messages) == tokenize(http, [USER, {"role": "assistant", "content": ""}, messages[2]])
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert resp.usage.completion_tokens >= 1


def test_completion_logprob_tokens_join_to_the_text(client, tiny_llm_dir):
    eos = AutoTokenizer.from_pretrained(tiny_llm_dir).eos_token_id
    # two free tokens, then EOS forced: the text leaves EOS out, so must the logprobs (special
    # tokens kept in the text: the random model may pick one before EOS)
    resp = client.completions.create(model=MODEL, prompt="1 + 2 =", max_tokens=10, logprobs=2, temperature=0,
                                     logit_bias={str(eos): 100},
                                     extra_body={"min_tokens": 2, "skip_special_tokens": False})
    choice = resp.choices[0]
    assert choice.finish_reason == "stop" and resp.usage.completion_tokens == 3
    assert len(choice.logprobs.tokens) == 2 == len(choice.logprobs.token_logprobs)
    assert "".join(choice.logprobs.tokens) == choice.text
    # stopped by length, every token is in the text
    resp = client.completions.create(model=MODEL, prompt="1 + 2 =", max_tokens=4, logprobs=0, temperature=0,
                                     extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert len(resp.choices[0].logprobs.tokens) == 4
    assert "".join(resp.choices[0].logprobs.tokens) == resp.choices[0].text


def test_metrics_count_a_request_once_whatever_n(server, client, tiny_llm_dir):
    prompt, n, max_tokens = "3 + 4 =", 3, 4
    prompt_len = len(AutoTokenizer.from_pretrained(tiny_llm_dir)(prompt)["input_ids"])
    before = scrape(server.url)
    resp = client.completions.create(model=MODEL, prompt=prompt, n=n, max_tokens=max_tokens, temperature=1,
                                     extra_body={"ignore_eos": True})
    assert len(resp.choices) == n and resp.usage.prompt_tokens == prompt_len
    after = scrape(server.url)

    def delta(name, **labels):
        return metric(after, f"leanserve:{name}", model_name=MODEL, **labels) - \
            metric(before, f"leanserve:{name}", model_name=MODEL, **labels)

    assert delta("prompt_tokens_total") == prompt_len
    assert delta("request_success_total", finished_reason="length") == 1
    assert delta("time_to_first_token_seconds_count") == 1
    assert delta("e2e_request_latency_seconds_count") == 1
    assert delta("generation_tokens_total") == n * max_tokens
    assert delta("request_generation_tokens_sum") == n * max_tokens
    assert delta("inter_token_latency_seconds_count") == n * (max_tokens - 1)


@pytest.mark.parametrize("prompt, n, param", [
    (["1 + 1 ="] * (MAX_QUEUED + 1), 1, "prompt"),
    (["1 + 1 =", "2 + 2 ="], 3, "n"),
])
def test_requests_that_never_fit_are_400(client, prompt, n, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, n=n, max_tokens=2)
    assert e.value.body["param"] == param and "split it" in e.value.body["message"]


def test_near_zero_temperature_is_greedy(client):
    def text(temperature: float) -> str:
        return client.completions.create(model=MODEL, prompt="5 + 6 =", max_tokens=8, temperature=temperature,
                                         extra_body={"ignore_eos": True}).choices[0].text

    greedy = text(0)
    assert text(1e-45) == greedy and text(1e-6) == greedy
    with pytest.raises(openai.BadRequestError, match="repetition_penalty"):
        client.completions.create(model=MODEL, prompt="5 + 6 =", max_tokens=2,
                                  extra_body={"repetition_penalty": 1e-45})


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused(http, literal):
    content = f'{{"model": "{MODEL}", "prompt": "hi", "max_tokens": 2, "temperature": {literal}}}'
    r = http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text


def test_client_request_ids_never_collide(server):
    body = {"model": MODEL, "messages": [USER], "max_tokens": 8, "ignore_eos": True}

    async def twice(**kw):
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", **kw) for _ in range(2)))

    for responses, client_id in ((asyncio.run(twice(json={**body, "request_id": "same"})), "same"),
                                 (asyncio.run(twice(json=body, headers={"X-Request-Id": "hdr"})), "hdr")):
        assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
        assert all(r.json()["id"] == f"chatcmpl-{client_id}" for r in responses)


def test_connection_stays_usable_after_errors(http):
    def local_port(r: httpx.Response) -> int:
        return r.extensions["network_stream"].get_extra_info("client_addr")[1]

    first = http.get("/v1/models")
    errors = [http.post("/v1/completions", json={"model": MODEL, "prompt": ""}),
              http.post("/v1/completions", json={"model": "nope", "prompt": "hi"}),
              http.put("/v1/models"),
              http.post("/v1/completions", content=b"x", headers={"Content-Type": "text/plain"})]
    assert [r.status_code for r in errors] == [400, 404, 405, 415]
    good = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert good.status_code == 200
    assert {local_port(r) for r in [first, *errors, good]} == {local_port(first)}  # one connection throughout


def test_internal_error_is_a_500_envelope_not_a_dropped_connection():
    """An exception that escapes the app before its response started is answered, not re-raised
    (re-raising is what makes uvicorn close a keep-alive connection)."""
    from types import SimpleNamespace

    async def failing_app(scope, receive, send):
        raise RuntimeError("boom")

    state = SimpleNamespace(api_key_digests=[], draining=False, ready=True, num_in_flight=0,
                            settings=SimpleNamespace(max_body_bytes=1024),
                            metrics=SimpleNamespace(http_requests=_Sink(), http_duration=_Sink()))
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "path": "/v1/models", "method": "GET", "headers": []}
    asyncio.run(FrontDoorMiddleware(failing_app, state)(scope, receive, send))
    assert sent[0]["status"] == 500 and b'"code":500' in sent[1]["body"] and b"RuntimeError" in sent[1]["body"]
    assert state.num_in_flight == 0


class _Sink:
    """A metric that takes any labels and observation."""

    def labels(self, *args):
        return self

    def inc(self, *args):
        pass

    def observe(self, *args):
        pass
