"""`train rlvr` end to end on the CPU: an SFT'd tiny policy (tagged answers) trained by GRPO on a static
mixture, its record (mixture, reward and eval curves, plot), an exact resume, bad options, and the result
served by a real `leanserve serve`."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from lm_builders import write_corpus
from server_utils import remote_server
from torch_threads import single_thread

from leanserve.cli import main

GROUPS = "arith=tasks:add+sub,sort=tasks:sort,reverse=tasks:reverse"
RLVR = ["--device", "cpu", "--groups", GROUPS, "--mixture", "static:arith=2,sort=1,reverse=1", "--steps", "4",
        "--prompts", "4", "--group-size", "4", "--max-new-tokens", "12", "--eval-prompts", "4", "--eval-every", "2",
        "--lr", "1e-3", "--seed", "1"]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A tiny policy that has seen the tagged answer format (chat phase only): some sampled replies parse,
    so the format reward varies within groups and GRPO has a gradient."""
    root = write_corpus(tmp_path_factory.mktemp("rlvr"), answer_tags=True)
    with single_thread():
        assert main(["train", "lm", "--data", str(root / "data"), "--tokenizer", str(root / "tok"),
                     "--out", str(root / "sft"), "--device", "cpu", "--preset", "tiny", "--batch-size", "8",
                     "--seq-len", "64", "--lr", "3e-3", "--chat-lr", "1e-2", "--pretrain-steps", "0",
                     "--chat-steps", "25", "--eval-batches", "1", "--eval-every", "1000", "--seed", "0"]) == 0
    return root


def rlvr(root: Path, out: Path, *flags: str) -> int:
    with single_thread():
        return main(["train", "rlvr", "--from", str(root / "sft"), "--data", str(root / "data"), "--out", str(out),
                     *RLVR, *flags])


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(model_dir / "model.safetensors")


@pytest.fixture(scope="module")
def straight(sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "rl"
    assert rlvr(sft, out) == 0
    return out


def test_records_mixture_and_curves_and_resumes_exactly(sft, straight, tmp_path):
    record = json.loads((straight / "leanserve.json").read_text())
    mixture = record["settings"]["mixture"]
    assert mixture["kind"] == "static"
    assert mixture["groups"] == {"arith": "tasks:add+sub", "sort": "tasks:sort", "reverse": "tasks:reverse"}
    assert mixture["weights"] == pytest.approx({"arith": 0.5, "sort": 0.25, "reverse": 0.25})
    assert record["method"] == "dense" and record["settings"]["rlvr"]["group_size"] == 4
    assert "--mixture static:arith=2,sort=1,reverse=1" in record["recipe"]["command"]
    assert record["base"]["path"] == str(sft / "sft")
    curve = record["metrics"]["reward_history"]
    assert [r["step"] for r in curve] == [1, 2, 3, 4]
    assert all(0 <= r["accuracy"] <= r["format"] <= 1 and r["reward"] <= 3 for r in curve)
    assert any(0 < r["format"] for r in curve)  # some replies parse: the run had a signal
    assert [h["step"] for h in record["metrics"]["val_history"]] == [0, 2, 4]
    assert set(record["metrics"]["val"]) == {"arith", "sort", "reverse"}
    assert (straight / "rewards.png").stat().st_size > 0
    before, after = weights(sft / "sft"), weights(straight)
    assert any(not torch.equal(before[k], after[k]) for k in after)

    resumed = tmp_path / "resumed"
    assert rlvr(sft, resumed, "--stop-at", "2", "--save-every", "2") == 0
    assert not (resumed / "config.json").exists() and (resumed / "checkpoint.pt").is_file()
    assert rlvr(sft, resumed, "--resume", "--save-every", "2") == 0
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed_record = json.loads((resumed / "leanserve.json").read_text())
    assert resumed_record["metrics"]["reward_history"] == record["metrics"]["reward_history"]


@pytest.mark.parametrize("flags, message", [
    (["--mixture", "aioli"], "pretraining mixture"),
    (["--groups", "code"], "unknown domain"),
    (["--group-size", "1"], "group-size"),
    (["--mixture", "static:arith=1"], "give every group a weight"),
])
def test_bad_options_are_one_line(sft, tmp_path, capsys, flags, message):
    assert rlvr(sft, tmp_path / "bad", *flags) == 2
    assert message in capsys.readouterr().err


def test_rlvr_model_serves_with_its_mixture(straight):
    args = ("--served-model-name", "rl", "--max-model-len", "128", "--block-size", "16", "--num-kv-blocks", "32",
            "--max-num-seqs", "2", "--dtype", "float32", "--device", "cpu")
    with remote_server(straight, *args) as server:
        r = httpx.post(server.api_url + "/chat/completions", timeout=60, json={
            "model": "rl", "messages": [{"role": "user", "content": "What is 12 + 30?"}], "max_tokens": 8,
            "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
    assert json.loads((straight / "leanserve.json").read_text())["settings"]["mixture"]["kind"] == "static"
