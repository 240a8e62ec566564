"""/v1/images/generations of a real `leanserve serve` process serving tiny random-weight SD-style,
SDXL-style and leanserve pixel-space pipelines (plus a tiny LLM, for the cross-kind errors): PNGs of the requested
size, n, seeds that give the same image alone or batched, samplers, the official openai client,
errors in the envelope, metrics, cancellation of waiting and running requests, and SIGTERM draining."""
from __future__ import annotations

import asyncio
import signal
import time

import httpx
import numpy as np
import openai
import pytest
from image_builders import (
    NATIVE,
    PIXEL_NATIVE,
    URL,
    assert_error,
    build_tiny_pipeline,
    build_tiny_pixel_pipeline,
    decode,
    same,
)
from server_utils import metric, remote_server, scrape, until_metrics

SD, XL, PIXEL, LLM = "tiny-sd", "tiny-sdxl", "tiny-pixel", "tiny-llm"
STEPS = 2
LONG = 200            # steps of a request that keeps the worker busy for a second or more
MAX_BATCH = 4
MAX_QUEUED = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llm_dir):
    models = {SD: build_tiny_pipeline(tmp_path_factory.mktemp("sd")),
              XL: build_tiny_pipeline(tmp_path_factory.mktemp("sdxl"), xl=True),
              PIXEL: build_tiny_pixel_pipeline(tmp_path_factory.mktemp("pixel")), LLM: tiny_llm_dir}
    dirs, *more = [str(d) for d in models.values()]
    args = [a for d in more for a in ("--model", d)] + [a for name in models for a in ("--served-model-name", name)]
    with remote_server(dirs, *args, "--max-model-len", "64", "--max-image-batch", str(MAX_BATCH),
                       "--max-queued-requests", str(MAX_QUEUED)) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def body(**kw) -> dict:
    return {"model": SD, "prompt": "a small red circle in the top left", "num_inference_steps": STEPS, **kw}


def generate(http, **kw) -> list[np.ndarray]:
    r = http.post(URL, json=body(**kw))
    assert r.status_code == 200, r.text
    resp = r.json()
    assert set(resp) == {"created", "data"} and abs(resp["created"] - time.time()) < 120
    assert all(item["revised_prompt"] is None for item in resp["data"])
    return [decode(item) for item in resp["data"]]


def wait_idle(server, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server.url)
        gauges = [metric(samples, f"leanserve:image_requests_{g}", model_name=SD) for g in ("running", "waiting")]
        if gauges == [0, 0]:
            return samples
        assert time.monotonic() < deadline, f"image gauges stuck at {gauges}"
        time.sleep(0.05)


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return metric(after, f"leanserve:{name}", **labels) - metric(before, f"leanserve:{name}", **labels)


def test_sizes_and_n(http):
    native = generate(http, n=2, seed=1)
    assert len(native) == 2 and all(img.shape == (NATIVE, NATIVE, 3) for img in native)
    wide = generate(http, size="24x16", seed=1)  # W x H: 24 wide, 16 high
    assert wide[0].shape == (16, 24, 3)
    assert same(generate(http, width=24, height=16, seed=1)[0], wide[0])
    assert generate(http, size="auto", seed=1)[0].shape == (NATIVE, NATIVE, 3)
    r = http.post(URL, json=body(output_format="jpeg", output_compression=90))
    assert r.status_code == 200 and decode(r.json()["data"][0], "JPEG").shape == (NATIVE, NATIVE, 3)


def test_seeds_alone_and_batched(server, http):
    """Image i of a request uses seed + i; an image is the same alone or batched with others."""
    alone = generate(http, n=2, seed=7)
    assert same(generate(http, seed=8)[0], alone[1])
    assert not same(generate(http, seed=9)[0], alone[0])
    before = wait_idle(server)

    async def concurrent():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            # a long request of another shape keeps the worker busy until the three below all wait
            blocker = asyncio.ensure_future(c.post(URL, json=body(num_inference_steps=LONG, seed=0)))
            await asyncio.sleep(0.2)
            rs = await asyncio.gather(c.post(URL, json=body(n=2, seed=7)), c.post(URL, json=body(seed=8)),
                                      c.post(URL, json=body(seed=3)))
            assert (await blocker).status_code == 200
        return rs

    rs = asyncio.run(concurrent())
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    batched = [decode(item) for r in rs for item in r.json()["data"]]
    assert same(batched[0], alone[0]) and same(batched[1], alone[1]) and same(batched[2], alone[1])
    after = wait_idle(server)
    # 2 pipeline calls: the blocker, then the 4 waiting images together (MAX_BATCH)
    assert delta(before, after, "text_encode_seconds_count", model_name=SD) == 2
    assert delta(before, after, "denoise_step_seconds_count", model_name=SD) == LONG + STEPS


