"""A real `leanserve serve` serving a `leanserve compress moa` output directory through the OpenAI API:
the masked dense reference's tokens, and kv_cache_usage_perc counting the plan's pages exactly
while a request runs (all of them from admission on) and none once it ends."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from moa_dirs import masked_dense_greedy
from server_utils import metric, remote_server, scrape

from leanserve.cli import main
from leanserve.models.loader import load_model
from leanserve.models.moa_plan import PLAN_FILE, kv_blocks, load_plan

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL, NUM_BLOCKS, BLOCK = "moa", 400, 16


@pytest.fixture(scope="module")
def moa_dir(tiny_llm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("moa") / "out"
    assert main(["compress", "moa", "--model", str(tiny_llm_dir), "--out", str(out), "--density", "0.5",
                 "--profile-lengths", "192,256,320", "--block-size", "16", "--items", "2", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    return out


def test_compressed_dir_serves_the_plan_through_the_api(tiny_llm_dir, moa_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(moa_dir)
    plan = load_plan(moa_dir / PLAN_FILE)
    prompt = tokenizer("39 + 35 = 74 and 3 + 28 = 31, so 7 + 14 = 21 and 12 + 5 = 17 while 8 + 8 = 16")["input_ids"]
    dense, _ = load_model(str(tiny_llm_dir), "cpu", torch.float32)
    want = masked_dense_greedy(dense, plan, prompt, 8)
    args = ("--served-model-name", MODEL, "--max-model-len", "512", "--block-size", str(BLOCK), "--num-kv-blocks",
            str(NUM_BLOCKS), "--dtype", "float32", "--device", "cpu", "--max-num-seqs", "1")
    with remote_server(moa_dir, *args) as server:
        client = openai.OpenAI(base_url=server.api_url, api_key="unused")
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)

        # one request at a time: whenever one runs, usage is its pages exactly, sized for prompt + max_tokens
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 150, "ignore_eos": True}
        pages = sum(kv_blocks(a, b, len(prompt) + 150, BLOCK)
                    for la, lb in zip(plan.alphas, plan.betas) for a, b in zip(la, lb))
        dense_blocks = 2 * 2 * -(-(len(prompt) + 150) // BLOCK)  # layers x KV heads x token blocks
        assert pages < dense_blocks
        with ThreadPoolExecutor(2) as pool:
            done = [pool.submit(httpx.post, server.api_url + "/completions", json=body, timeout=120) for _ in range(2)]
            seen = []
            while not all(f.done() for f in done):
                samples = scrape(server.url)
                seen.append((metric(samples, "leanserve:num_requests_running", model_name=MODEL),
                             metric(samples, "leanserve:kv_cache_usage_perc", model_name=MODEL)))
            assert all(f.result().status_code == 200 for f in done)
        held = {round(usage * NUM_BLOCKS) for n, usage in seen if n == 1}
        assert held == {pages}, (pages, seen)
        deadline = time.monotonic() + 30
        while metric(scrape(server.url), "leanserve:kv_cache_usage_perc", model_name=MODEL) != 0:
            assert time.monotonic() < deadline, "pages not freed"
            time.sleep(0.05)
