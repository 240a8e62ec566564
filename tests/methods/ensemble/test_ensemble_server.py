"""A real `leanserve serve` (uvicorn + engine core process) serving an ensemble directory: mixture
logprobs through the official openai client, sane KV-cache usage, sequence_sample through
--model-setting, and startup errors as one line."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from ensemble_dirs import build_ensemble_dir, greedy, member_models, mixture_logprobs
from server_utils import metric, remote_server, scrape

from leanserve.models.ensemble_dir import MEMBERS_FILE, read_members, write_members
from leanserve.models.model_dir import load_model_info
from leanserve.server.serve import parse_model_settings

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL, S, NUM_BLOCKS, BLOCK = "ens", 3, 160, 4
SERVER_ARGS = ("--served-model-name", MODEL, "--max-model-len", "512", "--block-size", str(BLOCK),
               "--num-kv-blocks", str(NUM_BLOCKS), "--dtype", "float32", "--device", "cpu")


@pytest.fixture(scope="module")
def ens_dir(tiny_llm_dir, tmp_path_factory):
    return build_ensemble_dir(tiny_llm_dir, tmp_path_factory.mktemp("ens") / "ens", num_members=S, scope="last:1")


@pytest.fixture(scope="module")
def models(ens_dir):
    return member_models(ens_dir)


@pytest.fixture(scope="module")
def tokenizer(ens_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(ens_dir)


def mixture_greedy(models, prompt: list[int], max_tokens: int) -> tuple[list[int], torch.Tensor]:
    """The naive mixture's greedy tokens and its log p̄ rows that chose them."""
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(mixture_logprobs(models, ids)[-1].argmax()))
    return ids[len(prompt):], mixture_logprobs(models, ids)[len(prompt) - 1:-1]


def test_token_mean_serves_mixture_logprobs_and_sane_kv_usage(ens_dir, models, tokenizer):
    prompt = tokenizer("Wrap text: the textwrap module")["input_ids"]
    tokens, rows = mixture_greedy(models, prompt, 8)
    with remote_server(ens_dir, *SERVER_ARGS, "--max-num-seqs", "1") as server:
        client = openai.OpenAI(base_url=server.api_url, api_key="unused")
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=3,
                                      extra_body={"ignore_eos": True})
        lp = r.choices[0].logprobs
        assert r.choices[0].text == tokenizer.decode(tokens, skip_special_tokens=True)
        assert lp.token_logprobs == pytest.approx([float(row[t]) for row, t in zip(rows, tokens)], abs=1e-4)
        for top, row in zip(lp.top_logprobs, rows):
            assert sorted(top.values(), reverse=True) == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "1 + 2 ="}],
                                              max_tokens=4, temperature=0, logprobs=True)
        assert chat.choices[0].logprobs.content[0].logprob <= 0

        # one sequence at a time, several queued: whenever one runs, usage counts its blocks, one
        # block table for all members (S tables would read S x as much)
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 120, "ignore_eos": True}
        with ThreadPoolExecutor(4) as pool:
            done = [pool.submit(httpx.post, server.api_url + "/completions", json=body, timeout=120) for _ in range(4)]
            seen = []
            while not all(f.done() for f in done):
                samples = scrape(server.url)
                seen.append((metric(samples, "leanserve:num_requests_running", model_name=MODEL),
                             metric(samples, "leanserve:kv_cache_usage_perc", model_name=MODEL)))
            assert all(f.result().status_code == 200 for f in done)
        held = [round(usage * NUM_BLOCKS) for n, usage in seen if n == 1]  # blocks, exactly
        blocks = [-(-n // BLOCK) for n in (len(prompt) + 1, len(prompt) + 120)]
        assert held and all(blocks[0] <= h <= blocks[1] for h in held), (blocks, seen)
        assert all(usage * NUM_BLOCKS <= blocks[1] + 1e-6 for _, usage in seen), (blocks, seen)
        info = [labels for (name, labels) in samples if name == "leanserve:cache_config_info"]
        assert ("num_gpu_blocks", str(NUM_BLOCKS)) in info[0]
        deadline = time.monotonic() + 30
        while metric(scrape(server.url), "leanserve:kv_cache_usage_perc", model_name=MODEL) != 0:
            assert time.monotonic() < deadline, "blocks not freed"
            time.sleep(0.05)


def test_sequence_sample_through_model_setting(ens_dir, models, tokenizer):
    prompt = tokenizer("The json module")["input_ids"]
    outputs = [greedy(m, prompt, 8) for m in models]
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
    assert len(set(texts)) == S  # the members disagree, so a completion shows which one it ran
    with remote_server(ens_dir, *SERVER_ARGS, "--model-setting", "ensemble_mode=sequence_sample") as server:
        r = httpx.post(server.api_url + "/completions", timeout=60, json={
            "model": MODEL, "prompt": prompt, "n": 6, "seed": 5, "temperature": 0, "max_tokens": 8,
            "ignore_eos": True, "logprobs": 0})
        assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    drawn = [texts.index(c["text"]) for c in choices]  # each choice is one member's own greedy output
    assert len(set(drawn)) > 1  # the n choices draw their members independently
    for c, s in zip(choices, drawn):
        logits = models[s](torch.tensor([prompt + outputs[s]])).logits[0, len(prompt) - 1:-1]
        want = logits.log_softmax(-1).gather(1, torch.tensor(outputs[s])[:, None])[:, 0]
        assert c["logprobs"]["token_logprobs"] == pytest.approx(want.tolist(), abs=1e-4)


def test_parse_model_settings():
    assert parse_model_settings(["mode=fast", "k=3", "w=[1, 2]", "on=true", "s=\"3\""]) == {
        "mode": "fast", "k": 3, "w": [1, 2], "on": True, "s": "3"}
    assert parse_model_settings(["a=b=c"]) == {"a": "b=c"}


def _truncate_members(d):
    path = d / MEMBERS_FILE
    path.write_bytes(path.read_bytes()[:100])


def _drop_a_member(d):
    members = read_members(d, load_model_info(d).settings)
    write_members(d, members[:-1], torch.float32)


@pytest.mark.parametrize("damage, args, message", [
    (None, ("--model-setting", "ensemble_mode=logit_mean"), "ensemble_mode must be one of token_mean, sequence_sample"),
    (None, ("--model-setting", "ensemble_mode"), "--model-setting takes KEY=VALUE, got 'ensemble_mode'"),
    (_truncate_members, (), f"{MEMBERS_FILE}: "),
    (_drop_a_member, (), f"{MEMBERS_FILE} does not match leanserve.json's members"),
])
def test_startup_errors_are_one_line(ens_dir, tmp_path, damage, args, message):
    import shutil
    model_dir = shutil.copytree(ens_dir, tmp_path / "ens")
    if damage is not None:
        damage(model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "leanserve.cli", "serve", "--model", str(model_dir), "--device", "cpu",
                           "--jobs-dir", "", *args], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("leanserve serve: error: ") and message in last, last
