"""The image engine's batch limit, in process: images of one shape that arrive while a loop runs all go
into the next loop up to the limit; the limit is automatic unless given (a fixed batch on CPU, what
fits in memory on CUDA, scaled down by area above the native size)."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from image_builders import NATIVE, PIXEL_NATIVE, build_tiny_pipeline, build_tiny_pixel_pipeline

from leanserve.models.image_model import AUTO_BATCH_CAP, CPU_BATCH, FREE_MEMORY_FRACTION, batch_that_fits
from leanserve.models.image_params import ImageParams
from leanserve.server.image_config import ImageEngineConfig
from leanserve.server.image_engine import AsyncImageEngine

pytestmark = pytest.mark.usefixtures("one_thread")
WAIT_S = 30  # bound of every wait on the worker; reached only when the engine is broken


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory):
    return build_tiny_pixel_pipeline(tmp_path_factory.mktemp("pixel"))


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd"))


def gate_first_call(engine: AsyncImageEngine) -> tuple[threading.Event, list[int]]:
    """Make the engine's first pipeline call wait for the returned event (a loop that runs as long as
    the test needs); the list receives each call's number of images."""
    gate, calls, generate = threading.Event(), [], engine.model.generate

    def gated(prompts, *args, **kwargs):
        calls.append(len(prompts))
        if len(calls) == 1:
            assert gate.wait(WAIT_S), "the test never released the first call"
        return generate(prompts, *args, **kwargs)

    engine.model.generate = gated
    return gate, calls


async def until(condition) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "the engine did not get there"
        await asyncio.sleep(0.01)


async def burst_while_a_loop_runs(engine: AsyncImageEngine, width: int, height: int, burst: int) -> list[int]:
    """One image starts a (gated) loop; `burst` single-image requests of one shape arrive while it runs.
    Returns the images per pipeline call."""
    gate, calls = gate_first_call(engine)
    params = ImageParams(width, height, 2, 1.0, seed=0)
    await engine.start()
    try:
        first = asyncio.ensure_future(engine.generate("first", "a red circle", 1, params, time.monotonic()))
        await until(lambda: calls == [1])
        rest = [asyncio.ensure_future(engine.generate(f"r{i}", f"shape {i}", 1, params, time.monotonic()))
                for i in range(burst)]
        await until(lambda: engine.stats().num_waiting == burst)
        gate.set()
        outputs = await asyncio.gather(first, *rest)
    finally:
        gate.set()
        await engine.shutdown()
    assert all(len(out.images) == 1 and out.images[0].shape == (height, width, 3) for out in outputs)
    return calls


def test_burst_during_a_loop_joins_the_next_loop_up_to_the_limit(pixel_dir):
    engine = AsyncImageEngine(ImageEngineConfig(model=str(pixel_dir), device="cpu", max_image_batch=4))
    assert asyncio.run(burst_while_a_loop_runs(engine, PIXEL_NATIVE, PIXEL_NATIVE, burst=6)) == [1, 4, 2]


async def clients_return_after_a_loop(engine: AsyncImageEngine, returning: list[int]) -> list[int]:
    """A gated loop of 1 image, then a loop of 4 (a burst that waited); once those 4 are answered, the
    clients come back in waves of `returning` images, 0.2 s apart. Returns the images per pipeline call."""
    gate, calls = gate_first_call(engine)
    params = ImageParams(PIXEL_NATIVE, PIXEL_NATIVE, 2, 1.0, seed=0)

    def send(name: str) -> asyncio.Future:
        return asyncio.ensure_future(engine.generate(name, "a red circle", 1, params, time.monotonic()))

    await engine.start()
    try:
        first = send("first")
        await until(lambda: calls == [1])
        burst = [send(f"b{i}") for i in range(4)]
        await until(lambda: engine.stats().num_waiting == 4)
        gate.set()
        await asyncio.gather(first, *burst)
        back = []
        for wave, size in enumerate(returning):
            back += [send(f"w{wave}-{i}") for i in range(size)]
            await asyncio.sleep(0.2)
        await asyncio.gather(*back)
    finally:
        gate.set()
        await engine.shutdown()
    return calls


