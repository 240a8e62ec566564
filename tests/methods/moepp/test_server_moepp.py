"""A tiny MoE++ directory served by a real `leanserve serve` process: /v1/completions returns the
greedy tokens (and logprobs) of the eager oracle; /v1/chat/completions answers through its chat
template."""
from __future__ import annotations

import httpx
import pytest
from moepp_builders import EagerMoEPP, write_moepp_dir
from server_utils import remote_server
from transformers import AutoTokenizer

MODEL = "tiny-moepp"


@pytest.fixture(scope="module")
def model_dir(tiny_llm_dir, tmp_path_factory):
    return write_moepp_dir(tmp_path_factory.mktemp("moepp"), tiny_llm_dir)


@pytest.fixture(scope="module")
def http(model_dir):
    with remote_server(model_dir, "--served-model-name", MODEL) as server, \
            httpx.Client(base_url=server.api_url, timeout=60) as client:
        yield client


def test_completion_is_the_oracle_greedy_continuation(http, model_dir):
    prompt = "1 + 2 ="
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens, logprobs = EagerMoEPP(model_dir).greedy(tokenizer(prompt)["input_ids"], 8)
    r = http.post("/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                        "ignore_eos": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == tokenizer.decode(tokens)
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(logprobs, abs=1e-4)
    assert r.json()["usage"]["completion_tokens"] == 8


def test_chat_completion(http):
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    r = http.post("/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 5, "temperature": 0,
                                             "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 5 and isinstance(body["choices"][0]["message"]["content"], str)