def test_samplers_and_negative_prompt(http):
    kw = dict(seed=5, guidance_scale=6.0, num_inference_steps=6)
    base = generate(http, **kw)[0]
    for name in ("dpmsolver++", "ddpm", "unipc"):  # not euler: on the same timesteps it is DDIM
        assert not same(generate(http, scheduler=name, **kw)[0], base), name
    assert same(generate(http, sampler="ddim", **kw)[0], base)  # the model ships DDIM
    assert same(generate(http, **kw)[0], base)  # and gets it back after the others
    assert not same(generate(http, negative_prompt="blue square", **kw)[0], base)


def test_openai_client(server):
    client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
    resp = client.images.generate(model=SD, prompt="a blue square", n=2, size="16x16", response_format="b64_json",
                                  extra_body={"num_inference_steps": STEPS, "seed": 11, "negative_prompt": "red"})
    assert len(resp.data) == 2
    assert all(decode(item.model_dump()).shape == (NATIVE, NATIVE, 3) for item in resp.data)
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model=SD, prompt="a blue square", response_format="url")
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="no-such-model", prompt="a blue square")


def test_sdxl_style_pipeline(http):
    plain = generate(http, model=XL, n=2, seed=3, size="16x24")
    assert [img.shape for img in plain] == [(24, 16, 3)] * 2
    assert same(generate(http, model=XL, seed=4, size="16x24")[0], plain[1])
    negative = generate(http, model=XL, seed=3, size="16x24", negative_prompt="green")
    assert not same(negative[0], plain[0])


def test_pixel_pipeline(server, http):
    """leanserve's pixel-space teacher: its trained size only, its own defaults, seeds as for SD."""
    images = generate(http, model=PIXEL, n=2, seed=21)
    assert [img.shape for img in images] == [(PIXEL_NATIVE, PIXEL_NATIVE, 3)] * 2
    assert same(generate(http, model=PIXEL, seed=22)[0], images[1])
    assert not same(generate(http, model=PIXEL, seed=21, num_inference_steps=4)[0], images[0])
    assert_error(http.post(URL, json=body(model=PIXEL, size=f"{2 * PIXEL_NATIVE}x{2 * PIXEL_NATIVE}")), 400, "size")
    before = scrape(server.url)
    r = http.post(URL, json={"model": PIXEL, "prompt": "a green triangle", "seed": 1})
    assert r.status_code == 200
    # the pipeline's own default steps (25), one text_encode per call, no VAE
    samples = scrape(server.url)
    assert delta(before, samples, "denoise_step_seconds_count", model_name=PIXEL) == 25
    assert delta(before, samples, "text_encode_seconds_count", model_name=PIXEL) == 1
    assert delta(before, samples, "vae_decode_seconds_count", model_name=PIXEL) == 0


@pytest.mark.parametrize("fields, status, param", [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "   "}, 400, "prompt"),
    ({"size": "18x16"}, 400, "size"),        # not a multiple of 4 (VAE x UNet downsampling)
    ({"size": "64x64"}, 400, "size"),        # beyond 2x native
    ({"size": "big"}, 400, "size"),
    ({"size": "16x16", "width": 16}, 400, None),
    ({"n": 0}, 400, "n"),
    ({"n": 11}, 400, "n"),
    ({"num_inference_steps": 0}, 400, "num_inference_steps"),
    ({"num_inference_steps": 500}, 400, "num_inference_steps"),
    # beyond a 64-bit integer: refused before the engine's process (the wire's integers are 64-bit)
    ({"num_inference_steps": 10**20}, 400, "num_inference_steps"),
    ({"num_inference_steps": -10**30}, 400, "num_inference_steps"),
    ({"size": f"{10**20}x16"}, 400, "size"),
    ({"width": 10**20, "height": 16}, 400, "width"),
    ({"guidance_scale": 25}, 400, "guidance_scale"),
    ({"response_format": "url"}, 400, "response_format"),
    ({"scheduler": "no-such-sampler"}, 400, "scheduler"),
    ({"model": "no-such-model"}, 404, "model"),
    ({"model": LLM}, 400, "model"),          # a chat model on the images route
])
def test_bad_requests(http, fields, status, param):
    assert_error(http.post(URL, json=body(**fields)), status, param)
    assert len(generate(http)) == 1  # still serving


