"""`train lm --groups ... --mixture ...` end to end on the CPU: Aioli's record and plot, an exact resume
from inside a LearnParams phase, the Aioli-trained model served by a real `leanserve serve`, the static
mixture, and bad options."""
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

FLAGS = ["--device", "cpu", "--preset", "tiny", "--batch-size", "8", "--seq-len", "64", "--lr", "3e-3",
         "--eval-batches", "1", "--chat-steps", "0", "--group-eval-seqs", "4", "--seed", "3"]
GROUPS = ["--groups", "code,docs,arith=tasks:add+sub"]
# 3 groups x 1 sweep x 2 steps = 6 LearnParams steps in each 10-step round: 2 rounds estimate A in 24 steps
AIOLI = [*GROUPS, "--mixture", "aioli", "--pretrain-steps", "24", "--aioli-round-steps", "10",
         "--aioli-sweeps", "1", "--aioli-lp-steps", "2", "--aioli-eta", "2", "--eval-every", "12"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("mixing"))


def train(corpus: Path, out: Path, *flags: str) -> int:
    with single_thread():
        return main(["train", "lm", "--data", str(corpus / "data"), "--tokenizer", str(corpus / "tok"),
                     "--out", str(out), *FLAGS, *flags])


def info(model_dir: Path) -> dict:
    return json.loads((model_dir / "leanserve.json").read_text())


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(model_dir / "model.safetensors")


def without_timings(mixture: dict) -> dict:
    return {**mixture, "rounds": [{k: v for k, v in r.items() if k != "eval_seconds"} for r in mixture["rounds"]]}


def test_aioli_records_p_and_resumes_exactly(corpus, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(corpus, straight, *AIOLI) == 0
    record = info(straight)
    settings, metrics = record["settings"]["mixture"], record["metrics"]["mixture"]
    assert settings["kind"] == "aioli" and settings["groups"] == {"code": "code", "docs": "docs",
                                                                  "arith": "tasks:add+sub"}
    assert settings["aioli"]["round_steps"] == 10 and settings["aioli"]["eta"] == 2
    assert "--groups code,docs,arith=tasks:add+sub --mixture aioli" in record["recipe"]["command"]
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and [r["step"] for r in rounds] == [6, 16]
    for r in rounds:
        A_bar = torch.tensor(r["A_bar"])
        assert A_bar.shape == (3, 3) and A_bar.min() >= 0 and A_bar.sum().item() == pytest.approx(1)
        assert r["column_sums"] == pytest.approx(A_bar.sum(0).tolist())
        assert sum(r["p"]) == pytest.approx(1)
    assert [h["step"] for h in metrics["p_history"]] == [0, 6, 16]
    assert metrics["p_history"][-1]["p"] == rounds[-1]["p"]
    assert list(record["settings"]["mix"].values()) == pytest.approx(rounds[-1]["p"])
    assert rounds[0]["p"] != pytest.approx([1 / 3] * 3)  # eta 2 moves the mixture visibly
    assert set(metrics["val_loss_by_group"]) == {"code", "docs", "arith"}
    assert all(set(h["group_val_loss"]) == {"code", "docs", "arith"} for h in record["metrics"]["val_history"])
    assert (straight / "mixture.png").stat().st_size > 0

    # stop inside the second round's LearnParams phase (steps 10-15), then at its update, then finish
    assert train(corpus, resumed, *AIOLI, "--stop-at", "13") == 0
    assert train(corpus, resumed, *AIOLI, "--stop-at", "16", "--resume") == 0
    assert train(corpus, resumed, *AIOLI, "--resume") == 0
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    m_straight, m_resumed = info(straight)["metrics"], info(resumed)["metrics"]
    assert without_timings(m_resumed["mixture"]) == without_timings(m_straight["mixture"])
    assert m_resumed["val_history"] == m_straight["val_history"]

    # an ordinary model directory: it serves, and its leanserve.json still carries the mixture
    with remote_server(straight, "--served-model-name", "mixed", "--max-model-len", "128", "--block-size", "16",
                       "--num-kv-blocks", "32", "--max-num-seqs", "2", "--dtype", "float32",
                       "--device", "cpu") as server:
        r = httpx.post(server.api_url + "/completions", timeout=60, json={
            "model": "mixed", "prompt": "def add(a, b):", "max_tokens": 6, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 6
    assert info(straight)["settings"]["mixture"]["kind"] == "aioli"


def test_static_mixture(corpus, tmp_path):
    out = tmp_path / "static"
    assert train(corpus, out, *GROUPS, "--mixture", "static:code=0,docs=1,arith=3", "--pretrain-steps", "3") == 0
    record = info(out)
    assert record["settings"]["mix"] == {"code": 0.0, "docs": 0.25, "arith": 0.75}
    assert record["settings"]["mixture"] == {"kind": "static", "aioli": None,
                                             "groups": {"code": "code", "docs": "docs", "arith": "tasks:add+sub"}}
    assert "rounds" not in record["metrics"]["mixture"] and not (out / "mixture.png").exists()
    # a group with weight 0 is not trained on but still evaluated
    assert set(record["metrics"]["mixture"]["val_loss_by_group"]) == {"code", "docs", "arith"}


def test_default_groups_are_the_builds_domains(corpus, tmp_path):
    out = tmp_path / "stratified"
    assert train(corpus, out, "--mixture", "stratified", "--pretrain-steps", "2") == 0
    record = info(out)
    assert record["settings"]["mix"] == pytest.approx({"code": 1 / 3, "docs": 1 / 3, "tasks": 1 / 3})
    assert "--groups code,docs,tasks" in record["recipe"]["command"]


@pytest.mark.parametrize("flags, message", [
    (["--mix", "code=1", "--mixture", "stratified"], "--mix is the older form"),
    (["--groups", "code,video"], "unknown domain 'video'"),
    (["--mixture", "static:code=1"], "missing: docs, tasks"),
    ([*GROUPS, "--mixture", "aioli", "--aioli-round-steps", "40"], "must exceed the LearnParams phase"),  # 48
    ([*GROUPS, "--mixture", "aioli", "--aioli-one-hot", "0.3"], "--aioli-one-hot"),
    ([*GROUPS, "--mixture", "aioli", "--aioli-prior", "aioli"], "--aioli-prior"),
    (["--groups", "code", "--mixture", "aioli"], "at least two groups"),
])
def test_bad_mixture_options_fail_with_one_line(corpus, tmp_path, capsys, flags, message):
    assert train(corpus, tmp_path / "m", "--pretrain-steps", "4", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err
