"""A SiD few-step generator (`leanserve distill sid` on a tiny pixel teacher) on /v1/images/generations of a
real `leanserve serve` process: PNGs at 1..K steps equal to the in-process SiDPipeline's, the same image
alone or batched, 400 for steps outside 1..K, guidance, a negative prompt or a sampler; the server keeps
serving. Also the loader: SiD directories are built by leanserve's own class and refuse samplers."""
from __future__ import annotations

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
from test_sid import distill
from torch_threads import single_thread

from leanserve.models.image_pipeline import (
    load_image_pipeline,
    pipeline_class_name,
    set_sampler,
)
from leanserve.models.sid_pipeline import SiDPipeline

SID = "tiny-sid"
K = 2  # test_sid's FLAGS distill with --steps 2
PROMPT = "a small red circle"


@pytest.fixture(scope="module")
def sid_dir(tmp_path_factory):
    teacher = build_tiny_pixel_pipeline(tmp_path_factory.mktemp("teacher") / "pipe")
    out = tmp_path_factory.mktemp("sid") / "generator"
    with single_thread():
        assert distill(teacher, out, "--iterations", "1") == 0
    return out


@pytest.fixture(scope="module")
def server(sid_dir):
    with remote_server(sid_dir, "--served-model-name", SID, "--max-image-batch", "4") as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def generate(http, **kw) -> list[np.ndarray]:
    r = http.post(URL, json={"model": SID, "prompt": PROMPT, **kw})
    assert r.status_code == 200, r.text
    return [decode(item) for item in r.json()["data"]]


def reference(pipe, seeds: list[int], steps: int) -> list[np.ndarray]:
    """The generator in this process, one generator per image as the engine seeds them."""
    images = pipe([PROMPT] * len(seeds), num_inference_steps=steps, output_type="np",
                  generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    return list((np.asarray(images) * 255).round().clip(0, 255).astype(np.int16))


def test_loader_builds_our_sid_pipeline_and_refuses_samplers(sid_dir):
    assert pipeline_class_name(sid_dir) == "SiDPipeline"
    assert (sid_dir / "sid_pipeline.py").is_file()  # saved beside the weights, never imported
    pipe = load_image_pipeline(sid_dir)
    assert type(pipe) is SiDPipeline and pipe.config.num_steps == K
    scheduler = pipe.scheduler
    with pytest.raises(ValueError, match="no sampler"):
        set_sampler(pipe, "ddim")
    assert pipe.scheduler is scheduler


def test_png_at_1_and_k_steps_match_the_generator(http, sid_dir):
    pipe = load_image_pipeline(sid_dir)
    served = {}
    for steps in (1, K):
        served[steps] = generate(http, n=2, seed=7, num_inference_steps=steps)
        assert [img.shape for img in served[steps]] == [(PIXEL_NATIVE, PIXEL_NATIVE, 3)] * 2
        expected = reference(pipe, [7, 8], steps)
        assert same(served[steps][0], expected[0]) and same(served[steps][1], expected[1])
    assert not same(served[1][0], served[K][0]) and not same(served[K][0], served[K][1])
    # the default is all K steps, with the neutral guidance values accepted
    assert same(generate(http, seed=7)[0], served[K][0])
    assert same(generate(http, seed=7, guidance_scale=1.0)[0], served[K][0])
    assert same(generate(http, seed=7, guidance_scale=0)[0], served[K][0])


def test_same_seed_alone_and_batched(server, http):
    alone = [generate(http, seed=s)[0] for s in (20, 21, 22)]
    before = scrape(server.url)
    batched = generate(http, n=3, seed=20)  # image i uses seed 20 + i, all three in one pipeline call
    after = scrape(server.url)
    name = "leanserve:text_encode_seconds_count"
    assert metric(after, name, model_name=SID) - metric(before, name, model_name=SID) == 1
    assert all(same(b, a) for b, a in zip(batched, alone))
    assert not same(alone[0], alone[1])


@pytest.mark.parametrize("fields, param, words", [
    ({"num_inference_steps": K + 1}, "num_inference_steps", f"1..{K}"),
    ({"num_inference_steps": 0}, "num_inference_steps", f"1..{K}"),
    ({"guidance_scale": 4}, "guidance_scale", "guidance"),
    ({"negative_prompt": "blurry"}, "negative_prompt", "negative_prompt"),
    ({"sampler": "ddim"}, "scheduler", "no sampler"),
    ({"scheduler": "dpm-ot"}, "scheduler", "no sampler"),
])
def test_bad_params_are_400_and_the_server_keeps_serving(http, fields, param, words):
    r = http.post(URL, json={"model": SID, "prompt": PROMPT, **fields})
    assert_error(r, 400, param)
    assert words in r.json()["error"]["message"]
    assert len(generate(http, seed=1, num_inference_steps=1)) == 1