def test_image_model_on_chat_routes(http):
    chat = {"model": SD, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert_error(http.post("/v1/chat/completions", json=chat), 400, "model")
    assert_error(http.post("/v1/completions", json={"model": SD, "prompt": "hi"}), 400, "model")
    assert http.post("/v1/completions", json={"model": LLM, "prompt": "hi", "max_tokens": 2}).status_code == 200
    models = http.get("/v1/models").json()["data"]
    assert {m["id"] for m in models} == {SD, XL, PIXEL, LLM}
    assert {m["id"]: m["max_model_len"] for m in models}[SD] is None


def test_metrics_counts(server, http):
    before = wait_idle(server)
    for seed in range(3):
        generate(http, n=2, seed=seed)
    generate(http, size="24x16")
    after = wait_idle(server)
    assert delta(before, after, "images_generated_total", model_name=SD, size="16x16", steps=str(STEPS)) == 6
    assert delta(before, after, "images_generated_total", model_name=SD, size="24x16", steps=str(STEPS)) == 1
    assert delta(before, after, "image_generation_seconds_count", model_name=SD) == 4
    assert delta(before, after, "image_queue_time_seconds_count", model_name=SD) == 4
    assert delta(before, after, "image_generation_seconds_sum", model_name=SD) > 0
    # sequential requests: one pipeline call each
    assert delta(before, after, "text_encode_seconds_count", model_name=SD) == 4
    assert delta(before, after, "vae_decode_seconds_count", model_name=SD) == 4
    assert delta(before, after, "denoise_step_seconds_count", model_name=SD) == 4 * STEPS


def test_queue_full_429(server):
    async def flood():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            blocker = asyncio.ensure_future(c.post(URL, json=body(num_inference_steps=LONG)))
            await asyncio.sleep(0.1)
            queued = asyncio.ensure_future(c.post(URL, json=body(n=MAX_QUEUED)))
            await asyncio.sleep(0.1)
            over = await c.post(URL, json=body())
            return over, await queued, await blocker

    over, queued, blocker = asyncio.run(flood())
    assert_error(over, 429)
    assert over.headers["retry-after"]
    assert queued.status_code == 200 and len(queued.json()["data"]) == MAX_QUEUED
    assert blocker.status_code == 200


def test_disconnect_cancels_waiting_and_running(server, http):
    # Clients disconnect once /metrics shows their request in the state under test, not after a fixed
    # client timeout, which a fast or a loaded machine can each make miss that state.
    def gauge(state: str):
        return lambda s: metric(s, f"leanserve:image_requests_{state}", model_name=SD) >= 1

    async def waiting_then_gone():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            blocker = asyncio.ensure_future(c.post(URL, json=body(num_inference_steps=LONG)))
            await until_metrics(server.url, "the blocker to run", gauge("running"))
            # waits behind the blocker (another step count cannot join its batch); gone before it starts
            impatient = asyncio.ensure_future(c.post(URL, json=body(num_inference_steps=7)))
            await until_metrics(server.url, "a request to wait", gauge("waiting"))
            impatient.cancel()
            assert (await blocker).status_code == 200

    async def running_then_gone():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            gone = asyncio.ensure_future(c.post(URL, json=body(num_inference_steps=LONG)))
            await until_metrics(server.url, "the request to run", gauge("running"))
            gone.cancel()

    before = wait_idle(server)
    asyncio.run(waiting_then_gone())
    middle = wait_idle(server)
    assert delta(before, middle, "denoise_step_seconds_count", model_name=SD) == LONG  # the waiting one never ran
    asyncio.run(running_then_gone())
    after = wait_idle(server)
    assert 0 < delta(middle, after, "denoise_step_seconds_count", model_name=SD) < LONG  # stopped early
    assert delta(before, after, "images_generated_total", model_name=SD, size="16x16", steps=str(LONG)) == 1
    assert delta(before, after, "images_generated_total", model_name=SD, size="16x16", steps="7") == 0
    assert len(generate(http)) == 1


def test_sigterm_drains_then_aborts(tmp_path):
    """SIGTERM: the running request finishes within --shutdown-timeout, the ones behind it are
    aborted with a 503 in the envelope, and the process exits cleanly."""
    # Margins both ways, so that neither a loaded CI box nor a fast idle one can flip the outcome: the
    # short request is 2 steps at 16x16 (milliseconds); all are in flight when SIGTERM comes (the long
    # ones may already run), so together they must outlast the 1 s drain: three requests of 200 steps of
    # eight 32x16 images (~50x the work of LONG at one 16x16 image, which takes ~0.3 s on a fast VM).
    with remote_server(build_tiny_pipeline(tmp_path / "sd"), "--served-model-name", SD,
                       "--shutdown-timeout", "1") as server:
        async def run():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
                short = asyncio.ensure_future(c.post(URL, json=body()))
                await asyncio.sleep(0.1)
                longs = [asyncio.ensure_future(c.post(URL, json=body(num_inference_steps=LONG, n=8, size="32x16",
                                                                     seed=seed)))
                         for seed in range(3)]
                await asyncio.sleep(0.1)
                server.proc.send_signal(signal.SIGTERM)
                return await short, await asyncio.gather(*longs)

        short, longs = asyncio.run(run())
        assert short.status_code == 200 and len(short.json()["data"]) == 1
        for long in longs:
            assert_error(long, 503)
        assert server.proc.wait(timeout=30) == 0
