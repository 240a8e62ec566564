"""The GPU benchmark scripts' --smoke modes: the same code paths on CPU at toy sizes, so a script
the lead runs on a lent GPU does not die on an API drift (e.g. sid.Trainer's internals) first."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sid_and_dpm_ot_benchmarks_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    # both scripts run single-threaded: side by side they take the time of one
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / f"bench_{name}_gpu.py"), "--smoke",
                                     "--out-dir", str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
             for name in ("sid", "dpm_ot")}
    for name, proc in procs.items():
        output = proc.communicate(timeout=240)[0]
        assert proc.returncode == 0, f"bench_{name}_gpu.py --smoke failed:\n{output[-4000:]}"

    sid = json.loads(next(tmp_path.glob("sid_gpu_smoke-*.json")).read_text())["results"]
    rows = sid["serve"]["rows"]
    assert list(rows) == ["few_step_1", "few_step_4", "teacher_2_step_cfg"]
    assert [rows[k]["unet_evals_per_image"] for k in rows] == [1, 4, 4]
    for row in rows.values():
        for n in (1, 4):
            engine = row[f"batch_{n}"]["engine"]
            assert engine["images_per_s"] > 0 and engine["unet_ms_per_eval"] > 0
            assert row[f"batch_{n}"]["diffusers"]["images_per_s"] > 0
    train = sid["train"]
    assert train["kappas"] == {"kappa1": 1.5, "kappa2": 1.5, "kappa3": 1.5, "kappa4": 1.5}
    configs = [(c["gradient_checkpointing"], c["k"], c["batch"]) for c in train["configs"]]
    assert configs == [(ckpt, k, b) for ckpt in (False, True) for k in (1, 4) for b in (1, 2)]
    assert all(c["s_per_iteration"] > 0 and c["runs"] == 2 for c in train["configs"])

    ot = json.loads(next(tmp_path.glob("dpm_ot_gpu_smoke-*.json")).read_text())["results"]
    assert set(ot["matmul_peak"]) == {"bfloat16", "tf32", "float32"}
    scoring = {(r["N"], r["d"], r["dtype"], r["impl"]) for r in ot["scoring"]}
    assert scoring == {(n, d, dt, impl) for n in (32, 64) for d in (48, 256) for dt in ("float32", "bfloat16")
                       for impl in ("triton", "torch_reference")}
    assert all(r["chunks_timed"] == 1 and r["step_s"] > 0 for r in ot["scoring"])  # M = 10N fits one chunk
    assert len(ot["lookup"]["rows"]) == 8 and all(r["lookup"]["s"] > 0 for r in ot["lookup"]["rows"])
    for r in ot["solve"]:  # toy problems converge well inside the budget
        assert r["solve"]["converged"], r
        assert r["solve"]["best"]["chi2_excess"] <= 1e-3 and r["solve"]["best"]["empty"] == 0


def test_load_server_smoke():
    """benchmarks/load_server.py --smoke: a real server, 2 rounds of 50 streams and 10 slow clients of each kind."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_server.py"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout)
    for name in ("round_1", "round_2"):
        assert r[name]["outcomes"] == {"ok": 50}
        assert not any(r[name]["gauges_after"].values())
    clients = r["misbehaving_clients"]
    assert all(clients[kind]["closed_by_server"] == 10 for kind in ("idle", "slow_headers", "slow_bodies"))
    assert clients["slow_bodies"]["status_408"] == 10
    assert clients["slow_reader"]["completed"] and clients["never_reader_cut_after_s"] is not None
    assert r["server_load_after"] == 0 and r["sigterm"]["exit_code"] == 0 and r["server_log"]["tracebacks"] == 0


def test_serve_benchmark_smoke(tmp_path):
    """bench_serve_gpu.py: the GPU path (a served toy Llama with --load-format dummy, the Poisson run, an
    image row, --profile) and the CPU mode (zoo/chat-tiny next to transformers generate), side by side."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "benchmarks" / "bench_serve_gpu.py")
    procs = {mode: subprocess.Popen([sys.executable, script, "--smoke", *flags, "--out-dir", str(tmp_path)], cwd=ROOT,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for mode, flags in (("gpu", ["--profile"]), ("cpu", ["--cpu"]))}
    for mode, proc in procs.items():
        output = proc.communicate(timeout=240)[0]
        assert proc.returncode == 0, f"bench_serve_gpu.py --smoke ({mode}) failed:\n{output[-4000:]}"

    latency = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
    gpu = json.loads(next(tmp_path.glob("serve_gpu_smoke-*.json")).read_text())["results"]
    assert [r["concurrency"] for r in gpu["rows"]] == [1, 4]
    for row in gpu["rows"]:
        assert "error" not in row and not row["truncated"] and row["requests"] == 4, row
        assert row["output_tokens"] == 4 * 8 and row["out_tok_s"] > 0
        assert row["bound_tok_s"] is None and row["frac_of_bound"] is None  # no bound on CPU
        assert all(row[k] > 0 for k in latency) and row["itl_p99_ms"] >= row["itl_p50_ms"]
    poisson = gpu["poisson"]
    assert "error" not in poisson and poisson["requests"] == 6 and poisson["output_tokens"] == 6 * 8
    [image] = gpu["images"]
    assert "error" not in image, image
    assert (image["model"], image["steps"], image["concurrency"], image["size"]) == ("shapes-sid", 1, 4, 32)
    assert image["http_img_s"] > 0 and image["direct_img_s"] > 0
    assert image["http_over_direct"] == image["http_img_s"] / image["direct_img_s"]
    assert 1 <= image["http_images_per_call"] <= 4
    assert set(gpu["profile"]) == {"how", "concurrency_1", "concurrency_4"}
    assert all("aten::" in gpu["profile"][f"concurrency_{c}"]["table"] for c in (1, 4))

    cpu = json.loads(next(tmp_path.glob("serve_cpu_smoke-*.json")).read_text())["results"]
    assert [g["batch"] for g in cpu["generate"]] == [1, 4] and all(g["tok_s"] > 0 for g in cpu["generate"])
    assert [r["concurrency"] for r in cpu["rows"]] == [1, 4]
    for row in cpu["rows"]:
        assert "error" not in row and row["output_tokens"] == 4 * 8, row
        assert row["http_over_generate"] > 0 and all(row[k] > 0 for k in latency)


def test_paged_varlen_benchmark_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_paged_varlen_gpu.py"), "--smoke",
                           "--out-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"bench_paged_varlen_gpu.py --smoke failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    rows = json.loads(next(tmp_path.glob("paged_varlen_smoke-*.json")).read_text())["results"]["rows"]
    assert list(rows) == ["prefill", "last_chunk", "mixed"]
    assert all(r["triton_ms"] > 0 and r["torch_paged_ms"] > 0 for r in rows.values())
    assert rows["prefill"]["sdpa_contiguous_ms"] > 0


def test_bayes_benchmark_smoke(tmp_path):
    """bench_bayes_gpu.py: one member, token_mean and sequence_sample of a dummy-weight ensemble (no weight files)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
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
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
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


