"""GPU: the cost of DPM-OT's semi-discrete OT, solve and lookup, in one run.

Targets are built like real ones, y = a·x0 + s·ε (leanserve.trainers.dpm_ot.noised_targets, fixed ε,
a and s at --t-prime of SD's scaled_linear schedule), with x0 random images in [-1, 1]: uniform noise at
a quarter of the resolution, bilinearly upsampled, so neighbouring pixels correlate and image norms
vary, as in real images. Speed does not depend on the values; the solver's convergence does, so the
convergence numbers are for these synthetic targets, not for a dataset. Each d builds one target set
at the largest N; smaller N use its first rows.

(a) matmul peak of this GPU, measured here: torch.matmul of --peak-size squares in bf16, fp32 with TF32,
    and strict fp32 (the fused kernel's fp32 path uses full-precision products, so strict fp32 is its
    ceiling; the PyTorch reference computes in fp32 with TF32 off, whatever the input dtype).
(b) one solver step's scoring, M = 10·N source samples against N targets, as the solver runs it: chunks
    of SAMPLE_CHUNK sources through the fused Triton ot_argmax and through the tiled PyTorch reference
    (kernels/ot_argmax.py), fp32 and bf16 inputs. TFLOP/s = 2·chunk·N·d / chunk time, against the peak
    of (a) that bounds that path; step_s = median chunk time × M / chunk (`chunks_timed` of
    `chunks_per_step` were timed: with a tight --score-budget this is an estimate, and says so).
(c) the solver itself (trainers/dpm_ot.py solve, SolverConfig defaults, bf16 scores): per-iteration time
    from its cell_counts on batch_factor·N fresh samples, then, where the initial evaluation and one
    eval_every-iteration segment fit --solve-budget, the real solve run in segments (stop_at/resume,
    bit-identical to one call) until it converges or the budget is spent: iterations, seconds,
    max_rel, chi2_excess. Sizes that do not fit get the per-iteration time only; the upper bound of a
    full solve (max_iters iterations) is printed as an estimate, never as a measurement.
(d) the lookup at sampling time, OTMap.jump (fp32 scores, as the sampler runs it) per batch B in
    {1, 16, 64}, against one UNet forward at batch B, bf16: a random-weight SD1.5 UNet (4x64x64 latents)
    for d = 16384 and the shapes teacher's UNet (zoo/shapes-teacher, 3x32x32) for d = 3072.

    python benchmarks/bench_dpm_ot_gpu.py [--out-dir benchmarks/results] [--solve-budget 120]
    python benchmarks/bench_dpm_ot_gpu.py --smoke --out-dir /tmp/bench-smoke   # CPU, toy sizes, < 1 minute
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from common import RESULTS, Deadline, free_device_memory, time_calls, write_result

SHAPES_TEACHER = Path(__file__).resolve().parents[1] / "zoo" / "shapes-teacher"
SCORE_FACTOR = 10  # M = 10·N sources per solver step (spec §3.1, SolverConfig.batch_factor)


def parse_shape(text: str) -> tuple[int, int, int]:
    c, h, w = (int(v) for v in text.split("x"))
    return c, h, w


def alpha_bar_at(t_prime: int) -> float:
    from bench_images_gpu import SCHEDULER
    from diffusers import DDIMScheduler
    return float(DDIMScheduler(**SCHEDULER).alphas_cumprod[t_prime])


def build_targets(shape, n: int, alpha_bar: float, seed: int, device) -> torch.Tensor:
    """[n, d] float32 on `device`: noised_targets of smooth random images in [-1, 1]."""
    import torch.nn.functional as F

    from leanserve.trainers.dpm_ot import noised_targets

    c, h, w = shape
    gen = torch.Generator(device).manual_seed(seed)
    low = torch.rand(n, c, max(h // 4, 1), max(w // 4, 1), generator=gen, device=device) * 2 - 1
    x0 = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)  # convex weights: stays in [-1, 1]
    return noised_targets(x0.cpu(), alpha_bar, fresh_noise=False, seed=seed).flatten(1).to(device)


# --------------------------------------------------------------------------- (a)

def matmul_peaks(size: int, device, budget: float) -> dict:
    out = {}
    for name, dtype, tf32 in (("bfloat16", torch.bfloat16, False), ("tf32", torch.float32, True),
                              ("float32", torch.float32, False)):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            times = time_calls(lambda: torch.matmul(a, b), device, 20, warmup=3, budget_s=budget)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        out[name] = {"tflops": 2 * size**3 / statistics.median(times) / 1e12, "size": size, "runs": len(times)}
    return out


# --------------------------------------------------------------------------- (b)

def scoring(y: torch.Tensor, peaks: dict, budget: float) -> list[dict]:
    """One solver step's scoring for targets y [N, d] (float32 and its bfloat16 copy)."""
    from leanserve.kernels.ot_argmax import ot_argmax_ref, ot_argmax_triton
    from leanserve.trainers.dpm_ot import SAMPLE_CHUNK

    n, d = y.shape
    m = SCORE_FACTOR * n
    chunk = min(SAMPLE_CHUNK, m)
    h = torch.zeros(n, device=y.device)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        yt = y.to(dtype)
        x = torch.randn(chunk, d, device=y.device, dtype=dtype)  # one chunk reused: values do not matter
        for impl, fn, peak in (("triton", ot_argmax_triton, "bfloat16" if dtype == torch.bfloat16 else "float32"),
                               ("torch_reference", ot_argmax_ref, "float32")):
            times = time_calls(lambda fn=fn: fn(x, yt, h), y.device, math.ceil(m / chunk), warmup=1, budget_s=budget)
            s = statistics.median(times)
            tflops = 2 * chunk * n * d / s / 1e12
            rows.append({"N": n, "d": d, "M": m, "dtype": str(dtype).removeprefix("torch."), "impl": impl,
                         "chunk": chunk, "chunk_s": s, "chunks_timed": len(times),
                         "chunks_per_step": m / chunk, "step_s": s * m / chunk, "tflops": tflops,
                         "peak": peak, "fraction_of_peak": tflops / peaks[peak]["tflops"]})
    return rows


