"""--smoke runs of the method-vs-baseline serving benchmarks (MoE++, tensor parallelism): the GPU scripts' code paths on CPU at toy sizes, so a script run
on a lent GPU does not die on an API drift first."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench_smoke import ROOT, script_env


def test_moepp_serve_benchmark_smoke(tmp_path, tiny_llm_dir):
    """bench_moepp_serve_gpu.py --smoke: a real server for a tiny MoE++ model driven with real-text prompts,
    one row per concurrency. One arm only: a second server would add its start-up (the longest part on
    CPU) and test the same loop again."""
    from moepp_builders import write_moepp_dir
    write_moepp_dir(tmp_path / "moepp", tiny_llm_dir)
    env = script_env()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_moepp_serve_gpu.py"), "--smoke",
                           "--models", f"moepp={tmp_path / 'moepp'}", "--out-dir", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(next(tmp_path.glob("moepp_serve_smoke-*.json")).read_text())["results"]
    assert [(row["arm"], row["concurrency"]) for row in r["rows"]] == [("moepp", 1), ("moepp", 2)]
    for row in r["rows"]:
        assert row["output_tokens"] == row["requests"] * 8 and row["out_tok_s"] > 0 and not row["truncated"]
        assert row["speedup_vs_moepp"] == 1.0


def test_tp_benchmark_goals_and_fits():
    """bench_tp_gpu.py's goal check and the 70B shape's TP=2-or-4 choice on 80 and 141 GB cards. Its
    --smoke run (a TP=2 toy server on 2 gloo ranks) is left to a manual run: it starts the same
    server as tests/server/test_server_tensor_parallel.py through bench_serve_gpu's driver (smoke-tested
    in test_smoke_serve.py), for 100 s of a 2-core CI box."""
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
