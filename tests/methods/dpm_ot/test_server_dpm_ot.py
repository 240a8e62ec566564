"""Sampler "dpm-ot" on /v1/images/generations of a real `leanserve serve` process: a tiny pixel teacher
with an OT map fitted by `leanserve train dpm-ot`, served next to the same teacher without one. The
served images are the OT jump + K steps of dpm_ot_generate, the same alone or batched; K is
num_inference_steps; a model without a map answers 400 and the server keeps serving."""
from __future__ import annotations

import asyncio
import shutil

import httpx
import numpy as np
import pytest
import torch
from server_utils import metric, remote_server, scrape
from image_builders import (
    PIXEL_NATIVE,
    URL,
    assert_error,
    build_tiny_pixel_pipeline,
    decode,
    same,
)
from torch_threads import single_thread

from leanserve.cli import main
from leanserve.errors import UserError
from leanserve.models.dpm_ot_sampler import OT_MAP_FILE, OTMap, dpm_ot_generate
from leanserve.models.image_pipeline import load_image_pipeline, load_ot_map

OT, PLAIN = "tiny-dpm-ot", "tiny-pixel"
T_PRIME = 100
STEPS = 3
LONG = 200
PROMPT = "a small red circle"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    teacher = build_tiny_pixel_pipeline(tmp_path_factory.mktemp("teacher") / "pipe")
    out = tmp_path_factory.mktemp("ot") / "dpm-ot"
    with single_thread():
        assert main(["train", "dpm-ot", "--model", str(teacher), "--out", str(out), "--t-prime", str(T_PRIME),
                     "--targets", "data", "--num-targets", "8", "--max-iters", "200", "--tol-max-rel", "0.5",
                     "--device", "cpu"]) == 0
    return {OT: out, PLAIN: teacher}


@pytest.fixture(scope="module")
def server(model_dirs):
    with remote_server(model_dirs[OT], "--model", str(model_dirs[PLAIN]), "--served-model-name", OT,
                       "--served-model-name", PLAIN, "--max-image-batch", "4") as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def body(**kw) -> dict:
    return {"model": OT, "prompt": PROMPT, "sampler": "dpm-ot", "num_inference_steps": STEPS, **kw}


def generate(http, **kw) -> list[np.ndarray]:
    r = http.post(URL, json=body(**kw))
    assert r.status_code == 200, r.text
    return [decode(item) for item in r.json()["data"]]


def delta(before: dict, after: dict, name: str, model: str = OT) -> float:
    return metric(after, f"leanserve:{name}", model_name=model) - metric(before, f"leanserve:{name}", model_name=model)


def reference(model_dir, seeds: list[int], steps: int) -> list[np.ndarray]:
    """dpm_ot_generate in this process, one generator per image as the engine seeds them."""
    pipe = load_image_pipeline(model_dir)
    images = dpm_ot_generate(pipe, OTMap.load(model_dir / OT_MAP_FILE), [PROMPT] * len(seeds),
                             num_inference_steps=steps, guidance_scale=3.0,  # the pipeline's default guidance
                             generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    return list((np.asarray(images) * 255).round().clip(0, 255).astype(np.int16))


def test_dpm_ot_serves_the_jump_then_k_steps(server, http, model_dirs):
    before = scrape(server.url)
    images = generate(http, n=2, seed=7)
    after = scrape(server.url)
    assert [img.shape for img in images] == [(PIXEL_NATIVE, PIXEL_NATIVE, 3)] * 2
    expected = reference(model_dirs[OT], [7, 8], STEPS)
    assert same(images[0], expected[0]) and same(images[1], expected[1])
    assert not same(images[0], images[1])
    # one pipeline call: K network steps (the jump costs none), one text encoding
    assert delta(before, after, "denoise_step_seconds_count") == STEPS
    assert delta(before, after, "text_encode_seconds_count") == 1
    # `scheduler` is the same setting; another sampler with the same seed and steps is another image
    r = http.post(URL, json={**body(seed=7), "sampler": None, "scheduler": "dpm-ot"})
    assert r.status_code == 200 and same(decode(r.json()["data"][0]), images[0])
    assert not same(generate(http, seed=7, sampler="ddpm")[0], images[0])


@pytest.mark.parametrize("steps", [1, 5])
def test_num_inference_steps_is_k(server, http, model_dirs, steps):
    before = scrape(server.url)
    image = generate(http, seed=3, num_inference_steps=steps)[0]
    assert delta(before, scrape(server.url), "denoise_step_seconds_count") == steps
    assert same(image, reference(model_dirs[OT], [3], steps)[0])


def test_seeds_alone_and_batched(server, http):
    alone = generate(http, n=2, seed=11)
    before = scrape(server.url)

    async def concurrent():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            # a long request with another sampler keeps the worker busy until the three below all wait
            blocker = asyncio.ensure_future(c.post(URL, json=body(sampler="ddim", num_inference_steps=LONG)))
            await asyncio.sleep(0.2)
            rs = await asyncio.gather(c.post(URL, json=body(n=2, seed=11)), c.post(URL, json=body(seed=12)),
                                      c.post(URL, json=body(seed=4)))
            assert (await blocker).status_code == 200
        return rs

    rs = asyncio.run(concurrent())
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    batched = [decode(item) for r in rs for item in r.json()["data"]]
    assert same(batched[0], alone[0]) and same(batched[1], alone[1]) and same(batched[2], alone[1])
    assert not same(batched[3], alone[0])
    after = scrape(server.url)
    # 2 pipeline calls: the blocker, then the 4 dpm-ot images together
    assert delta(before, after, "text_encode_seconds_count") == 2
    assert delta(before, after, "denoise_step_seconds_count") == LONG + STEPS


@pytest.mark.parametrize("field", ["sampler", "scheduler"])
def test_model_without_a_map_is_a_400(http, field):
    r = http.post(URL, json={"model": PLAIN, "prompt": PROMPT, field: "dpm-ot", "num_inference_steps": STEPS})
    assert_error(r, 400, "scheduler")
    assert "dpm-ot" in r.json()["error"]["message"] and "OT map" in r.json()["error"]["message"]
    # still serving, both models
    assert len(generate(http, model=PLAIN, sampler=None)) == 1
    assert len(generate(http)) == 1


def test_k_beyond_t_prime_is_a_400(http):
    r = http.post(URL, json=body(num_inference_steps=T_PRIME + 1))
    assert_error(r, 400, "num_inference_steps")
    assert f"t′ = {T_PRIME}" in r.json()["error"]["message"]
    assert len(generate(http, num_inference_steps=T_PRIME)) == 1


def test_load_ot_map_refuses_a_map_that_does_not_fit(model_dirs, tmp_path):
    pipe = load_image_pipeline(model_dirs[PLAIN])
    assert load_ot_map(model_dirs[PLAIN], pipe) is None
    assert load_ot_map(model_dirs[OT], pipe).t_prime == T_PRIME
    broken = shutil.copytree(model_dirs[OT], tmp_path / "broken")
    ot_map = OTMap.load(broken / OT_MAP_FILE)
    ot_map.alpha_bar = 0.5
    ot_map.save(broken / OT_MAP_FILE)
    with pytest.raises(UserError, match="built for"):
        load_ot_map(broken, pipe)
    (broken / OT_MAP_FILE).unlink()
    with pytest.raises(UserError, match="missing"):
        load_ot_map(broken, pipe)