# --------------------------------------------------------------------------- (c)

def solve_size(y: torch.Tensor, budget: float, fixed_iters: int) -> dict:
    """Per-iteration time, then the real solve in stop_at/resume segments while they fit `budget`."""
    from leanserve.trainers.dpm_ot import SolverConfig, cell_counts, solve

    config = SolverConfig()
    n = y.shape[0]
    started = time.perf_counter()
    gen = torch.Generator(y.device).manual_seed(config.seed)
    h = torch.zeros(n, device=y.device)
    num_step = max(int(config.batch_factor * n), 2)
    times = time_calls(lambda: cell_counts(y, h, num_step, gen), y.device, fixed_iters, warmup=0, budget_s=budget / 4)
    t_iter = statistics.median(times)
    t_eval = max(config.eval_factor, 20) / config.batch_factor * t_iter  # the evaluation batch is M_e = 100·N
    out = {"N": n, "d": y.shape[1], "dtype": str(y.dtype).removeprefix("torch."), "config": asdict(config),
           "s_per_iteration": t_iter, "iterations_timed": len(times),
           "estimate_full_solve_upper_bound_s": 3 * t_eval + config.max_iters * t_iter
           + config.max_iters / config.eval_every * t_eval,
           "estimate_note": "upper bound if it ran all max_iters: 3 initial candidates + iterations + periodic "
                            "evaluations at the measured per-iteration time; an estimate, not a measurement"}
    first_segment = 4 * t_eval + config.eval_every * t_iter  # initial candidates, then eval_every iterations + eval
    left = budget - (time.perf_counter() - started)
    if first_segment > left:
        out["solve"] = (f"not run: the initial evaluation and one {config.eval_every}-iteration segment would take "
                        f"~{first_segment:.0f} s, more than the {left:.0f} s left of the budget")
        return out
    states, logs, segments = [], [], []
    t0 = time.perf_counter()
    result = solve(y, config, log=logs.append, save=states.append, stop_at=1)  # initial candidates + iteration 1
    segments.append(time.perf_counter() - t0)
    while not result.finished:
        guess = segments[-1] if len(segments) > 1 else config.eval_every * t_iter + t_eval
        if time.perf_counter() - started + guess > budget:
            break
        k = states[-1].iteration
        t0 = time.perf_counter()
        result = solve(y, config, log=logs.append, state=states[-1], save=states.append,
                       stop_at=(k // config.eval_every + 1) * config.eval_every)
        segments.append(time.perf_counter() - t0)
    history = states[-1].history if not result.finished else result.history
    out["solve"] = {"finished": result.finished, "converged": result.converged, "iterations": result.iterations,
                    "init": result.init, "seconds": sum(segments), "init_and_first_iteration_s": segments[0],
                    "best": asdict(result.error), "history": history, "log": logs[:3] + logs[-1:],
                    "outcome": ("converged" if result.converged else "ran max_iters without converging")
                    if result.finished else f"budget spent: not converged after {result.iterations} iterations"}
    return out


# --------------------------------------------------------------------------- (d)

def sd15_unet(device, tiny: bool):
    from bench_images_gpu import MODELS, TINY_UNET
    from diffusers import UNet2DConditionModel
    with torch.device(device):
        return UNet2DConditionModel(**(TINY_UNET if tiny else MODELS["sd15"]["unet"])).to(torch.bfloat16).eval()


def shapes_unet(device):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(SHAPES_TEACHER / "unet").to(device, torch.bfloat16).eval()


def unet_forward_times(unet, text_len: int, batches, device, budget: float) -> dict:
    c = unet.config
    out = {}
    for b in batches:
        x = torch.randn(b, c.in_channels, c.sample_size, c.sample_size, device=device, dtype=torch.bfloat16)
        emb = torch.randn(b, text_len, c.cross_attention_dim, device=device, dtype=torch.bfloat16)
        t = torch.full((b,), 500, device=device)
        with torch.inference_mode():
            times = time_calls(lambda: unet(x, t, encoder_hidden_states=emb, return_dict=False), device, 10,
                               warmup=2, budget_s=budget)
        out[b] = {"s": statistics.median(times), "runs": len(times),
                  "sample_shape": [c.in_channels, c.sample_size, c.sample_size]}
    return out


def lookup_times(y: torch.Tensor, shape, alpha_bar: float, t_prime: int, batches, budget: float) -> dict:
    from leanserve.models.dpm_ot_sampler import OTMap

    n = y.shape[0]
    targets = y.view(n, *shape)
    # x0 is kept by an OT map for reports only; jump never reads it
    ot_map = OTMap(targets=targets, x0=targets, h=torch.zeros(n, device=y.device), t_prime=t_prime,
                   alpha_bar=alpha_bar)
    out = {}
    for b in batches:
        x = torch.randn(b, *shape, device=y.device)
        times = time_calls(lambda: ot_map.jump(x), y.device, 10, warmup=1, budget_s=budget)
        out[b] = {"s": statistics.median(times), "s_per_image": statistics.median(times) / b, "runs": len(times)}
    return out


def bench_lookups(targets: dict, args, alpha_bar: float, device) -> dict:
    unets = {"shapes-teacher": (shapes_unet(device), json.loads((SHAPES_TEACHER / "text_encoder" / "config.json")
                                                                .read_text())["max_position_embeddings"]),
             "sd15-random": (sd15_unet(device, args.smoke), 77)}
    forward = {name: unet_forward_times(unet, text_len, args.lookup_batches, device, args.score_budget)
               for name, (unet, text_len) in unets.items()}
    del unets
    free_device_memory(device)
    rows = []
    for shape, y in targets.items():
        unet = "shapes-teacher" if shape[0] == 3 else "sd15-random"  # pixel 3-channel vs 4-channel latents
        for n in args.num_targets:
            for b, look in lookup_times(y[:n], shape, alpha_bar, args.t_prime, args.lookup_batches,
                                        args.score_budget).items():
                rows.append({"N": n, "shape": "x".join(map(str, shape)), "batch": b, "lookup": look, "unet": unet,
                             "unet_forward_s": forward[unet][b]["s"],
                             "lookup_over_unet_forward": look["s"] / forward[unet][b]["s"]})
    return {"unet_forward": forward, "rows": rows}


# --------------------------------------------------------------------------- main

def run(args, device, deadline: Deadline) -> dict:
    shapes = [parse_shape(s) for s in args.shapes]
    alpha_bar = alpha_bar_at(args.t_prime)
    results = {"t_prime": args.t_prime, "alpha_bar": alpha_bar, "torch": torch.__version__, "smoke": args.smoke,
               "targets": "y = a*x0 + s*eps (noised_targets, fixed eps), x0 = random images in [-1, 1]: uniform "
                          "noise at 1/4 resolution, bilinearly upsampled; smaller N = first rows of the largest"}
    t0 = time.perf_counter()
    targets = {shape: build_targets(shape, max(args.num_targets), alpha_bar, args.seed, device) for shape in shapes}
    results["target_build_s"] = time.perf_counter() - t0
    print(f"targets built in {results['target_build_s']:.1f} s", flush=True)

    results["matmul_peak"] = matmul_peaks(args.peak_size, device, args.score_budget)
    print("(a) peaks TFLOP/s: " + ", ".join(f"{k} {v['tflops']:.1f}" for k, v in results["matmul_peak"].items()),
          flush=True)

    results["lookup"] = bench_lookups(targets, args, alpha_bar, device)
    for r in results["lookup"]["rows"]:
        print(f"(d) N={r['N']:>6} {r['shape']:>8} B={r['batch']:>3}: jump {1e3 * r['lookup']['s']:.3f} ms vs "
              f"{r['unet']} forward {1e3 * r['unet_forward_s']:.2f} ms ({r['lookup_over_unet_forward']:.2f}x)",
              flush=True)

    results["scoring"] = []
    for shape, y in targets.items():
        for n in args.num_targets:
            for r in scoring(y[:n], results["matmul_peak"], args.score_budget):
                results["scoring"].append(r)
                print(f"(b) N={n:>6} d={r['d']:>6} {r['dtype']:>8} {r['impl']:>15}: step {r['step_s']:.3f} s "
                      f"({r['chunks_timed']}/{math.ceil(r['chunks_per_step'])} chunks timed), {r['tflops']:.1f} "
                      f"TFLOP/s = {r['fraction_of_peak']:.2f} of {r['peak']} peak", flush=True)

    results["solve"] = []
    sizes = [(shape, n) for shape in shapes for n in args.num_targets]
    for i, (shape, n) in enumerate(sizes):
        budget = min(args.solve_budget, (deadline.left() - 5) / (len(sizes) - i))
        if budget <= 0:
            results["solve"].append({"N": n, "shape": "x".join(map(str, shape)), "skipped": "script time limit"})
            continue
        r = solve_size(targets[shape][:n].to(getattr(torch, args.solve_dtype)), budget, args.solve_fixed_iters)
        r.update(shape="x".join(map(str, shape)), budget_s=budget)
        results["solve"].append(r)
        outcome = r["solve"] if isinstance(r["solve"], str) else \
            f"{r['solve']['outcome']}: {r['solve']['iterations']} iterations in {r['solve']['seconds']:.1f} s, " \
            f"max_rel {r['solve']['best']['max_rel']:.3f}, chi2_excess {r['solve']['best']['chi2_excess']:.2e}"
        print(f"(c) N={n:>6} d={r['d']:>6}: {r['s_per_iteration']:.3f} s/iteration; {outcome}", flush=True)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-targets", type=int, nargs="+", default=[10_000, 50_000])
    ap.add_argument("--shapes", nargs="+", default=["3x32x32", "4x64x64"], help="target image shapes, CxHxW")
    ap.add_argument("--t-prime", type=int, default=200, help="noise level of the targets (scaled_linear schedule)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-size", type=int, default=8192, help="side of the square matmuls of (a)")
    ap.add_argument("--score-budget", type=float, default=4.0, help="seconds of timed calls per (b)/(d) measurement")
    ap.add_argument("--solve-budget", type=float, default=120.0, help="seconds per size for (c)")
    ap.add_argument("--solve-fixed-iters", type=int, default=3, help="solver iterations timed per size in (c)")
    ap.add_argument("--solve-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--lookup-batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--time-limit", type=float, default=480.0,
                    help="seconds for the whole script: the solves of (c) share what is left of it")
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes (Triton interpreter): tests the code paths")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    deadline = Deadline(args.time_limit)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel module is imported (lazily, below)
        torch.set_num_threads(1)
        device = torch.device("cpu")
        args.num_targets, args.shapes, args.lookup_batches = [32, 64], ["3x4x4", "4x8x8"], [1, 2]
        args.peak_size, args.score_budget, args.solve_budget, args.solve_fixed_iters = 128, 0.5, 5.0, 2
    else:
        device = torch.device("cuda")
    sizes = len(args.num_targets) * len(args.shapes)
    print(f"plan on {device}: N {args.num_targets} x shapes {args.shapes}; (a) matmul peaks {args.peak_size}^2; "
          f"(d) jump at B {args.lookup_batches} vs UNet forwards; (b) scoring fp32/bf16 x Triton/reference, "
          f"<= {args.score_budget:.0f} s timed each (16 measurements); (c) solve {args.solve_dtype}, "
          f"<= {args.solve_budget:.0f} s per size ({sizes} sizes), all within {args.time_limit:.0f} s "
          "(H100 guess: targets ~15 s, (a)+(d) ~30 s, (b) ~100 s, (c) the rest).", flush=True)
    results = run(args, device, deadline)
    results["wall_s"] = args.time_limit - deadline.left()
    path = write_result("dpm_ot_gpu_smoke" if args.smoke else "dpm_ot_gpu", results, args.out_dir)
    print(f"total {results['wall_s']:.0f} s -> {path}")


if __name__ == "__main__":
    main()
