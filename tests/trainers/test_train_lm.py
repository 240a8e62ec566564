"""`leanserve train lm` / `eval lm`: learning, exact resume, the model directory, eval, bad input."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

from lm_builders import TASK_KINDS, write_corpus

from leanserve.cli import main

TRAIN_FLAGS = ["--device", "cpu", "--preset", "tiny", "--batch-size", "8", "--seq-len", "64", "--lr", "3e-3",
               "--eval-batches", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("lm"))


def train(corpus: Path, out: Path, *flags: str) -> int:
    return main(["train", "lm", "--data", str(corpus / "data"), "--tokenizer", str(corpus / "tok"), "--out", str(out),
                 *TRAIN_FLAGS, *flags])


@pytest.fixture(scope="module")
def trained(corpus):
    out = corpus / "model"
    assert train(corpus, out, "--pretrain-steps", "40", "--chat-steps", "20", "--eval-every", "20") == 0
    return out


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(model_dir / "model.safetensors")


def test_training_lowers_validation_loss(corpus, trained):
    untrained = corpus / "untrained"
    assert train(corpus, untrained, "--pretrain-steps", "0", "--chat-steps", "0") == 0
    before = json.loads((untrained / "leanserve.json").read_text())["metrics"]["val_loss"]
    after = json.loads((trained / "leanserve.json").read_text())["metrics"]["val_loss"]
    assert set(before) == set(after) == {"code", "docs", "tasks", "chat"}
    for domain in before:
        assert after[domain] < before[domain] - 0.5, (domain, before[domain], after[domain])
    # each validation also probes whether the model copies yet (64-token windows: 8-word repeats)
    history = json.loads((trained / "leanserve.json").read_text())["metrics"]["val_history"]
    assert [[r["words"] for r in h["induction"]] for h in history] == [[8]] * len(history)
    assert all(r["first"] > 0 and math.isfinite(r["copy_gain"]) for h in history for r in h["induction"])


def test_model_dir_loads_and_records_provenance(corpus, trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from leanserve.data.tokenizer import stop_token_ids
    from leanserve.runtime import DistInfo
    from leanserve.data.lm_data import batched, encode_documents, stream_windows
    from leanserve.eval.token_loss import mean_losses

    model = AutoModelForCausalLM.from_pretrained(trained)
    tok = AutoTokenizer.from_pretrained(trained)
    assert model.config.model_type == "llama" and model.config.hidden_size == 64
    assert model.config.vocab_size == len(tok) and tok.chat_template
    # the saved weights are the trained ones, not a fresh init
    assert not torch.equal(load_state(trained)["model.embed_tokens.weight"],
                           load_state(corpus / "untrained")["model.embed_tokens.weight"])
    gen = GenerationConfig.from_pretrained(trained)
    assert gen.eos_token_id == stop_token_ids(tok) and gen.pad_token_id == tok.pad_token_id
    # the loaded weights reproduce the validation loss recorded at the end of training
    texts = [json.loads(line)["text"] for line in open(corpus / "data" / "code" / "val.jsonl")]
    windows = stream_windows(encode_documents(tok, texts), 64, 2 * 8)
    loss = mean_losses(model, {"code": batched(windows, 8, tok.pad_token_id)}, torch.device("cpu"),
                       contextlib.nullcontext, DistInfo())["code"]
    recorded = json.loads((trained / "leanserve.json").read_text())["metrics"]["val_loss"]["code"]
    assert loss == pytest.approx(recorded, rel=1e-4)

    info = json.loads((trained / "leanserve.json").read_text())
    manifest = json.loads((corpus / "data" / "manifest.json").read_text())
    assert info["kind"] == "llm" and info["method"] == "dense" and info["created"]
    assert info["recipe"]["command"].startswith("leanserve train lm --data ")
    assert "--pretrain-steps 40" in info["recipe"]["command"] and "--resume" not in info["recipe"]["command"]
    assert info["recipe"]["seed"] == 0 and "git_commit" in info["recipe"]
    assert info["data"]["sha256"] == manifest["sha256"]
    assert info["settings"]["num_params"] == sum(p.numel() for p in model.parameters())
    assert info["metrics"]["train_tokens"] > 0 and set(info["metrics"]["train_loss"]) == {"pretrain", "chat"}
    assert not (trained / "checkpoint.pt").exists()


def test_resume_is_exact(corpus, tmp_path):
    steps = ["--pretrain-steps", "6", "--chat-steps", "4", "--eval-every", "3", "--seed", "1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(corpus, straight, *steps) == 0

    assert train(corpus, resumed, *steps, "--stop-at", "3") == 0  # mid-pretraining
    assert (resumed / "checkpoint.pt").is_file() and not (resumed / "config.json").exists()
    assert train(corpus, resumed, *steps, "--stop-at", "8", "--resume") == 0  # across the phase boundary
    assert train(corpus, resumed, *steps, "--resume") == 0

    a, b = load_state(straight), load_state(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((d / "leanserve.json").read_text())["metrics"] for d in (straight, resumed))
    assert ma["val_history"] == mb["val_history"] and len(ma["val_history"]) == 4
    assert ma["train_loss"] == mb["train_loss"] and ma["train_tokens"] == mb["train_tokens"]


def test_compiled_model_trains_the_same_weights(corpus, tmp_path, monkeypatch):
    # dynamo's graphs and AOTAutograd's forward/backward split as on a GPU, without inductor's code generation
    # (slow on this CPU); the GPU measures the compiled speed
    compile_module = torch.nn.Module.compile
    compiled = []

    def aot_eager(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return compile_module(self, backend="aot_eager")

    monkeypatch.setattr(torch.nn.Module, "compile", aot_eager)
    steps = ("--pretrain-steps", "3", "--chat-steps", "2", "--eval-every", "1000")
    assert train(corpus, tmp_path / "eager", *steps) == 0
    assert train(corpus, tmp_path / "compiled", *steps, "--compile") == 0
    assert train(corpus, tmp_path / "init", "--pretrain-steps", "0", "--chat-steps", "0") == 0
    a, b, init = (load_state(tmp_path / name) for name in ("eager", "compiled", "init"))
    assert compiled == ["LlamaForCausalLM"] and a.keys() == b.keys()  # in place: the saved names are the model's
    update = torch.cat([(a[k].float() - init[k].float()).flatten() for k in a])
    gap = torch.cat([(b[k].float() - a[k].float()).flatten() for k in a])
    assert update.norm() > 0 and gap.norm() < 1e-3 * update.norm()


def test_init_starts_from_a_model_dirs_weights(corpus, trained, tmp_path, capsys):
    from leanserve.models.model_dir import weights_sha256

    # no steps: the saved weights are the init's; a longer --max-len is allowed (rotary has no weights)
    assert train(corpus, tmp_path / "copy", "--init", str(trained), "--max-len", "128", "--seq-len", "128",
                 "--pretrain-steps", "0", "--chat-steps", "0") == 0
    a, b = load_state(trained), load_state(tmp_path / "copy")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((tmp_path / "copy" / "leanserve.json").read_text())
    assert f"--init {trained}" in info["recipe"]["command"]
    assert info["settings"]["init"] == {"dir": str(trained), "weights_sha256": weights_sha256(trained)}
    # two small steps from it stay near it, far from a fresh init
    assert train(corpus, tmp_path / "more", "--init", str(trained), "--pretrain-steps", "2", "--chat-steps", "0",
                 "--lr", "1e-4") == 0
    assert train(corpus, tmp_path / "fresh", "--pretrain-steps", "0", "--chat-steps", "0") == 0
    more, fresh = load_state(tmp_path / "more"), load_state(tmp_path / "fresh")

    def distance(x, y):
        return sum(float((x[k].float() - y[k].float()).norm()) for k in x)

    assert 0 < distance(more, a) < 0.1 * distance(more, fresh)
    capsys.readouterr()
    assert train(corpus, tmp_path / "wide", "--init", str(trained), "--hidden-size", "128") == 2
    assert train(corpus, tmp_path / "none", "--init", str(tmp_path / "missing")) == 2
    lines = [line for line in capsys.readouterr().err.split("\n") if "error:" in line]  # not the loading bar
    assert len(lines) == 2 and "does not fit this model's shape" in lines[0] and "not a model directory" in lines[1]


def test_resume_rejects_changed_options(corpus, tmp_path, capsys):
    steps = ["--pretrain-steps", "4", "--chat-steps", "0"]
    assert train(corpus, tmp_path / "m", *steps, "--stop-at", "2") == 0
    capsys.readouterr()
    assert train(corpus, tmp_path / "m", *steps, "--lr", "1e-2", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--lr 0.003 -> 0.01" in err
    assert train(corpus, tmp_path / "m", *steps) == 2  # a checkpoint is there: refuse to start over silently
    assert "--resume" in capsys.readouterr().err


def test_encode_chat_labels_only_the_reply(corpus):
    from leanserve.data.lm_data import IGNORE, encode_chat, load_tokenizer

    tok = load_tokenizer(corpus / "tok")
    conv = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"},
            {"role": "user", "content": "And 1 + 1?"}, {"role": "assistant", "content": "2"}]
    ids, labels = encode_chat(tok, conv)
    assert len(ids) == len(labels)
    # what the server sends for the first turn is exactly the first prompt's ids
    prompt = tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids and set(labels[: len(prompt_ids)]) == {IGNORE}
    labelled = [t for t in labels if t != IGNORE]
    assert tok.decode(labelled) == "42<|eot_id|>2<|eot_id|>"
    assert tok.decode(ids) == tok.apply_chat_template(conv, tokenize=False)


def test_chat_tiny_fits_the_zoo_budget():
    from transformers import LlamaConfig, LlamaForCausalLM

    from leanserve.trainers.presets import PRESETS

    p = PRESETS["chat-tiny"]
    config = LlamaConfig(vocab_size=8192, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                         num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads,
                         num_key_value_heads=p.num_kv_heads, tie_word_embeddings=p.tie_word_embeddings)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    n = sum(t.numel() for t in model.parameters())  # a tied embedding counts once
    assert p.num_params(8192) == n
    assert p.save_dtype == "bfloat16" and 2 * n <= 15e6


def test_eval_lm_writes_metrics(corpus, trained, tmp_path):
    out = tmp_path / "eval.json"
    before = (trained / "leanserve.json").read_text()
    args = ["eval", "lm", "--model", str(trained), "--data", str(corpus / "data"), "--max-docs", "6",
            "--max-new-tokens", "8", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    assert (trained / "leanserve.json").read_text() == before  # the model directory is read-only by default
    assert main([*args, "--write-metrics"]) == 0
    result = json.loads(out.read_text())
    assert set(result["test_ppl"]) == {"code", "docs", "tasks", "chat"} and result["hardware"].startswith("CPU")
    for domain, ppl in result["test_ppl"].items():
        assert ppl == pytest.approx(math.exp(result["test_loss"][domain]))
        assert 1 < ppl < 400  # better than uniform over the 400-token vocabulary
    acc = result["task_accuracy"]
    assert set(acc) <= set(TASK_KINDS) | {"overall"} and 0 <= acc["overall"] <= 1
    assert sum(result["task_count"].values()) == 6  # --max-docs caps the task questions too
    info = json.loads((trained / "leanserve.json").read_text())
    assert info["metrics"]["test_ppl"] == result["test_ppl"] and "val_loss" in info["metrics"]


def test_score_tasks_checks_each_response():
    from leanserve.data.tasks import generate_tasks
    from leanserve.eval.lm import score_tasks

    tasks = generate_tasks(8, seed=3, kinds=("add", "sort"))
    rows = [t.to_row(str(i)) for i, t in enumerate(tasks)]
    # an "oracle" right on every add task and wrong on every sort task
    answers = {t.prompt: (t.answer if t.kind == "add" else "no") for t in tasks}
    accuracy, counts = score_tasks(rows, lambda prompts: [answers[p] for p in prompts])
    assert accuracy == {"add": 1.0, "sort": 0.0, "overall": 0.5} and counts == {"add": 4, "sort": 4}


@pytest.mark.parametrize("argv, message", [
    (["train", "lm", "--data", "/nonexistent/data", "--tokenizer", "/tmp", "--out", "/tmp/x"], "does not exist"),
    (["eval", "lm", "--model", "/nonexistent/model", "--data", "/tmp"], "does not exist"),
])
def test_bad_paths_fail_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


def test_bad_options_fail_with_one_line(corpus, tmp_path, capsys):
    assert train(corpus, tmp_path / "m", "--heads", "3") == 2  # 64 does not split into 3 heads
    assert train(corpus, tmp_path / "m", "--mix", "code=1,video=1") == 2
    assert train(corpus, tmp_path / "m", "--seq-len", "4096") == 2
    lines = capsys.readouterr().err.strip().split("\n")
    assert len(lines) == 3 and all(line.startswith("leanserve train lm: error: ") for line in lines)
    with pytest.raises(SystemExit) as e:
        train(corpus, tmp_path / "m", "--preset", "huge")
    assert e.value.code == 2


def test_model_info_reads_back_and_hashes_weights(corpus, trained, tmp_path):
    from leanserve.models.model_dir import load_model_info, weights_sha256

    info = load_model_info(trained)
    assert info.kind == "llm" and info.metrics["val_loss"] and info.recipe["seed"] == 0
    assert weights_sha256(trained) == weights_sha256(trained) != weights_sha256(corpus / "untrained")
    assert load_model_info(tmp_path) is None  # a plain HF directory
    (tmp_path / "leanserve.json").write_text('{"kind": "llm", "method": "dense", "colour": "red"}')
    with pytest.raises(ValueError, match="colour"):
        load_model_info(tmp_path)
