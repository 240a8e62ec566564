"""The API process's pipe to the engine core, under both event loops uvicorn may run it on: a burst
of adds far larger than the socket buffer, sent while the core is not reading (as while it is busy
in a long step), all arrive. Under uvloop the burst used to kill the sender thread silently and
hang every request after the ~90th (256 streams of 400-token prompts on an H100)."""
from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest

from leanserve.server.engine import wire
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.core_client import EngineCoreClient
from leanserve.server.engine.sampling_params import SamplingParams

BURST = 300
PROMPT_LEN = 400  # ~1.2 KB of msgpack each: the burst is ~3x a Unix socket's buffer


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        return pytest.importorskip("uvloop").new_event_loop()
    return asyncio.new_event_loop()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_burst_of_adds_larger_than_the_pipe_reaches_a_paused_core(tiny_llm_dir, loop_kind):
    client = EngineCoreClient(EngineConfig(model=str(tiny_llm_dir), max_model_len=512, device="cpu"))
    loop = new_loop(loop_kind)
    finished: dict[str, str] = {}
    exits: list = []

    def on_message(message: list) -> None:
        if message[0] == wire.STEP:
            for out in map(wire.output_from_wire, message[1]):
                if out.finish_reason is not None:
                    finished[out.request_id] = out.finish_reason

    async def main() -> None:
        client.start(on_message, exits.append)
        os.kill(client.proc.pid, signal.SIGSTOP)  # the core reads nothing until it is continued
        try:
            rng = random.Random(0)
            params = wire.to_wire(SamplingParams(max_tokens=1, ignore_eos=True))
            ids = [f"r{i}" for i in range(BURST)]
            for request_id in ids:
                client.send((wire.ADD, request_id, [rng.randrange(4, 64) for _ in range(PROMPT_LEN)], params, 0.0))
            # the last one runs: the core heard the whole burst. Others may finish before their abort
            # arrives (the core steps whenever the pipe is momentarily empty)
            client.send((wire.ABORT, ids[:-1]))
            await asyncio.sleep(0.5)  # the sender meets the full pipe
        finally:
            os.kill(client.proc.pid, signal.SIGCONT)
        for _ in range(600):
            if len(finished) == BURST or exits:
                break
            await asyncio.sleep(0.05)
        await client.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert not exits, f"the core exited: {exits}"
    assert len(finished) == BURST, f"{BURST - len(finished)} of {BURST} requests never finished"
    assert finished[f"r{BURST - 1}"] == "length"
    assert set(finished.values()) <= {"abort", "length"}


def test_undecodable_message_from_the_core_stops_it_and_reports_its_exit(tiny_llm_dir, monkeypatch):
    """A message the API process cannot decode ends the core (the server then answers 503), never a
    receiver that dies quietly while /health still says ok."""
    client = EngineCoreClient(EngineConfig(model=str(tiny_llm_dir), max_model_len=512, device="cpu"))

    def undecodable(data: bytes):
        raise ValueError("not msgpack")

    monkeypatch.setattr(wire, "decode", undecodable)  # this process's receiver only: the core has its own
    exits: list = []

    async def main() -> None:
        client.start(lambda message: None, exits.append)
        params = wire.to_wire(SamplingParams(max_tokens=1, ignore_eos=True))
        client.send((wire.ADD, "r0", [5] * 8, params, 0.0))  # the core answers with a step message
        for _ in range(200):
            if exits:
                break
            await asyncio.sleep(0.05)
        await client.close()

    asyncio.run(main())
    assert exits == [-signal.SIGKILL]
