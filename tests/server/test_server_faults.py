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
from server_utils import remote_server, sse_data

MODEL = "tiny-llm"
NUM_STREAMS = 4


def engine_core_pid(server_pid: int) -> int:
    """The server's engine core process (multiprocessing's spawned child; not its resource tracker)."""
    children = " ".join(p.read_text() for p in Path(f"/proc/{server_pid}/task").glob("*/children")).split()
    cores = [int(pid) for pid in children
             if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(cores) == 1, cores
    return cores[0]


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
