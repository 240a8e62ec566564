"""`leanserve compress moa` end to end on a tiny Llama (CPU, seconds): a model directory that loads as
the input did, a valid plan within its density budget, --stop-at / --resume giving the same plan,
and a real `leanserve serve` serving it through the OpenAI API: the masked dense reference's tokens,
and kv_cache_usage_perc counting the plan's pages exactly while a request runs (all of them from
admission on) and none once it ends."""
from __future__ import annotations

import json
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
from leanserve.models.model_dir import file_sha256, load_model_info, weights_sha256
from leanserve.models.moa_plan import PLAN_FILE, kv_blocks, load_plan

pytestmark = pytest.mark.usefixtures("one_thread")
LENGTHS = (192, 256, 320)
MODEL, NUM_BLOCKS, BLOCK = "moa", 400, 16  # served name; the server's KV pages and their size
LONG = 64  # max_tokens of the requests whose pages are watched


def _args(model, out, *extra):
    return ["compress", "moa", "--model", str(model), "--out", str(out), "--density", "0.5",
            "--profile-lengths", ",".join(map(str, LENGTHS)), "--block-size", "16", "--items", "2",
            "--max-new-tokens", "4", "--device", "cpu", "--ablation-plans", *extra]


@pytest.fixture(scope="module")
def compressed(tiny_llm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("moa") / "out"
    assert main(_args(tiny_llm_dir, out)) == 0
    return out


def test_output_is_the_input_model_with_a_valid_plan(tiny_llm_dir, compressed):
    from transformers import AutoConfig, AutoModelForCausalLM

    assert file_sha256(compressed / "model.safetensors") == file_sha256(tiny_llm_dir / "model.safetensors")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (compressed / name).read_bytes() == (tiny_llm_dir / name).read_bytes()
    assert not (compressed / "moa_work").exists()
    AutoModelForCausalLM.from_pretrained(compressed)  # loads anywhere the input did

    plan = load_plan(compressed / PLAN_FILE, AutoConfig.from_pretrained(compressed))
    assert plan.unit == "kv_head" and plan.block_size == 16 and plan.rule_cap_per_layer == 2
    assert plan.profile_lengths == list(LENGTHS) and plan.extend_length == 640 and plan.validation_length == 480
    for n in plan.lengths():
        assert 0.9 * 0.5 - 1e-9 <= plan.density(n) <= 0.5 + 1e-9
        assert plan.density_at[str(n)] == pytest.approx(plan.density(n))

    info = load_model_info(compressed)
    assert info.kind == "llm" and info.method == "moa"
    assert info.settings["plan"] == PLAN_FILE and info.settings["density_at"] == plan.density_at
    assert info.base["sha256"] == weights_sha256(tiny_llm_dir)
    ce = info.metrics["validation_ce"]
    assert set(ce) == {"dense", "uniform", "moa"} and ce["moa"] == plan.validation_ce
    assert ce["moa"] == min(p["validation_ce"] for p in info.metrics["pareto"])
    assert "--profile-lengths 192,256,320" in info.recipe["command"]

    # the ablation ladder's middle steps: alpha-0 rules within the same budget, one rule per layer first
    assert set(info.settings["ablation_plans"]) == {"per-layer", "per-head"}
    for step, file in info.settings["ablation_plans"].items():
        ladder = load_plan(compressed / file, AutoConfig.from_pretrained(compressed))
        assert all(a == 0 for layer in ladder.alphas for a in layer)
        assert ladder.rule_cap_per_layer == (1 if step == "per-layer" else 2)
        assert all(0.9 * 0.5 - 1e-9 <= ladder.density(n) <= 0.5 + 1e-9 for n in ladder.lengths())
        assert info.metrics["ablation"][step]["validation_ce"] == ladder.validation_ce
    assert json.loads((compressed / "progress.json").read_text())["done"]


def test_stop_and_resume_give_the_same_plan(tiny_llm_dir, compressed, tmp_path):
    out = tmp_path / "out"
    assert main(_args(tiny_llm_dir, out, "--stop-at", "2")) == 0
    progress = json.loads((out / "progress.json").read_text())
    assert progress["checkpoint_step"] == 2 and not progress["done"]
    assert not (out / "leanserve.json").exists()
    assert main(_args(tiny_llm_dir, out)) == 2  # an unfinished run there: --resume or another --out
    assert main(_args(tiny_llm_dir, out, "--resume", "--seed", "3")) == 2  # options that change the plan
    assert main(_args(tiny_llm_dir, out, "--resume")) == 0
    straight, resumed = (json.loads((d / PLAN_FILE).read_text()) for d in (compressed, out))
    assert resumed == straight


def test_refuses_what_it_cannot_compress(tiny_llm_dir, compressed, tmp_path):
    assert main(_args(tiny_llm_dir, compressed)) == 2  # already holds a model
    assert main(_args(compressed, tmp_path / "again")) == 2  # not a dense model
    assert main(_args(tiny_llm_dir, tmp_path / "x", "--block-size", "24")) == 2
    too_long = _args(tiny_llm_dir, tmp_path / "y")
    too_long[too_long.index("--profile-lengths") + 1] = "256,512"  # validation at 768 > 512 positions
    assert main(too_long) == 2


def test_compressed_dir_serves_the_plan_through_the_api(tiny_llm_dir, compressed):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(compressed)
    plan = load_plan(compressed / PLAN_FILE)
    prompt = tokenizer("39 + 35 = 74 and 3 + 28 = 31, so 7 + 14 = 21 and 12 + 5 = 17 while 8 + 8 = 16")["input_ids"]
    dense, _ = load_model(str(tiny_llm_dir), "cpu", torch.float32)
    want = masked_dense_greedy(dense, plan, prompt, 8)
    args = ("--served-model-name", MODEL, "--max-model-len", "512", "--block-size", str(BLOCK), "--num-kv-blocks",
            str(NUM_BLOCKS), "--dtype", "float32", "--device", "cpu", "--max-num-seqs", "1")
    with remote_server(compressed, *args) as server:
        client = openai.OpenAI(base_url=server.api_url, api_key="unused")
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)

        # one request at a time: whenever one runs, usage is its pages exactly, sized for prompt + max_tokens
        body = {"model": MODEL, "prompt": prompt, "max_tokens": LONG, "ignore_eos": True}
        pages = sum(kv_blocks(a, b, len(prompt) + LONG, BLOCK)
                    for la, lb in zip(plan.alphas, plan.betas) for a, b in zip(la, lb))
        dense_blocks = 2 * 2 * -(-(len(prompt) + LONG) // BLOCK)  # layers x KV heads x token blocks
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
