"""`leanserve serve --async-scheduling`: through the real server and the official client, streamed and
unstreamed completions equal the offline synchronous engine's, with their usage counts."""
from __future__ import annotations

import argparse

import openai
from server_utils import remote_server

from leanserve.server import serve
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.sampling_params import SamplingParams


def test_async_scheduling_serves_the_synchronous_tokens(tiny_llm_dir):
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]
    offline = LLMEngine(EngineConfig(model=str(tiny_llm_dir), max_model_len=64))
    ref = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    with remote_server(tiny_llm_dir, "--async-scheduling", "--max-model-len", "64") as server:
        client = openai.OpenAI(base_url=server.api_url, api_key="none")
        model = client.models.list().data[0].id
        for prompt, expected in zip(prompts, ref):
            whole = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                              extra_body={"ignore_eos": True})
            assert whole.choices[0].text == expected.text and whole.choices[0].finish_reason == "length"
            assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt), 6)
            chunks = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})
            assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text


def test_the_flag_sets_the_engine_option():
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    assert serve.engine_options(p.parse_args(["--model", "m", "--async-scheduling"]))["async_scheduling"] is True
    assert "async_scheduling" not in serve.engine_options(p.parse_args(["--model", "m"]))