def test_returning_clients_join_one_loop_instead_of_splitting(pixel_dir):
    # the deadline (a million loops) is never what ends the wait here: the fourth returning image is
    engine = AsyncImageEngine(ImageEngineConfig(model=str(pixel_dir), device="cpu", max_image_batch=8,
                                                batch_wait=1e6))
    assert asyncio.run(clients_return_after_a_loop(engine, [2, 2])) == [1, 4, 4]
    # without the wait the first wave runs alone
    engine = AsyncImageEngine(ImageEngineConfig(model=str(pixel_dir), device="cpu", max_image_batch=8,
                                                batch_wait=0))
    assert asyncio.run(clients_return_after_a_loop(engine, [2, 2])) == [1, 4, 2, 2]
    # a short deadline ends the wait when fewer clients come back
    engine = AsyncImageEngine(ImageEngineConfig(model=str(pixel_dir), device="cpu", max_image_batch=8,
                                                batch_wait=0.5))
    assert asyncio.run(clients_return_after_a_loop(engine, [1])) == [1, 4, 1]


def test_a_lone_client_never_waits(pixel_dir):
    # after a loop of one image a new image starts at once, however long the wait could be
    engine = AsyncImageEngine(ImageEngineConfig(model=str(pixel_dir), device="cpu", max_image_batch=8,
                                                batch_wait=1e9))
    params = ImageParams(PIXEL_NATIVE, PIXEL_NATIVE, 2, 1.0, seed=0)

    async def one_at_a_time():
        await engine.start()
        try:
            for i in range(3):
                await asyncio.wait_for(engine.generate(f"r{i}", "a circle", 1, params, time.monotonic()), WAIT_S)
        finally:
            await engine.shutdown()

    asyncio.run(one_at_a_time())


def test_automatic_limit_on_cpu_and_scaled_down_by_area(sd_dir):
    engine = AsyncImageEngine(ImageEngineConfig(model=str(sd_dir), device="cpu"))
    assert engine.max_image_batch is None  # sized when the engine starts
    assert asyncio.run(burst_while_a_loop_runs(engine, NATIVE, NATIVE, burst=CPU_BATCH + 1)) == [1, CPU_BATCH, 1]
    assert engine.max_image_batch == CPU_BATCH
    # 32x16 is twice the native 16x16 pixels: half the images per call
    engine = AsyncImageEngine(ImageEngineConfig(model=str(sd_dir), device="cpu"))
    assert asyncio.run(burst_while_a_loop_runs(engine, 2 * NATIVE, NATIVE, burst=CPU_BATCH // 2 + 1)) == \
        [1, CPU_BATCH // 2, 1]


def test_batch_that_fits():
    mib = 2**20
    # 10 MiB fixed + 2 MiB per image: 1 image peaks at 12 MiB, 4 at 18 MiB
    free = int((10 + 2 * 100) * mib / FREE_MEMORY_FRACTION)
    assert batch_that_fits(free, 12 * mib, 18 * mib, 4) == 100
    assert batch_that_fits(10**15, 12 * mib, 18 * mib, 4) == AUTO_BATCH_CAP
    assert batch_that_fits(mib, 12 * mib, 18 * mib, 4) == 1  # never below one image
    assert batch_that_fits(free, 12 * mib, 12 * mib, 4) == AUTO_BATCH_CAP  # no measurable growth


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the memory probe runs on CUDA")
def test_cuda_probe_sizes_a_tiny_pipeline_to_the_cap(pixel_dir):
    engine = AsyncImageEngine(ImageEngineConfig(model=str(pixel_dir), device="cuda"))
    assert engine.model.auto_batch_size() == AUTO_BATCH_CAP  # a few-thousand-parameter UNet at 8x8
