"""--smoke runs of the LLM layer and engine benchmarks (paged varlen attention, ensembles, MoE++, MoA): the GPU scripts' code paths on CPU at toy sizes, so a script run
on a lent GPU does not die on an API drift first."""
from __future__ import annotations

import json
import subprocess
import sys

from bench_smoke import ROOT, script_env


def test_paged_varlen_benchmark_smoke(tmp_path):
    env = script_env()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_paged_varlen_gpu.py"), "--smoke",
                           "--out-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"bench_paged_varlen_gpu.py --smoke failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    rows = json.loads(next(tmp_path.glob("paged_varlen_smoke-*.json")).read_text())["results"]["rows"]
    assert list(rows) == ["prefill", "last_chunk", "mixed"]
    assert all(r["triton_ms"] > 0 and r["torch_paged_ms"] > 0 for r in rows.values())
    assert rows["prefill"]["sdpa_contiguous_ms"] > 0


def test_bayes_benchmark_smoke(tmp_path):
    """bench_bayes_gpu.py: one member, token_mean and sequence_sample of a dummy-weight ensemble (no weight files)."""
    env = script_env()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_bayes_gpu.py"), "--smoke", "--out-dir",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"bench_bayes_gpu.py --smoke failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    r = json.loads(next(tmp_path.glob("bayes_gpu_smoke-*.json")).read_text())["results"]
    rows = r["rows"]
    assert list(rows) == ["one_member", "token_mean", "sequence_sample"] and r["ideal_token_mean_ratio"] == 0.25
    one, mean, sample = rows.values()
    # scope full: every parameter S times; token_mean keeps S x the KV heads, sequence_sample one member's
    assert mean["weight_bytes"] == sample["weight_bytes"] == 4 * one["weight_bytes"]
    assert mean["kv_bytes_per_token"] == 4 * one["kv_bytes_per_token"] == 4 * sample["kv_bytes_per_token"]
    for row in rows.values():
        for b in (1, 4):
            assert row[f"batch_{b}"]["output_tokens"] == b * 8 and row[f"batch_{b}"]["decode_tok_s"] > 0
    assert all(mean[f"batch_{b}"]["over_one_member"] > 0 for b in (1, 4))


def test_moepp_benchmark_smoke(tmp_path, tiny_llm_dir):
    """bench_moepp_gpu.py --smoke: forced routing at toy sizes through the Triton interpreter, and (b) with
    two tiny directories (MoE++ and plain MoE) as the trained routers."""
    from moepp_builders import write_moepp_dir
    routers = tmp_path / "routers"
    write_moepp_dir(routers / "moepp", tiny_llm_dir)
    write_moepp_dir(routers / "moe", tiny_llm_dir, n_const=0, n_copy=0, n_zero=0, gating_residual=False)
    env = script_env()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_moepp_gpu.py"), "--smoke", "--routers",
                           str(routers), "--out-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(next(tmp_path.glob("moepp_gpu_smoke-*.json")).read_text())["results"]
    assert r["check_rel_error"] <= 1e-2
    rows = r["forced"]["rows"]
    arms = {(row["arm"], row["tokens"], row["tau_or_p"]) for row in rows}
    assert arms == {(f"{arch}_{impl}", t, p) for t in (1, 64) for impl in ("fused", "eager")
                    for arch, p in [("moe", 1.0)] + [("moepp", p) for p in (0.0, 0.5, 1.0)]}
    for row in rows:
        assert row["layer_ms"] > 0 and "gbs" in row
        assert row["distinct_experts"] == 0 if row["tau_or_p"] == 0 else row["distinct_experts"] > 0
        if row["arm"].startswith("moe_"):
            assert row["speedup_vs_moe"] == 1.0 and row["ideal"] == 1.0
    assert set(r["forced"]["fit_a_plus_b_p"]) == {"1", "64"}
    trained = r["trained_routers"]
    assert trained["models"]["moe"]["is_moe"] and not trained["models"]["moepp"]["is_moe"]
    shares = {(row["arm"], row["tokens"]): row["ffn_share"] for row in trained["rows"]}
    assert all(shares[("moe_fused", t)] == 1.0 for t in (1, 64))
    assert 0 < shares[("moepp_fused", 64)] < 1  # random routers pick ZC experts too


def test_moa_benchmark_smoke(tmp_path):
    """bench_moa_gpu.py: dense, uniform, MoA at dense's batch and at the batch its smaller cache holds
    (a synthetic plan from the MILP), on the tiny shape through the engine's CPU paths, each with a profile of 2
    decode steps."""
    env = script_env()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_moa_gpu.py"), "--smoke", "--profile-steps",
                           "2", "--out-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, f"bench_moa_gpu.py --smoke failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    r = json.loads(next(tmp_path.glob("moa_gpu_smoke-*.json")).read_text())["results"]
    assert r["complete"] and r["skipped"] == []
    rows = {(row["arm"], row["context"]): row for row in r["rows"]}
    assert set(rows) == {(arm, c) for arm in ("dense", "uniform", "moa", "moa_max") for c in (64, 128)}
    for c in (64, 128):
        dense, moa, most = rows["dense", c], rows["moa", c], rows["moa_max", c]
        assert moa["batch"] == dense["batch"] < most["batch"] and all(row["tok_s"] > 0 for row in (dense, moa, most))
        assert moa["kv_gb_per_request"] < dense["kv_gb_per_request"]
        assert set(r["summary"][str(c)]) >= {"moa_max_over_dense_tok_s", "kv_per_request_dense_over_moa"}
    for row in r["rows"]:  # the decode rate is over full-batch steps only, at least --decode-steps of them
        assert row["decode_steps"] >= r["decode_steps"]
        prof = row["profile"]
        assert prof["steps"] == 2 and 0 < prof["busy_ms_per_step"] and prof["top"]
        assert all(op["ms_per_step"] > 0 for op in prof["top"])


