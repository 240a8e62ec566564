"""`leanserve eval moa` on the tiny Llama (CPU, fp32): the JSON rows, goals, provenance and plot of
every arm (dense, uniform windows, the ablation ladder's plans, MoA plans); a plan whose spans cover
the whole context scoring exactly as dense; and the served scores equal to the references: the dense
arm's response cross-entropy is transformers' own, a short-span plan's is the span-masked reference's
(compress moa's validation) and differs from dense."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from moa_dirs import build_moa_dir, tiny_plan
from torch_threads import single_thread

from leanserve.cli import main
from leanserve.compressors.moa_validate import spans
from leanserve.data.long_context import LONG_KINDS, Corpus
from leanserve.eval import moa_items
from leanserve.eval.moa import build_arms, run_arm
from leanserve.models.model_dir import load_model_info, save_model_info
from leanserve.models.moa_plan import save_plan

pytestmark = pytest.mark.usefixtures("one_thread")
# per layer, per KV head: a fixed 32-slot sink + ring, half the request; all of it, a fixed 32 slots
SHORT = ([[32.0, 0.0], [0.0, 32.0]], [[0.0, 0.5], [1.0, 0.0]])
LADDER = {"per-layer": [[0.5, 0.5], [0.25, 0.25]], "per-head": [[0.125, 0.75], [0.25, 0.25]]}  # betas, alpha 0
ARGS = ("--lengths", "192", "256", "--buckets", "2", "--items-per-bucket", "1", "--seeds", "0", "1",
        "--ppl-items", "2", "--max-new-tokens", "8", "--batch-size", "4", "--device", "cpu", "--dtype", "float32")


@pytest.fixture(scope="module")
def short_dir(tiny_llm_dir, tmp_path_factory):
    """The SHORT plan with the two ladder plans beside it, as `compress moa --ablation-plans` writes them."""
    out = build_moa_dir(tiny_llm_dir, tmp_path_factory.mktemp("eval-moa") / "short", tiny_plan(*SHORT))
    (out / "moa_ablation").mkdir()
    for step, betas in LADDER.items():
        save_plan(out / f"moa_ablation/{step}.json", tiny_plan([[0.0, 0.0]] * 2, betas))
    info = load_model_info(out)
    info.settings["ablation_plans"] = {step: f"moa_ablation/{step}.json" for step in LADDER}
    save_model_info(out, info)
    return out


@pytest.fixture(scope="module")
def full_dir(tiny_llm_dir, tmp_path_factory):
    plan = dataclasses.replace(tiny_plan([[0.0, 0.0]] * 2, [[1.0, 1.0]] * 2), density_target=1.0)
    return build_moa_dir(tiny_llm_dir, tmp_path_factory.mktemp("eval-moa") / "full", plan)


@pytest.fixture(scope="module")
def result(tiny_llm_dir, short_dir, full_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-moa") / "moa_eval.json"
    with single_thread():  # a module fixture: set up before the tests' one_thread
        assert main(["eval", "moa", "--model", str(tiny_llm_dir), "--plans", str(short_dir), str(full_dir),
                     "--out", str(out), *ARGS]) == 0
    return json.loads(out.read_text()), out.with_suffix(".png")


def test_writes_rows_goals_provenance_and_plot(result):
    data, png = result
    assert {"git_commit", "date", "hardware", "settings", "arms", "rows", "goals"} <= set(data)
    arms = [(a["method"], a["density"], a["plan"]) for a in data["arms"]]
    assert arms == [("dense", 1.0, None), ("uniform", 0.5, "short"), ("per-layer", 0.5, "short"),
                    ("per-head", 0.5, "short"), ("moa", 0.5, "short"), ("uniform", 1.0, "full"), ("moa", 1.0, "full")]
    assert len(data["rows"]) == len(arms) * 2
    for row in data["rows"]:
        assert {"method", "density", "length", "retrieval_acc", "ppl"} <= set(row)
        assert row["length"] in (192, 256) and 0 <= row["retrieval_acc"] <= 1 and row["ppl"] > 1
        assert len(row["retrieval_acc_by_bucket"]) == 2 and len(row["retrieval_acc_per_seed"]) == 2
        assert row["served_density"] <= 1.0
        assert row["ppl_by_kind"] and set(row["ppl_by_kind"]) <= set(LONG_KINDS)
        assert all(v > 1 for v in row["ppl_by_kind"].values())
    uniform = next(r for r in data["rows"] if r["method"] == "uniform" and r["density"] == 0.5)
    assert uniform["served_density"] == pytest.approx(0.5)
    assert [g["plan"] for g in data["goals"]] == ["short", "full"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spans_covering_the_context_score_as_dense(result):
    rows = result[0]["rows"]
    dense = {r["length"]: r for r in rows if r["method"] == "dense"}
    full = [r for r in rows if r["density"] == 1.0 and r["method"] != "dense"]
    assert {r["method"] for r in full} == {"uniform", "moa"}
    for row in full:
        assert row["retrieval_acc_per_seed"] == dense[row["length"]]["retrieval_acc_per_seed"]
        assert row["ppl_per_seed"] == pytest.approx(dense[row["length"]]["ppl_per_seed"], rel=1e-5)
        assert row["ppl_by_kind"] == pytest.approx(dense[row["length"]]["ppl_by_kind"], rel=1e-5)
    short = [r for r in rows if r["plan"] == "short" and r["method"] == "moa"]
    assert all(r["ppl"] != pytest.approx(dense[r["length"]]["ppl"], rel=1e-3) for r in short)
    goal = next(g for g in result[0]["goals"] if g["plan"] == "full")
    assert goal["retrieval_gap_to_dense"] == 0 and goal["ppl_rise_vs_dense"] == pytest.approx(0, abs=1e-5)


def _reference_ce(model, item) -> float:
    ids = torch.tensor(item.ids)[None]
    logits = model(input_ids=ids, use_cache=False).logits[0, item.response_start - 1:-1]
    return F.cross_entropy(logits.float(), ids[0, item.response_start:]).item()


def test_served_scores_equal_the_references(tiny_llm_dir, short_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    items = moa_items.scored(tokenizer, Corpus.load(held_out=True, max_files=16), lengths=[256], seeds=[0], count=4,
                             max_new_tokens=8, end_of_turn=tokenizer.eos_token_id)
    dense_arm, *_, moa_arm = build_arms(tiny_llm_dir, [short_dir], tmp_path)
    served = {arm.method: run_arm(arm, [], items, max_model_len=256, max_new_tokens=8, batch_size=2, device="cpu",
                                  dtype="float32", gpu_memory_utilization=0.9)[1] for arm in (dense_arm, moa_arm)}
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        dense = [_reference_ce(model, item) for item in items]
        with spans(model, [list(zip(a, b)) for a, b in zip(*SHORT)], moa_arm.plan.block_size):
            masked = [_reference_ce(model, item) for item in items]
    assert served["dense"] == pytest.approx(dense, rel=1e-4)
    assert served["moa"] == pytest.approx(masked, rel=1e-4)
    assert served["moa"] != pytest.approx(served["dense"], rel=1e-3)  # the spans cut what the answers read


def test_refuses_what_it_cannot_compare(tiny_llm_dir, short_dir, tmp_path, capsys):
    other = shutil.copytree(short_dir, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config, indent=1))  # same model, other bytes: other hash
    too_long = [*ARGS]
    too_long[too_long.index("256")] = "1024"  # past the tiny model's 512 positions
    out = str(tmp_path / "r.json")
    for model, plans, args, error in [(tiny_llm_dir, other, ARGS, "made from other weights"),
                                      (tiny_llm_dir, tiny_llm_dir, ARGS, "not a MoA model directory"),
                                      (short_dir, short_dir, ARGS, "the dense arm needs the dense model"),
                                      (tiny_llm_dir, short_dir, too_long, "exceed the model's max_position_embeddings")]:
        assert main(["eval", "moa", "--model", str(model), "--plans", str(plans), "--out", out, *args]) == 2
        assert error in capsys.readouterr().err
