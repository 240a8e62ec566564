"""An engine crash in a real `leanserve serve` process: every live stream ends with an error event
and [DONE], /health stops answering 200, and the process exits by itself with status 1 (no hang)
for a supervisor to restart it. The crash is injected by a launcher that patches the engine's
step in the server process, not by a hook in the product."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
from server_utils import remote_server, sse_data

MODEL = "tiny-llm"
NUM_STREAMS = 4
LAUNCHER = """
import os, sys
from leanserve.server.engine import llm_engine

real_step = llm_engine.LLMEngine.step

def step(self):
    if os.path.exists(os.environ["CRASH_TRIGGER"]):
        raise RuntimeError("simulated device failure")
    return real_step(self)

llm_engine.LLMEngine.step = step
from leanserve.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_engine_crash_ends_streams_and_exits(tiny_llm_dir, tmp_path):
    trigger = tmp_path / "crash"
    with remote_server(tiny_llm_dir, "--served-model-name", MODEL, "--max-model-len", "512", launcher=LAUNCHER,
                       env={"CRASH_TRIGGER": str(trigger)}, exit_code=1) as server:
        body = {"model": MODEL, "prompt": "1 + 1 =", "max_tokens": 400, "ignore_eos": True, "stream": True}
        started = asyncio.Event()
        health_after_crash: list[int | str] = []

        async def stream(client) -> list[str]:
            lines = []
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    lines.append(line)
                    if len(sse_data(lines)) == 2 * NUM_STREAMS:  # a few tokens in: the streams are live
                        started.set()
            return sse_data(lines)

        async def main() -> list[list[str]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                streams = [asyncio.create_task(stream(client)) for _ in range(NUM_STREAMS)]
                await started.wait()
                trigger.touch()
                return await asyncio.gather(*streams)

        streams = asyncio.run(main())
        deadline = time.monotonic() + 30
        while server.proc.poll() is None and time.monotonic() < deadline:
            try:
                health_after_crash.append(httpx.get(server.url + "/health", timeout=5).status_code)
            except httpx.TransportError as e:
                health_after_crash.append(type(e).__name__)
            time.sleep(0.01)
        for events in streams:
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["code"] == 500 and "simulated device failure" in error["message"]
        # the process exited by itself, and never answered 200 after the crash
        assert server.proc.wait(timeout=30) == 1
        assert 200 not in health_after_crash, health_after_crash
        assert "died: shutting down" in server.log()
