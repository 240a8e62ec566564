"""`leanserve train sgld` end to end on CPU from a tiny `train lm` model, and `eval lm` on its ensemble
directory: the directory's contents, exact resume, the scope, the sampling plan, bad input."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_builders import train_texts, write_data

from leanserve.cli import main

SGLD_FLAGS = ["--device", "cpu", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--eval-every", "3",
              "--lr", "1e-3", "--burn-in", "4", "--thin", "2", "--num-members", "3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from leanserve.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("sgld")
    data = write_data(root / "data")
    train_tokenizer(train_texts(data), root / "tok", vocab_size=400, model_max_length=512)
    assert main(["train", "lm", "--data", str(data), "--tokenizer", str(root / "tok"), "--out", str(root / "map"),
                 "--device", "cpu", "--preset", "tiny", "--batch-size", "8", "--seq-len", "32", "--lr", "3e-3",
                 "--eval-batches", "1", "--pretrain-steps", "12", "--chat-steps", "0", "--mix", "code=1",
                 "--weight-decay", "0.01"]) == 0
    return root


def sgld(corpus: Path, out: Path, *flags: str) -> int:
    return main(["train", "sgld", "--from", str(corpus / "map"), "--data", str(corpus / "data"), "--out", str(out),
                 *SGLD_FLAGS, *flags])


@pytest.fixture(scope="module")
def ensemble(corpus):
    out = corpus / "ensemble"
    assert sgld(corpus, out) == 0
    return out


def test_writes_an_ensemble_directory(corpus, ensemble):
    from transformers import AutoModelForCausalLM

    from leanserve.models.ensemble_dir import read_members
    from leanserve.models.model_dir import weights_sha256

    info = json.loads((ensemble / "leanserve.json").read_text())
    assert info["kind"] == "llm" and info["method"] == "ensemble"
    settings = info["settings"]
    assert settings["num_members"] == 3 and settings["scope"] == "full" and settings["ensemble_mode"] == "token_mean"
    # the base is the MAP as it was, and loads as a plain transformers model
    assert (ensemble / "model.safetensors").read_bytes() == (corpus / "map" / "model.safetensors").read_bytes()
    assert info["base"] == {"path": str(corpus / "map"), "sha256": weights_sha256(corpus / "map")}
    base = AutoModelForCausalLM.from_pretrained(ensemble)
    names = [n for n, _ in base.named_parameters()]
    assert settings["member_params"] == names + ["lm_head.weight"]  # tied head stored per member
    members = read_members(ensemble, settings)
    assert len(members) == 3 and all(m.keys() == set(settings["member_params"]) for m in members)
    # the MAP's save dtype (the tiny preset saves fp32); members moved away from the MAP and from each other
    map_weights = load_file(corpus / "map" / "model.safetensors")
    assert all(t.dtype == torch.float32 for m in members for t in m.values())
    embed = "model.embed_tokens.weight"
    assert not torch.equal(members[0][embed], map_weights[embed])
    assert not torch.equal(members[0][embed], members[1][embed])
    assert not torch.equal(members[1][embed], members[2][embed])
    assert all(torch.equal(m["lm_head.weight"], m[embed]) for m in members)  # full scope keeps the tie
    sampler = settings["sampler"]
    assert sampler["member_steps"] == [6, 8, 10] and sampler["mix"] == {"code": 1.0}
    assert sampler["weight_decay"] == 0.01  # from the MAP's recipe
    # N defaults to the code train tokens
    from leanserve.data.build import load_manifest
    from leanserve.data.lm_data import encode_documents, load_tokenizer, read_split

    tok = load_tokenizer(ensemble)
    rows = read_split(corpus / "data", load_manifest(corpus / "data"), "code", "train")
    assert sampler["n_data"] == len(encode_documents(tok, [r["text"] for r in rows]))
    assert info["recipe"]["command"].startswith(f"leanserve train sgld --from {corpus / 'map'} --data ")
    metrics = info["metrics"]
    assert set(metrics["val_nll"]) == {"map", "ensemble", "last_sample"}
    assert [m["step"] for m in metrics["members"]] == [6, 8, 10]
    # the running ensemble is never worse than its average member (Jensen), on every val domain
    last = metrics["members"][-1]["ensemble_val_nll"]
    for domain, value in last.items():
        assert value <= sum(m["val_nll"][domain] for m in metrics["members"]) / 3 + 1e-9
    assert not (ensemble / "checkpoint.pt").exists() and json.loads((ensemble / "progress.json").read_text())["done"]


def test_resume_gives_bit_identical_members(corpus, tmp_path, ensemble):
    resumed = tmp_path / "resumed"
    assert sgld(corpus, resumed, "--stop-at", "7", "--save-every", "100") == 0  # after the first member
    assert (resumed / "checkpoint.pt").is_file() and not (resumed / "members.safetensors").exists()
    assert sgld(corpus, resumed, "--resume", "--eval-every", "5") == 0  # eval-every may change on resume
    a, b = load_file(ensemble / "members.safetensors"), load_file(resumed / "members.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((d / "leanserve.json").read_text())["metrics"] for d in (ensemble, resumed))
    assert ma["members"] == mb["members"] and ma["val_nll"] == mb["val_nll"]


def test_last_k_scope_samples_only_the_top(corpus, tmp_path):
    from leanserve.models.ensemble_dir import read_members

    out = tmp_path / "top"
    assert sgld(corpus, out, "--scope", "last:1", "--precond", "frozen_rmsprop", "--momentum", "0.5") == 0
    settings = json.loads((out / "leanserve.json").read_text())["settings"]
    names = settings["member_params"]
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" in names and "model.norm.weight" in names
    assert all(n.startswith("model.layers.1.") for n in names if n.startswith("model.layers."))
    members = read_members(out, settings)
    embed = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    # each member has its own head; the trunk's tied embedding is the MAP's
    assert all(not torch.equal(m["lm_head.weight"], embed) for m in members)
    assert not torch.equal(members[0]["lm_head.weight"], members[1]["lm_head.weight"])


def test_cyclical_plan():
    from leanserve.trainers.sgld import SamplingPlan

    args = argparse.Namespace(schedule="cyclical", num_members=4, cycles=2, thin=3, burn_in=5, explore=0.5,
                              decay_steps=1.0, decay_gamma=0.55)
    plan = SamplingPlan.make(args)
    # 2 members per cycle need 6 noisy steps: cycles of 12 with 6 of exploration
    assert plan.cycle_len == 12 and plan.total_steps == 5 + 24
    assert plan.member_steps == (5 + 9, 5 + 12, 5 + 21, 5 + 24)
    assert [plan.noise(s) for s in (0, 4, 5, 10, 11, 16, 17, 23)] == [True, True, False, False, True, True, False, True]
    assert plan.lr_scale(0) == 1.0 and plan.lr_scale(5) == 1.0 and plan.lr_scale(16) < 0.05


def test_eval_lm_scores_the_mixture_and_its_members(corpus, ensemble, tmp_path):
    from transformers import AutoModelForCausalLM

    from leanserve.models.ensemble_dir import read_members

    flags = ["--data", str(corpus / "data"), "--device", "cpu", "--max-docs", "4", "--seq-len", "32",
             "--batch-size", "4", "--ts-tokens", "64"]
    assert main(["eval", "lm", "--model", str(ensemble), *flags, "--max-new-tokens", "3", "--write-metrics",
                 "--out", str(tmp_path / "all.json")]) == 0
    full = json.loads((tmp_path / "all.json").read_text())
    ens = full["ensemble"]
    assert ens["num_members"] == 3 and len(ens["members"]["code"]) == 3
    for domain, cal in full["calibration"].items():
        assert full["test_loss"][domain] == cal["nll"]
        assert cal["nll"] <= sum(m["nll"] for m in ens["members"][domain]) / 3 + 1e-9
        assert ens["jensen_gap"][domain] >= 0 and 0 <= ens["disagreement"][domain] <= 1
        assert {"ece", "brier", "accuracy"} <= set(cal)
        if domain != "chat":  # at --seq-len 32 no chat val conversation keeps a reply: no temperature fit
            assert {"nll_ts", "temperature"} <= set(cal)
        assert ens["logit_average"][domain]["nll"] > 0
        prefixes = ens["prefix_mixtures"][domain]  # S = 1, 2 of the 3 members, scored in the same pass
        assert set(prefixes) == {"1", "2"}
        assert prefixes["1"]["nll"] == pytest.approx(ens["members"][domain][0]["nll"], rel=1e-6)
    assert sum(full["task_count"].values()) == 4  # mixture greedy decoding answered them
    assert json.loads((ensemble / "leanserve.json").read_text())["metrics"]["calibration"] == full["calibration"]
    assert main(["eval", "lm", "--model", str(ensemble), *flags, "--members", "4"]) == 2  # it has 3

    # member 0 of the ensemble, written out as an ordinary model, scores as --members 1 does
    assert main(["eval", "lm", "--model", str(ensemble), *flags, "--members", "1", "--no-tasks",
                 "--domains", "code,docs", "--out", str(tmp_path / "one.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["ensemble"]["num_members"] == 1 and set(one["calibration"]) == {"code", "docs"}
    model = AutoModelForCausalLM.from_pretrained(ensemble)
    settings = json.loads((ensemble / "leanserve.json").read_text())["settings"]
    model.load_state_dict(read_members(ensemble, settings)[0], strict=False)
    model.save_pretrained(tmp_path / "member0")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (ensemble / name).exists():
            (tmp_path / "member0" / name).write_bytes((ensemble / name).read_bytes())
    assert main(["eval", "lm", "--model", str(tmp_path / "member0"), *flags, "--no-tasks", "--domains", "code,docs",
                 "--out", str(tmp_path / "member0.json")]) == 0
    single = json.loads((tmp_path / "member0.json").read_text())
    for domain, cal in single["calibration"].items():
        for key in ("nll", "ece", "brier", "accuracy"):
            assert one["calibration"][domain][key] == pytest.approx(cal[key], abs=1e-5), (domain, key)
        assert one["ensemble"]["members"][domain][0]["nll"] == pytest.approx(cal["nll"], abs=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--scope", "last:9"], "scope must be 'full' or 'last:K'"),
    (["--scope", "middle"], "scope must be 'full' or 'last:K'"),
    (["--num-members", "0"], "--num-members must be > 0"),
    (["--schedule", "cyclical", "--cycles", "2"], "must split evenly over --cycles"),
    (["--precond", "frozen_rmsprop", "--burn-in", "0"], "--burn-in"),
    (["--stop-at", "10"], "--stop-at must be between 1 and 9"),
])
def test_bad_options_fail_with_one_line(corpus, tmp_path, capsys, flags, message):
    assert sgld(corpus, tmp_path / "bad", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("leanserve train sgld: error: ") and message in err, err


def test_a_diverging_chain_stops_with_an_error_not_nan_members(corpus, tmp_path, capsys):
    """Found on a GPU pilot at η 1e-3: the chain wrote an ensemble of NaN members and exit status 0."""
    assert sgld(corpus, tmp_path / "hot", "--lr", "1e6") == 2
    assert "leanserve train sgld: error: the chain diverged at step" in capsys.readouterr().err
    assert not (tmp_path / "hot" / "leanserve.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--members", "2"], "not an ensemble directory"),
    (["--domains", "code,video"], "--domains: choose from"),
])
def test_eval_lm_bad_options(corpus, capsys, flags, message):
    assert main(["eval", "lm", "--model", str(corpus / "map"), "--data", str(corpus / "data"), "--device", "cpu",
                 *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
