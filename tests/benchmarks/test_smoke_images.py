"""--smoke runs of SiD and DPM-OT GPU benchmarks: the GPU scripts' code paths on CPU at toy sizes, so a script run
on a lent GPU does not die on an API drift first."""
from __future__ import annotations

import json
import subprocess
import sys

from bench_smoke import ROOT, script_env


def load_unet(pipeline_dir: str):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")


def test_sid_and_dpm_ot_benchmarks_smoke(tmp_path):
    env = script_env()
    # both scripts run single-threaded: side by side they take the time of one
    parts = {"sid": ["--parts", "serve", "train", "shapes", "cost"], "dpm_ot": []}
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / f"bench_{name}_gpu.py"), "--smoke",
                                     "--out-dir", str(tmp_path), *parts[name]], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    shapes = sid["shapes"]  # the zoo teacher, eager only on CPU
    assert [(c["arm"], c["k"]) for c in shapes["configs"]] == [("off", 1), ("off", 4)]
    assert all(c["generator_images_per_s"] > 0 and c["warmup_s"] > 0 for c in shapes["configs"])
    assert all(c["graphs"] == 0 for c in shapes["configs"])  # eager: dynamo compiled nothing
    cost = sid["cost"]
    # per update one nan_to_num_ per parameter of the network updated: the fake's and the generator's
    assert cost["nan_to_num_calls"] == 2 * len(list(load_unet(cost["teacher"]).parameters()))
    assert cost["top_level_ops"] > cost["nan_to_num_calls"] and cost["backward_nodes"] > 0
    assert cost["tflop_per_iteration"] > 0

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


def test_image_graphs_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_image_graphs_gpu.py"), "--smoke",
                           "--out-dir", str(tmp_path)], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, f"bench_image_graphs_gpu.py --smoke failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    rows = json.loads(next(tmp_path.glob("image_graphs_smoke-*.json")).read_text())["results"]["rows"]
    assert [(r["batch"], r["steps"]) for r in rows] == [(1, 2), (2, 2)]
    assert all(r["eager_img_s"] > 0 and "graphed_ms" not in r for r in rows)  # no graphs on CPU
