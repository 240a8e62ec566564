"""`leanserve train lm --arch moe|moepp`: tiny CPU runs that write loadable model directories with
their routing stats, resume exactly, check their options; `eval lm` reports the routing; DDP."""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_builders import write_corpus

from leanserve.cli import main

FLAGS = ["--device", "cpu", "--preset", "tiny", "--batch-size", "8", "--seq-len", "64", "--lr", "3e-3",
         "--eval-batches", "2"]
# 4 experts of width 64 (+ 4 ZC experts for moepp); a short run across both phases
RUN = ["--experts", "4", "--intermediate-size", "64", "--pretrain-steps", "4", "--chat-steps", "2",
       "--eval-every", "3", "--seed", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("moepp-lm"))


def train(corpus: Path, out: Path, *flags: str) -> int:
    return main(["train", "lm", "--data", str(corpus / "data"), "--tokenizer", str(corpus / "tok"), "--out", str(out),
                 *FLAGS, *flags])


@pytest.fixture(scope="module")
def trained(corpus):
    dirs = {}
    for arch in ("moepp", "moe"):
        dirs[arch] = corpus / arch
        assert train(corpus, dirs[arch], "--arch", arch, *RUN) == 0
    return dirs


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(model_dir / "model.safetensors")


@pytest.mark.parametrize("arch", ["moepp", "moe"])
def test_trains_and_writes_a_loadable_model_dir(corpus, trained, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leanserve.data.lm_data import batched, encode_documents, stream_windows
    from leanserve.eval.token_loss import mean_losses
    from leanserve.models.moepp_hf import MoEPPForCausalLM
    from leanserve.runtime import DistInfo

    model_dir = trained[arch]
    info = json.loads((model_dir / "leanserve.json").read_text())
    assert info["method"] == "dense" and info["settings"]["architecture"] == "MoEPPForCausalLM"
    assert info["settings"]["arch"] == arch and f"--arch {arch}" in info["recipe"]["command"]
    metrics = info["metrics"]
    assert all(math.isfinite(v) for v in metrics["val_loss"].values())
    assert all(math.isfinite(v) for v in metrics["train_loss"].values())

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert type(model) is MoEPPForCausalLM
    config = model.config
    assert (config.n_ffn_experts, config.num_experts_per_tok, config.intermediate_size) == (4, 2, 64)
    if arch == "moepp":
        zc = (config.n_zero, config.n_copy, config.n_const)
        assert zc == (1, 1, 2) and config.tau == 0.75 and config.gating_residual
    else:
        assert (config.n_zero, config.n_copy, config.n_const, config.gating_residual) == (0, 0, 0, False)
    assert info["settings"]["num_params"] == sum(p.numel() for p in model.parameters())

    routing = metrics["routing"]
    theory = 0.75 * 4 / (0.75 * 4 + 4) if arch == "moepp" else 1.0
    assert routing["ffn_share_theory"] == pytest.approx(theory)
    assert len(routing["ffn_share_per_layer"]) == config.num_hidden_layers
    assert routing["ffn_experts_per_token"] == pytest.approx(2 * routing["ffn_share"])
    assert sum(routing["slot_share"].values()) == pytest.approx(1.0)
    assert [h["routing"] for h in metrics["val_history"]][-1] == routing
    if arch == "moe":
        assert routing["ffn_share"] == pytest.approx(1.0)

    # the saved weights reproduce the validation loss recorded at the end of training
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in open(corpus / "data" / "code" / "val.jsonl")]
    windows = stream_windows(encode_documents(tok, texts), 64, 2 * 8)
    loss = mean_losses(model, {"code": batched(windows, 8, tok.pad_token_id)}, torch.device("cpu"),
                       contextlib.nullcontext, DistInfo())["code"]
    assert loss == pytest.approx(metrics["val_loss"]["code"], rel=1e-4)


def test_moepp_resume_is_exact(corpus, trained, tmp_path):
    resumed = tmp_path / "resumed"
    assert train(corpus, resumed, "--arch", "moepp", *RUN, "--stop-at", "2") == 0
    assert train(corpus, resumed, "--arch", "moepp", *RUN, "--stop-at", "5", "--resume") == 0  # across the phases
    assert train(corpus, resumed, "--arch", "moepp", *RUN, "--resume") == 0
    a, b = load_state(trained["moepp"]), load_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((d / "leanserve.json").read_text())["metrics"] for d in (trained["moepp"], resumed))
    assert ma["val_history"] == mb["val_history"] and ma["train_loss"] == mb["train_loss"]


def test_eval_lm_reports_test_routing(corpus, trained, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", "lm", "--model", str(trained["moepp"]), "--data", str(corpus / "data"), "--max-docs", "4",
                 "--max-new-tokens", "4", "--device", "cpu", "--out", str(out), "--write-metrics"]) == 0
    routing = json.loads(out.read_text())["test_routing"]
    assert routing["tokens"] > 0 and 0 <= routing["ffn_share"] <= 1
    assert routing["ffn_share_theory"] == pytest.approx(0.75 * 4 / (0.75 * 4 + 4))
    info = json.loads((trained["moepp"] / "leanserve.json").read_text())
    assert info["metrics"]["test_routing"] == routing


@pytest.mark.parametrize("flags, message", [
    (["--tau", "0.5"], "--tau needs --arch moe or moepp"),
    (["--arch", "moe", "--zc", "zero=1"], "--arch moe has none"),
    (["--arch", "moepp", "--zc", "one=1"], "unknown expert kind 'one'"),
    (["--arch", "moepp", "--top-k", "20"], "top_k"),
    (["--arch", "moe", "--experts", "0"], "--experts and --top-k must be >= 1"),
])
def test_bad_moe_options_fail_with_one_line(corpus, tmp_path, capsys, flags, message):
    assert train(corpus, tmp_path / "m", "--pretrain-steps", "1", "--chat-steps", "0", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


@pytest.mark.slow
def test_torchrun_two_ranks_train_moepp(corpus, trained, tmp_path):
    """DDP with find_unused_parameters (layer 0's gate_map gets no gradient); the routing stats of the
    two ranks' halves of the validation data add up to the single-process run's."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "leanserve.cli", "train", "lm", "--data", str(corpus / "data"), "--tokenizer", str(corpus / "tok"),
           "--out", str(tmp_path / "ddp"), "--arch", "moepp", *FLAGS, *RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "ddp" / "leanserve.json").read_text())
    assert info["settings"]["world_size"] == 2
    single = json.loads((trained["moepp"] / "leanserve.json").read_text())["metrics"]["routing"]
    assert info["metrics"]["routing"]["tokens"] == single["tokens"]
