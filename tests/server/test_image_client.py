"""An image engine in its own process (image_client.py / image_proc.py): the same images as the engine
in this process, its errors raised here as such, and a dead engine process failing its requests
and its health instead of leaving them waiting."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest
from image_builders import PIXEL_NATIVE, build_tiny_pixel_pipeline

from leanserve.errors import UserError
from leanserve.models.image_params import ImageParamError, ImageParams
from leanserve.server.engine.errors import EngineDeadError, ImageGenerationError, QueueFullError, RequestAbortedError
from leanserve.server.image_client import ImageEngineClient
from leanserve.server.image_config import ImageEngineConfig
from leanserve.server.image_engine import AsyncImageEngine
from leanserve.server.image_proc import error_from_wire, error_to_wire

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory):
    return build_tiny_pixel_pipeline(tmp_path_factory.mktemp("pixel"))


def params(**kw) -> ImageParams:
    return ImageParams(**{"width": PIXEL_NATIVE, "height": PIXEL_NATIVE, "num_inference_steps": 2,
                          "guidance_scale": 1.0, "seed": 3, **kw})


async def images_of(engine, requests: list[tuple[str, int, ImageParams]]) -> list[list[np.ndarray]]:
    await engine.start()
    try:
        outs = await asyncio.gather(*(engine.generate(f"r{i}", prompt, n, p, time.monotonic())
                                      for i, (prompt, n, p) in enumerate(requests)))
    finally:
        await engine.shutdown()
    return [out.images for out in outs]


async def a_running_request(pixel_dir) -> tuple[ImageEngineClient, asyncio.Future]:
    """A started client and a long request that its engine process says runs (its STATS message)."""
    client = ImageEngineClient(ImageEngineConfig(model=str(pixel_dir), device="cpu"))
    await client.start()
    pending = asyncio.ensure_future(client.generate("r", "x", 32, params(num_inference_steps=200), time.monotonic()))
    deadline = time.monotonic() + 30
    while client.stats().num_running < 1:
        assert time.monotonic() < deadline, "no request started running"
        await asyncio.sleep(0.01)
    return client, pending


def test_same_images_and_errors_as_the_engine_in_process(pixel_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the engine's process computes as this one does
    config = ImageEngineConfig(model=str(pixel_dir), device="cpu", max_image_batch=4, max_queued_images=6)
    requests = [("a red circle", 2, params()), ("a blue square", 1, params(seed=7))]
    client = ImageEngineClient(config)
    assert client.defaults == AsyncImageEngine(config).defaults
    remote = asyncio.run(images_of(client, requests))
    local = asyncio.run(images_of(AsyncImageEngine(config), requests))
    assert [len(images) for images in remote] == [2, 1]
    for r, l in zip(sum(remote, []), sum(local, [])):
        assert r.dtype == np.uint8 and r.shape == (PIXEL_NATIVE, PIXEL_NATIVE, 3)
        np.testing.assert_array_equal(r, l)

    async def errors():
        client = ImageEngineClient(config)
        await client.start()
        try:
            with pytest.raises(ImageParamError) as bad:
                await client.generate("bad", "x", 1, params(width=PIXEL_NATIVE + 1), time.monotonic())
            with pytest.raises(QueueFullError):
                await client.generate("big", "x", 7, params(), time.monotonic())
            assert client.stats().healthy and client.max_image_batch == 4
        finally:
            await client.shutdown()
        return bad.value

    bad = asyncio.run(errors())
    assert bad.param == "size" and str(PIXEL_NATIVE) in str(bad)


def test_startup_errors_are_raised_in_the_api_process(tmp_path):
    with pytest.raises(UserError):
        ImageEngineClient(ImageEngineConfig(model=str(tmp_path / "missing"), device="cpu"))


def test_a_killed_engine_process_fails_its_requests_and_reports_unhealthy(pixel_dir):
    async def main():
        client, pending = await a_running_request(pixel_dir)
        os.kill(client._child.proc.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="exited unexpectedly"):
            await asyncio.wait_for(pending, 30)
        assert not client.stats().healthy
        with pytest.raises(EngineDeadError):
            await client.generate("late", "x", 1, params(), time.monotonic())
        await client.shutdown()

    asyncio.run(main())


def test_shutdown_aborts_what_is_still_running(pixel_dir):
    async def main():
        client, pending = await a_running_request(pixel_dir)
        start = time.monotonic()
        await client.shutdown(drain_timeout=0.2)
        with pytest.raises(RequestAbortedError):
            await pending
        assert time.monotonic() - start < 20 and not client._child.proc.is_alive()

    asyncio.run(main())


def test_every_error_crosses_as_one_the_route_answers():
    """A request's error in the engine's process comes back as its class (the route's status), and an
    unexpected one as ImageGenerationError (500), never as no answer."""
    bad = error_from_wire(error_to_wire(ImageParamError("size", "size 9x9 is not supported")))
    assert isinstance(bad, ImageParamError) and bad.param == "size" and str(bad) == "size 9x9 is not supported"
    assert isinstance(error_from_wire(error_to_wire(QueueFullError("full"))), QueueFullError)
    surprise = error_from_wire(error_to_wire(KeyError("unet")))
    assert isinstance(surprise, ImageGenerationError) and str(surprise) == "KeyError: 'unet'"


def test_a_worker_that_dies_says_so_through_its_stats(pixel_dir):
    """The engine's process learns of its worker's death from the stats observer even when no request is
    left to fail (it then sends DEAD, and the server's /health turns 503)."""
    async def main():
        engine = AsyncImageEngine(ImageEngineConfig(model=str(pixel_dir), device="cpu"))
        seen = []
        engine.stats_observer = seen.append

        def broken():
            raise RuntimeError("boom")

        engine._take_batch = broken  # outside a pipeline call: kills the worker
        await engine.start()
        with pytest.raises(EngineDeadError):
            await engine.generate("r", "x", 1, params(), time.monotonic())
        assert not seen[-1].healthy and engine.death == "RuntimeError: boom"
        await engine.shutdown()

    asyncio.run(main())
