"""`leanserve serve --tensor-parallel-size 2` on CPU (2 gloo ranks: the engine core and one worker
process it starts): served greedy text equals the one-process engine's; a worker that dies makes
the server answer 503 in the error envelope and exit by itself with status 1, leaving no process
behind."""
from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import pytest
from server_utils import child_pid, engine_core_pid, remote_server, sse_data
from test_server_faults import alive

from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.sampling_params import SamplingParams

MODEL = "tiny-llm"
TP2 = ("--served-model-name", MODEL, "--device", "cpu", "--tensor-parallel-size", "2", "--max-model-len", "256")
PROMPTS = [[5, 17, 99, 230, 41, 7], list(range(30, 70))]
MAX_TOKENS = 24


def worker_pid(core_pid: int) -> int:
    """The engine core's tensor-parallel worker (rank 1)."""
    return child_pid(core_pid, b"leanserve.server.engine.tp_worker")


@pytest.fixture(scope="module")
def tp1_texts(tiny_llm_dir) -> list[str]:
    engine = LLMEngine(EngineConfig(model=str(tiny_llm_dir), device="cpu", max_model_len=256))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [r.text for r in engine.generate(PROMPTS, params)]


def test_tp2_serves_tp1_text_and_a_dead_rank_makes_it_answer_503_and_exit(tiny_llm_dir, tp1_texts):
    """One server for both (each start costs three processes' imports): the greedy text first, then
    rank 1 killed mid-stream."""
    with remote_server(tiny_llm_dir, *TP2, exit_code=1) as server:
        r = httpx.post(server.api_url + "/completions", timeout=60, json={
            "model": MODEL, "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        assert [c["text"] for c in choices] == tp1_texts
        assert all(c["finish_reason"] == "length" for c in choices)

        core = engine_core_pid(server.proc.pid)
        worker = worker_pid(core)
        body = {"model": MODEL, "prompt": "1 + 1 =", "max_tokens": 200, "ignore_eos": True, "stream": True}

        async def main() -> tuple[list[str], httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                lines = []
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        lines.append(line)
                        if len(sse_data(lines)) == 2:  # tokens are flowing: both ranks are in the steps
                            os.kill(worker, signal.SIGKILL)
                # the engine is dead once its streams have ended: a new request is refused at once
                return sse_data(lines), await client.post("/v1/completions", json={**body, "stream": False})

        events, refused = asyncio.run(main())
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 500 and "tensor-parallel rank 1" in error["message"], error
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["type"] == "ServiceUnavailableError"
        assert server.proc.wait(timeout=30) == 1
        assert not alive(core) and not alive(worker)
        assert "died: shutting down" in server.log()