def test_moa_experiment_smoke_and_resume(tmp_path):
    """moa_experiment.py --smoke: long-task data, a trained toy model, a compressed plan and eval moa's JSON;
    run again, every stage is found done (what lets a time-limited GPU job continue)."""
    env = script_env()
    argv = [sys.executable, str(ROOT / "benchmarks" / "moa_experiment.py"), "--smoke", "--work", str(tmp_path / "w"),
            "--out", str(tmp_path / "moa_eval.json")]
    for run in range(2):
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, f"moa_experiment.py --smoke failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
        if run == 1:
            assert "train lm" not in proc.stdout + proc.stderr and "compress moa: profiling" not in proc.stderr
    data = json.loads((tmp_path / "moa_eval.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"dense", "uniform", "per-layer", "per-head", "moa"}
    assert (tmp_path / "moa_eval.png").is_file()
    manifest = json.loads((tmp_path / "w" / "data" / "manifest.json").read_text())
    assert manifest["options"]["long_tasks"]["train"] == 12
    # the model starts from the short-window warm-up's weights, trained on repeats among its items
    warm_manifest = json.loads((tmp_path / "w" / "data_warmup" / "manifest.json").read_text())
    assert warm_manifest["options"]["long_kinds"] == ["repeat", "copy"]
    dense_info = json.loads((tmp_path / "w" / "dense" / "leanserve.json").read_text())
    assert dense_info["settings"]["init"]["dir"] == str(tmp_path / "w" / "warmup")
    # the dense check stops a run whose model cannot retrieve before compression (an unreachable bar here)
    proc = subprocess.run(argv + ["--min-dense-retrieval", "1.01"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode != 0 and "not worth compressing" in proc.stderr
    assert "compress moa" not in proc.stdout + proc.stderr
    check = json.loads((tmp_path / "w" / "dense_check.json").read_text())
    assert check["probes"] == 20 and 0 <= check["retrieval_accuracy"] <= 1 and check["min_accuracy"] == 1.01
    assert [r["words"] for r in check["induction"]] == [8, 32]  # 256-token windows


def test_induction_warmup_smoke(tmp_path):
    """induction_warmup_cpu.py --smoke: both builds, the two arms and the warm-up, and a results JSON with
    every arm's scores."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "induction_warmup_cpu.py"), "--smoke", "--work",
                           str(tmp_path / "w"), "--out-dir", str(tmp_path)], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"induction_warmup_cpu.py --smoke failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    result, = tmp_path.glob("induction_warmup-*.json")
    arms = json.loads(result.read_text())["results"]["arms"]
    assert set(arms) == {"warmup_only", "control", "warmup"}
    for arm in ("control", "warmup"):
        assert 0 <= arms[arm]["copy_words"]["words_in_place"] <= 1 and arms[arm]["copy_words"]["items"] == 2
        assert set(arms[arm]["exact"]) == {"retrieval", "passkey", "copy"}
        assert [r["words"] for r in arms[arm]["induction"]] == [8, 16, 32]
    info = json.loads((tmp_path / "w" / "warm" / "leanserve.json").read_text())
    assert info["settings"]["init"]["dir"] == str(tmp_path / "w" / "warmup")


def test_moa_experiment_cpu_scale_is_the_induction_recipe(monkeypatch):
    """moa_experiment.py --scale cpu claims the data, warm-up and training of induction_warmup_cpu.py's mixed
    warm-up arm flag for flag (the model that retrieved): only checkpoint and validation cadence may differ."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import induction_warmup_cpu as iw
    import moa_experiment as moa

    def training(flags) -> list[str]:
        cadence = {"--eval-every", "--save-every", "--device"}
        return [f for i, f in enumerate(flags) if f not in cadence and (i == 0 or flags[i - 1] not in cadence)]

    warmup_build = list(iw.WARMUP_BUILD)
    warmup_build[warmup_build.index("--long-kinds") + 1] = "repeat,retrieval,passkey,copy"
    assert list(moa.CPU.build) == iw.BUILD and list(moa.CPU.warmup_build) == warmup_build
    assert list(moa.CPU.shape) == training(iw.SHAPE)
    assert training(moa.CPU.train) == iw.TRAIN and training(moa.CPU.warmup) == iw.WARMUP
    assert moa.CPU.vocab_size == 2048  # induction_warmup_cpu's tokenizer
