"""The engine core process dying under a real `leanserve serve`: every live stream ends with an
error event and [DONE], /health stops answering 200, and the server exits by itself with status 1
(no hang) for a supervisor to restart it. And the other way round: the core process never
outlives a server that is killed."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
from server_utils import engine_core_pid, remote_server, sse_data

MODEL = "tiny-llm"
NUM_STREAMS = 4


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_engine_core_death_ends_streams_and_exits(tiny_llm_dir):
    with remote_server(tiny_llm_dir, "--served-model-name", MODEL, "--max-model-len", "512", exit_code=1) as server:
        core_pid = engine_core_pid(server.proc.pid)
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
                os.kill(core_pid, signal.SIGKILL)  # what the kernel's OOM killer or a driver fault does
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
            assert error["code"] == 500 and "engine core process exited unexpectedly (exit code -9)" in error["message"]
        # the process exited by itself, and never answered 200 after the crash
        assert server.proc.wait(timeout=30) == 1
        assert 200 not in health_after_crash, health_after_crash
        assert "died: shutting down" in server.log()


def test_engine_core_never_outlives_the_server(tiny_llm_dir):
    with remote_server(tiny_llm_dir, "--served-model-name", MODEL, exit_code=-signal.SIGKILL) as server:
        core_pid = engine_core_pid(server.proc.pid)
        server.proc.kill()
        server.proc.wait()
        deadline = time.monotonic() + 10
        while alive(core_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(core_pid)


def test_sigusr1_dumps_every_process_stacks_and_serving_goes_on(tiny_llm_dir):
    with remote_server(tiny_llm_dir, "--served-model-name", MODEL, "--max-model-len", "256") as server:
        core_pid = engine_core_pid(server.proc.pid)
        for pid in (server.proc.pid, core_pid):
            os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while server.log().count("Current thread") < 2:  # faulthandler marks the thread that took the signal
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.05)
        log = server.log()
        assert "_busy_loop" in log  # the engine core's stack, waiting for work
        r = httpx.post(server.api_url + "/completions", json={"model": MODEL, "prompt": "1 + 1 =", "max_tokens": 4},
                       timeout=30)
        assert r.status_code == 200 and alive(core_pid)