def test_aioli_experiment_smoke(tmp_path):
    """benchmarks/aioli_experiment.py --smoke on one setting: worker processes train every arm, the best
    static mixture of the sweep is rerun at the other seed, and the paired deltas are written."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
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


def test_moa_benchmark_smoke(tmp_path):
    """bench_moa_gpu.py: dense, uniform, MoA at dense's batch and at the batch its smaller cache holds
    (a synthetic plan from the MILP), on the tiny shape through the engine's CPU paths."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_moa_gpu.py"), "--smoke", "--out-dir",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
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


def test_moepp_serve_benchmark_smoke(tmp_path, tiny_llm_dir):
    """bench_moepp_serve_gpu.py --smoke: a real server for a tiny MoE++ model driven with real-text prompts,
    one row per concurrency. One arm only: a second server would add its start-up (the longest part on
    CPU) and test the same loop again."""
    from moepp_builders import write_moepp_dir
    write_moepp_dir(tmp_path / "moepp", tiny_llm_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_moepp_serve_gpu.py"), "--smoke",
                           "--models", f"moepp={tmp_path / 'moepp'}", "--out-dir", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(next(tmp_path.glob("moepp_serve_smoke-*.json")).read_text())["results"]
    assert [(row["arm"], row["concurrency"]) for row in r["rows"]] == [("moepp", 1), ("moepp", 2)]
    for row in r["rows"]:
        assert row["output_tokens"] == row["requests"] * 8 and row["out_tok_s"] > 0 and not row["truncated"]
        assert row["speedup_vs_moepp"] == 1.0


def test_tp_benchmark_smoke(tmp_path):
    """bench_tp_gpu.py --smoke: a toy Llama served at --tensor-parallel-size 2 (2 gloo ranks on CPU)
    through the same rows as the GPU run; and the 70B shape's TP=2-or-4 choice on 80 and 141 GB cards."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_tp_gpu.py"), "--smoke", "--out-dir",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench_tp_gpu.py --smoke failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    [path] = tmp_path.glob("tp_gpu_smoke-*x2.json")
    [run] = json.loads(path.read_text())["results"]["runs"]
    assert run["tensor_parallel_size"] == 2 and "error" not in run
    assert [r["concurrency"] for r in run["rows"]] == [1, 4]
    for row in run["rows"]:
        assert "error" not in row and not row["truncated"] and row["output_tokens"] == 4 * 8, row
        assert row["decode_tok_s"] == row["concurrency"] * row["stream_decode_tok_s"] > 0
        assert row["bound_tok_s"] is None  # no bound on CPU

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_tp_gpu import LLAMA3_70B, fits, goals

    def run(tp: int, *rows: tuple[int, float, float]) -> dict:
        return {"shape": "llama3-8b", "tensor_parallel_size": tp,
                "rows": [{"concurrency": c, "decode_tok_s": t, "decode_frac_of_bound": f} for c, t, f in rows]}
    met = goals([run(1, (1, 100.0, 0.5)), run(2, (1, 170.0, 0.4), (64, 5000.0, 0.8))])
    assert met["tp2_over_tp1_at_c1"] == 1.7 and met["tp2_at_c1_met"] and met["tp2_at_c64_met"]
    assert goals([run(2, (1, 170.0, 0.4))])["tp2_over_tp1_at_c1"] is None  # no TP=1 run: no ratio
    args = argparse.Namespace(concurrency=[1, 64, 256], prompt_len=128, max_tokens=256, gpu_memory_utilization=0.9)
    weights = 141 * 10**9  # bf16 Llama-3-70B
    assert not fits(LLAMA3_70B, weights, 2, 80 * 2**30, args) and fits(LLAMA3_70B, weights, 4, 80 * 2**30, args)
    assert fits(LLAMA3_70B, weights, 2, 141 * 10**9, args)


def test_modomodo_experiment_smoke(tmp_path):
    """benchmarks/modomodo_experiment.py --smoke: data build, SFT, pilots, heuristics, `mixture fit`, confirmation
    and the report, at toy sizes on the CPU."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
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
    assert set(r["base"]["out_by_task"]) == {"sub", "add_6_digits", "reverse_long", "sort_long", "count_long"}
    assert (tmp_path / "eval.png").stat().st_size > 0
    model = json.loads(next((tmp_path / "work" / "runs").glob("*/leanserve.json")).read_text())
    assert model["settings"]["mixture"]["kind"] == "static"
