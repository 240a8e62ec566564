"""--smoke runs of the serving benchmarks (load, speed through HTTP): the GPU scripts' code paths on CPU at toy sizes, so a script run
on a lent GPU does not die on an API drift first."""
from __future__ import annotations

import json
import subprocess
import sys
import pytest

from bench_smoke import ROOT, script_env


def test_load_server_smoke():
    """benchmarks/load_server.py --smoke: a real server, 2 rounds of 50 streams and 10 slow clients of each kind."""
    env = script_env()
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
    image row sampled by py-spy, --profile) and the CPU mode (zoo/chat-tiny next to transformers
    generate), side by side."""
    env = script_env()
    script = str(ROOT / "benchmarks" / "bench_serve_gpu.py")
    procs = {mode: subprocess.Popen([sys.executable, script, "--smoke", *flags, "--out-dir", str(tmp_path)], cwd=ROOT,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for mode, flags in (("gpu", ["--profile", "--py-spy"]), ("cpu", ["--cpu"]))}
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
    assert "error" not in image, image.get("error")
    assert (image["model"], image["steps"], image["concurrency"], image["size"]) == ("shapes-sid", 1, 4, 32)
    assert image["http_img_s"] > 0 and image["direct_img_s"] > 0
    assert image["http_over_direct"] == image["http_img_s"] / image["direct_img_s"]
    assert 1 <= image["http_images_per_call"] <= 4
    spy = image["py_spy"]
    assert "error" not in spy, spy
    assert (tmp_path / "pyspy_shapes-sid_1.txt").exists()
    # the API process's event loop, and the pipeline's worker in the image engine's own process
    [loop] = [t for t in spy if t.endswith("MainThread") and not t.startswith("child")]
    workers = [t for t in spy if t.endswith("leanserve-image-engine")]
    assert workers and all(t.startswith("child ") for t in workers)
    for thread in (loop, *workers):
        assert spy[thread]["samples"] > 0 and 0 < sum(share for _, share in spy[thread]["top"]) <= 1.001
    phases = image["py_spy_phases"]
    [engine] = [t for t in phases if t.endswith("leanserve-image-engine")]  # the idle one is left out
    assert abs(sum(phases[engine]["phases"].values()) - 1) < 0.01
    assert phases[engine]["phases"].get("denoising loop", 0) > 0  # the pipeline ran during the window
    assert set(gpu["profile"]) == {"how", "concurrency_1", "concurrency_4"}
    assert all("aten::" in gpu["profile"][f"concurrency_{c}"]["table"] for c in (1, 4))

    cpu = json.loads(next(tmp_path.glob("serve_cpu_smoke-*.json")).read_text())["results"]
    assert [g["batch"] for g in cpu["generate"]] == [1, 4] and all(g["tok_s"] > 0 for g in cpu["generate"])
    assert isinstance(cpu["server_args"], str) and isinstance(gpu["server_args"], str)  # the served options
    assert [r["concurrency"] for r in cpu["rows"]] == [1, 4]
    for row in cpu["rows"]:
        assert "error" not in row and row["output_tokens"] == 4 * 8, row
        assert row["http_over_generate"] > 0 and all(row[k] > 0 for k in latency)
    generate = {g["batch"]: g["tok_s"] for g in cpu["generate"]}
    assert cpu["goal_ratios"] == {"http_4_over_generate_1": cpu["rows"][-1]["out_tok_s"] / generate[1]}
    # dtype auto: what each side does by default with this bf16 checkpoint, recorded
    assert cpu["dtype"] == "auto" and {g["dtype"] for g in cpu["generate"]} == {"bfloat16"}
    assert cpu["server_dtype"] in ("bfloat16", "float32")


def test_roofline_adds_the_prefills_of_the_closed_loop(monkeypatch):
    """bench_serve_gpu.roofline_tok_s: with an infinitely fast GEMM it is the decode-only bandwidth bound;
    once the prefill FLOPs dominate, output tok/s stops growing with concurrency, at the GEMM peak over the
    FLOPs of one output token and its share of a prompt (KV reads off)."""
    import types
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from bench_decode_gpu import bound_tok_s
    from bench_serve_gpu import roofline_tok_s
    args = types.SimpleNamespace(prompt_len=400, max_tokens=128)
    wbytes, params, ctx = 16_000_000_000, 7_500_000_000, 464.0
    for c in (1, 64, 256):
        assert roofline_tok_s(c, args, ctx, wbytes, params, 4000.0, float("inf")) == pytest.approx(
            bound_tok_s(c, ctx, wbytes, 4000.0))
    flops_per_out_token = (1 + 400 / 128) * 2 * params
    at_roof = 800e12 / flops_per_out_token
    huge_bw = 1e12  # GB/s: weights and KV read in no time
    for c in (64, 256):
        assert roofline_tok_s(c, args, ctx, wbytes, params, huge_bw, 800.0) == pytest.approx(at_roof, rel=1e-6)
    # decode-bound at one stream, compute-bound at 256: the roofline sits below the bandwidth bound there
    assert roofline_tok_s(1, args, ctx, wbytes, params, 4000.0, 800.0) == pytest.approx(
        bound_tok_s(1, ctx, wbytes, 4000.0), rel=0.03)
    assert roofline_tok_s(256, args, ctx, wbytes, params, 4000.0, 800.0) < 0.5 * bound_tok_s(256, ctx, wbytes, 4000.0)


def test_cpu_malloc_benchmark_smoke(tmp_path):
    """benchmarks/bench_cpu_malloc.py at toy sizes: one pair of engine processes, both arms timed."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cpu_malloc.py"), "--pairs", "1",
                           "--batch", "2", "--prompt-len", "8", "--max-tokens", "4", "--out-dir", str(tmp_path)],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(next(tmp_path.glob("cpu_malloc-*.json")).read_text())["results"]
    assert len(r["tok_s"]["default"]) == len(r["tok_s"]["kept"]) == 1 and min(r["mean_tok_s"].values()) > 0
