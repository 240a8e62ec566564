"""--smoke runs of the data-mixing experiments (Aioli, MoDoMoDo): the GPU scripts' code paths on CPU at toy sizes, so a script run
on a lent GPU does not die on an API drift first."""
from __future__ import annotations

import json
import subprocess
import sys

from bench_smoke import ROOT, script_env


def test_aioli_experiment_smoke(tmp_path):
    """benchmarks/aioli_experiment.py --smoke on one setting: worker processes train every arm, the best
    static mixture of the sweep is rerun at the other seed, and the paired deltas are written."""
    env = script_env()
    out = tmp_path / "aioli_eval.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aioli_experiment.py"), "--smoke", "--work",
                           str(tmp_path / "work"), "--settings", "code+arith", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] and not result["failed_runs"]
    runs = {(r["arm"], r["seed"]) for r in result["rows"]}
    assert runs == {(arm, seed) for arm in ("stratified", "aioli", "aioli_static", "best_static")
                    for seed in (0, 1)} | {("static_sweep", 0)}
    for row in result["rows"]:
        assert set(row["test_ppl_by_group"]) == {"code", "arith"}
        assert row["test_ppl_mean"] == sum(row["test_ppl_by_group"].values()) / 2
        assert row["aioli_rounds"] == {"aioli": 2, "aioli_static": 1}.get(row["arm"], 0)  # 24 steps, R 12
    best = [r for r in result["rows"] if r["arm"] == "best_static"]
    assert best[0]["static_p"] == best[1]["static_p"]  # the sweep's winner, rerun at seed 1
    paired = result["paired"]["code+arith"]
    for arm in ("aioli", "aioli_static", "best_static"):
        stats = paired[arm]["test_ppl_mean"]
        assert stats["n"] == 2 and stats["ci95"][0] <= stats["mean"] <= stats["ci95"][1]
    assert (tmp_path / "work" / "runs" / "code+arith" / "aioli" / "seed0" / "mixture.png").is_file()


def test_aioli_experiment_cpu_scale_plan():
    """--scale cpu is the sweep behind results/aioli_eval-cpu.json: 4 settings x 2 arms x (5, 5, 5, 3) seeds of
    600 steps at 16 x 128 tokens; --plan prints it without training."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aioli_experiment.py"), "--scale", "cpu", "--plan",
                           "--work", "unused", "--arms", "stratified", "aioli"], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "36 runs x 600 steps x 16 x 128 tokens" in proc.stdout
    assert "1.1M params" in proc.stdout


def test_modomodo_experiment_smoke(tmp_path):
    """benchmarks/modomodo_experiment.py --smoke: data build, SFT, pilots, heuristics, `mixture fit`, confirmation
    and the report, at toy sizes on the CPU."""
    env = script_env()
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "modomodo_experiment.py"), "--smoke",
                           "--work", str(tmp_path / "work"), "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["groups"] == ["add", "reverse"] and r["smoke"]
    assert [p["name"] for p in r["pilots"]][:5] == ["single_0", "single_1", "exclude_0", "exclude_1", "uniform"]
    assert {p["kind"] for p in r["pilots"]} == {"seed", "heuristic"}
    assert set(r["fits"]) == {"quadratic", "linear"} and all("loo_r2" in f for f in r["fits"].values())
    names = {c["name"] for c in r["confirm"]}
    assert "uniform" in names and "candidate_1" in names and any(n.startswith("best_pilot:") for n in names)
    assert sorted({c["seed"] for c in r["confirm"]}) == [0, 1]
    for row in r["pilots"] + r["confirm"]:
        assert 0 <= row["in_score"] <= 1 and 0 <= row["out_score"] <= 1
    assert set(r["base"]["out_by_task"]) == {"sub", "add_4_digits", "reverse_long", "sort_long", "count_long"}
    assert (tmp_path / "eval.png").stat().st_size > 0
    model = json.loads(next((tmp_path / "work" / "runs").glob("*/leanserve.json")).read_text())
    assert model["settings"]["mixture"]["kind"] == "static"
