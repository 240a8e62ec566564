"""GPU: what SiD costs at full size, with random weights (speed does not depend on their values).

(a) Serving. An SDXL-shaped pipeline (UNet 2.57B, CLIP-L + OpenCLIP bigG, SD VAE: bench_images_gpu's
builder) at 1024x1024 through leanserve's image engine (direct calls, no HTTP) and through the plain
diffusers call on the same pipeline object, in one run, at batch 1 and 4:
  - 1 and 4 UNet evaluations without CFG (guidance_scale 1, no negative prompt): what a 1- or 4-step
    SiD generator of this shape costs. leanserve's SiDPipeline is pixel-space (one text encoder, no VAE)
    and cannot wrap SDXL's UNet + VAE + two text encoders, so these rows time the SDXL pipeline itself
    at 1 and 4 steps of its shipped Euler scheduler: a step is one UNet call plus an elementwise update,
    the same work as a step of the SiD chain (x0 prediction + re-noising). The timesteps differ from a
    SiD chain's; the cost does not depend on them.
  - the teacher: 25 steps with CFG (guidance 5, a negative prompt) = 50 UNet sample-evaluations per image.
  Per row: images/s, the median (p50) latency of a request of n images (`s_per_call`), UNet ms per
  evaluation (CUDA events in the step callback; a 1-step plain diffusers call has no step span), text
  encoder and VAE ms (engine only).

(b) Training. One SiD iteration with an SD1.5-shaped teacher (UNet2DConditionModel SD1.5 config, 860M
parameters, 4x64x64 latents, cross-attention 768; random [B, 77, 768] text embeddings, no text encoder):
leanserve.trainers.sid.Trainer's own fake phase, generator phase (the loss functions of
trainers/sid_loss.py) and EMA update, Adam on the fake and generator networks, fp32 weights with bf16
autocast, default LSG guidance (κ = 1.5: CFG pairs in every network call), with and without gradient
checkpointing, chains of k = 1 and 4 steps, batch 1, 2, 4, 8, 16 per phase until the first CUDA OOM.
The Trainer loads a pixel-space teacher directory, so the benchmark hands it a random-weight teacher
in place of that directory (RandomTextTeacher below); everything else is the Trainer's code, except
that k is fixed instead of drawn (`train_iteration(k)`). Per configuration: median seconds per iteration
(CUDA events, warm-up excluded) and torch.cuda.max_memory_allocated.

(c) SiD on the real shapes teacher (zoo/shapes-teacher, or --shapes-teacher): generator images/s at batch
64, bf16, eager UNets against `distill sid --compile` and `--channels-last` (issue 20's "SiD at GPU speed":
~100 img/s eager on an H200 before), the compile time apart.

    python benchmarks/bench_sid_gpu.py [--parts serve train shapes] [--out-dir benchmarks/results]
    python benchmarks/bench_sid_gpu.py --smoke --out-dir /tmp/bench-smoke   # CPU, toy sizes, < 1 minute
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from bench_images_gpu import (
    MODELS,
    NEGATIVE,
    SCHEDULER,
    TINY_UNET,
    build_pipeline,
    make_tokenizer,
    num_params,
    time_diffusers,
    time_engine,
)
from common import (
    RESULTS,
    Deadline,
    free_device_memory,
    peak_memory_gib,
    time_calls,
    write_result,
)

from leanserve.models.image_model import ImageModel
from leanserve.models.image_params import ImageParams
from leanserve.server.engine.errors import ImageGenerationError
from leanserve.server.image_config import ImageEngineConfig
from leanserve.server.image_engine import AsyncImageEngine

ROOT = RESULTS.parents[1]
SERVE_BATCHES = (1, 4)
TRAIN_BATCHES = (1, 2, 4, 8, 16)
CHAINS = (1, 4)
TEXT_LEN = 77


# --------------------------------------------------------------------------- (a) serving

def serve_rows(teacher_steps: int) -> list[dict]:
    guidance = MODELS["sdxl"]["guidance_scale"]
    return [dict(label=f"few_step_{k}", steps=k, guidance=1.0, negative=None, unet_evals_per_image=k,
                 what=f"{k} UNet evaluation(s) per image, no CFG: the cost of a {k}-step SiD generator")
            for k in CHAINS] + \
           [dict(label=f"teacher_{teacher_steps}_step_cfg", steps=teacher_steps, guidance=guidance, negative=NEGATIVE,
                 unet_evals_per_image=2 * teacher_steps,
                 what=f"teacher: {teacher_steps} steps with CFG {guidance} (batched cond + uncond pair per step)")]


async def engine_timings(pipe, rows: list[dict], size: int, runs: dict[str, int]) -> dict:
    config = ImageEngineConfig(model="sdxl-random", max_image_batch=max(SERVE_BATCHES))
    engine = AsyncImageEngine(config, model=ImageModel(pipe, config.model))
    await engine.start()
    out = {}
    try:
        for row in rows:
            params = ImageParams(width=size, height=size, num_inference_steps=row["steps"],
                                 guidance_scale=row["guidance"], negative_prompt=row["negative"], seed=0)
            for n in SERVE_BATCHES:
                try:
                    out[row["label"], n] = await time_engine(engine, n, params, runs[row["label"]])
                except ImageGenerationError as e:  # the engine turns a failed call (e.g. OOM) into this
                    out[row["label"], n] = {"error": str(e)}
    finally:
        await engine.shutdown(0)
    return out


def diffusers_timing(pipe, row: dict, n: int, size: int, runs: int) -> dict:
    try:
        return time_diffusers(pipe, n, row["steps"], row["guidance"], size, runs, negative=row["negative"])
    except torch.cuda.OutOfMemoryError as e:
        error = f"CUDA out of memory: {str(e).splitlines()[0]}"
    free_device_memory(pipe.device)  # after the exception (and its frames) is gone
    return {"error": error}


def bench_serving(args, device: torch.device) -> dict:
    tokenizer = make_tokenizer()
    t0 = time.perf_counter()
    pipe = build_pipeline("sdxl", tokenizer, device, torch.bfloat16, tiny=args.smoke)
    build_s = time.perf_counter() - t0
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    rows = serve_rows(args.teacher_steps)
    runs = {row["label"]: args.teacher_runs if row["negative"] else args.runs for row in rows}
    engine = asyncio.run(engine_timings(pipe, rows, size, runs))
    out = {"model": "SDXL-shaped, random weights" + (" (toy sizes: --smoke)" if args.smoke else ""),
           "size": f"{size}x{size}", "dtype": "bfloat16", "unet_params": num_params(pipe.unet),
           "text_encoder_params": [num_params(pipe.text_encoder), num_params(pipe.text_encoder_2)],
           "vae_params": num_params(pipe.vae), "build_s": build_s,
           "what_was_timed": "SiDPipeline is pixel-space and cannot wrap SDXL (UNet + VAE + two text encoders): "
                             "the few-step rows run the SDXL pipeline itself at 1 and 4 Euler steps without CFG "
                             "(guidance_scale 1, no negative prompt), i.e. the UNet evaluations, text encoding and "
                             "VAE decode a 1- or 4-step SiD generator of this shape needs; the teacher row is the "
                             "25-step CFG call. s_per_call = p50 latency of a request of n images.",
           "rows": {}}
    for row in rows:
        entry = {k: row[k] for k in ("what", "steps", "guidance", "unet_evals_per_image")}
        for n in SERVE_BATCHES:
            ours = engine[row["label"], n]
            theirs = diffusers_timing(pipe, row, n, size, runs[row["label"]])
            cell = {"engine": ours, "diffusers": theirs}
            if "error" not in ours and "error" not in theirs:
                cell["engine_over_diffusers_images_per_s"] = ours["images_per_s"] / theirs["images_per_s"]
            entry[f"batch_{n}"] = cell
        out["rows"][row["label"]] = entry
    teacher = out["rows"][rows[-1]["label"]]
    for row in rows[:-1]:
        for n in SERVE_BATCHES:
            mine, ref = out["rows"][row["label"]][f"batch_{n}"]["engine"], teacher[f"batch_{n}"]["engine"]
            if "error" not in mine and "error" not in ref:
                out["rows"][row["label"]][f"batch_{n}"]["engine_speedup_over_teacher"] = \
                    mine["images_per_s"] / ref["images_per_s"]
    out["peak_memory_gib"] = peak_memory_gib(device)
    del pipe
    free_device_memory(device)
    return out


# --------------------------------------------------------------------------- (b) training

class RandomTextTeacher:
    """What sid.Trainer takes from a teacher pipeline (load_teacher's result): the UNet, the scheduler's
    ᾱ, a text encoder to freeze and `_encode`. There is no text encoder: `_encode` returns random
    [n, 77, cross_attention_dim] embeddings (the UNets' cost does not depend on their values)."""

    def __init__(self, unet, scheduler):
        self.unet, self.scheduler = unet, scheduler
        self.text_encoder = torch.nn.Identity()

    def _encode(self, prompts: list[str], device) -> torch.Tensor:
        return torch.randn(len(prompts), TEXT_LEN, self.unet.config.cross_attention_dim, device=device)


def latent_trainer_class():
    from leanserve.trainers.sid import Trainer

    class LatentTrainer(Trainer):
        """sid.Trainer on SD latents: batches shaped [B, C, H, W] from the UNet config (the pixel trainer
        draws [B, 3, size, size]); no shapes captions (prompts only feed the random embeddings)."""

        def _shape(self):
            c = self.teacher.config
            return (self.args.batch_size, c.in_channels, c.sample_size, c.sample_size)

        def _captions(self, phase: int) -> list[str]:
            return [""] * self.args.batch_size

    return LatentTrainer


def build_trainer(unet_config: dict, device: torch.device, checkpointing: bool, guidance: str, out_dir: str):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from leanserve.trainers import sid

    parser = argparse.ArgumentParser()
    sid.add_arguments(parser)
    args = parser.parse_args(["--teacher", "random-weights", "--out", out_dir, "--bf16", "--guidance", guidance]
                             + (["--gradient-checkpointing"] if checkpointing else []))
    with torch.device(device):  # random init on the device: seconds
        unet = UNet2DConditionModel(**unet_config)
    teacher = RandomTextTeacher(unet, DDIMScheduler(**SCHEDULER))
    # the Trainer would load a pixel-space teacher directory; it gets the random-weight teacher instead
    with mock.patch.object(sid, "load_teacher", lambda path: teacher):
        return latent_trainer_class()(args, device)


def time_config(trainer, k: int, batch: int, args, device) -> dict:
    trainer.args.batch_size = batch
    free_device_memory(device)
    try:
        times = time_calls(lambda: trainer.train_iteration(k), device, args.iterations, warmup=args.warmup,
                           budget_s=args.config_budget)
    except torch.cuda.OutOfMemoryError as e:
        return {"oom": True, "error": str(e).splitlines()[0], "peak_memory_gib": peak_memory_gib(device)}
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)  # an OOM can leave one network's gradients behind
    s = statistics.median(times)
    return {"s_per_iteration": s, "runs": len(times), "generator_images_per_s": batch / s,
            "peak_memory_gib": peak_memory_gib(device)}


def bench_training(args, device: torch.device, deadline: Deadline, save: Callable[[dict], None]) -> dict:
    unet_config = TINY_UNET if args.smoke else MODELS["sd15"]["unet"]
    batches = TRAIN_BATCHES[:2] if args.smoke else TRAIN_BATCHES
    out = {"teacher": "SD1.5 UNet2DConditionModel config, random weights" + (" (toy sizes: --smoke)" if args.smoke
                                                                             else ""),
           "precision": "fp32 weights, bf16 autocast", "optimizer": "Adam on the fake and generator networks "
           "(the Trainer's: betas (0, 0.999)), plus the EMA of the generator",
           "text_embeddings": f"random [B, {TEXT_LEN}, {unet_config.get('cross_attention_dim')}], no text encoder",
           "what_was_timed": "leanserve.trainers.sid.Trainer's _fake_phase, _generator_phase and _update_ema "
                             "(train_iteration with k fixed); its teacher is a random-weight UNet handed in place "
                             "of a pipeline directory. Batch = images per phase (each phase draws its own).",
           "configs": []}
    with tempfile.TemporaryDirectory(prefix="bench-sid-") as tmp:
        for checkpointing in (False, True):
            trainer = build_trainer(unet_config, device, checkpointing, args.guidance, tmp)
            out["unet_params"] = num_params(trainer.teacher)
            out["kappas"] = trainer.kappas.as_dict()
            for k in CHAINS:
                for batch in batches:
                    row = {"gradient_checkpointing": checkpointing, "k": k, "batch": batch}
                    if deadline.left() < args.config_budget + 30:
                        out["configs"].append({**row, "skipped": "script time limit"})
                        continue
                    row.update(time_config(trainer, k, batch, args, device))
                    out["configs"].append(row)
                    save(out)  # a run killed later keeps the rows done
                    print(f"  train ckpt={checkpointing!s:5} k={k} batch={batch:>2}: " + (
                        "OOM" if row.get("oom") else f"{row['s_per_iteration']:.3f} s/it, peak memory "
                        f"{row['peak_memory_gib']} GiB"), flush=True)
                    if row.get("oom"):
                        break  # larger batches cannot fit either
            del trainer
            free_device_memory(device)
    return out


def shapes_trainer(args, device: torch.device, out: str, batch: int, *flags: str):
    """leanserve's SiD Trainer on --shapes-teacher, bf16 autocast, LSG by default, `flags` added."""
    from leanserve.trainers import sid

    parser = argparse.ArgumentParser()
    sid.add_arguments(parser)
    return sid.Trainer(parser.parse_args(["--teacher", args.shapes_teacher, "--out", out, "--bf16", "--guidance",
                                          args.guidance, "--batch-size", str(batch), *flags]), device)


def bench_shapes(args, device: torch.device, deadline: Deadline, save: Callable[[dict], None]) -> dict:
    """(c) SiD on a real pixel-space teacher (zoo/shapes-teacher: a 6M-parameter UNet at 32x32): a small
    UNet's iteration is bound by the host (part (d) counts ~6k operator calls and ~6k backward nodes an
    iteration), so this is where --compile and --channels-last should pay. bf16 autocast, k = 1 and 4, the
    batch sizes of --shapes-batch; per config the warm-up (where compilation happens) is timed apart from
    the steady state."""
    import torch._dynamo.utils

    # inductor's CPU compile takes minutes
    arms = ("off",) if args.smoke else tuple(args.shapes_compile)
    batches = [2] if args.smoke else args.shapes_batch
    out = {"teacher": args.shapes_teacher, "precision": "fp32 weights, bf16 autocast",
           "arms": "skipped on CPU (--smoke)" if args.smoke else "MODE[-cl]: eager (off) or Trainer --compile "
           "MODE (torch.compile of the teacher, generator and fake UNets; reduce-overhead = + CUDA graphs), "
           "-cl = --channels-last. warmup_s: the first iterations of each config, where compilation happens; "
           "graphs: the dynamo graphs they compiled",
           "configs": []}
    with tempfile.TemporaryDirectory(prefix="bench-sid-shapes-") as tmp:
        for arm in arms:
            mode = arm.removesuffix("-cl")
            # the three UNets share one forward: without a reset, an arm's graphs would count against the
            # next arm's recompile limit (past it dynamo runs eagerly, silently)
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            trainer = shapes_trainer(args, device, tmp, batches[0], *([] if mode == "off" else ["--compile", mode]),
                                     *(["--channels-last"] if arm.endswith("-cl") else []))
            for batch, k in ((b, k) for b in batches for k in CHAINS):
                trainer.args.batch_size = batch  # the Trainer reads it every iteration
                row = {"arm": arm, "k": k, "batch": batch}
                if deadline.left() < args.config_budget + 60:
                    out["configs"].append({**row, "skipped": "script time limit"})
                    continue
                warmup = args.warmup + (0 if mode == "off" else 2)  # compiled: the first calls compile
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                try:
                    started = time.perf_counter()
                    for _ in range(warmup):
                        trainer.train_iteration(k)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    row["warmup_s"] = time.perf_counter() - started
                    row["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
                    times = time_calls(lambda k=k: trainer.train_iteration(k), device, args.iterations, warmup=0,
                                       budget_s=args.config_budget)
                except torch.cuda.OutOfMemoryError:
                    out["configs"].append({**row, "oom": True})
                    print(f"  shapes {arm} batch {batch} k={k}: OOM", flush=True)
                    trainer.optimizer.zero_grad(set_to_none=True)  # no half-step's gradient into the next config
                    free_device_memory(device)
                    continue
                s = statistics.median(times)
                row.update({"s_per_iteration": s, "runs": len(times), "generator_images_per_s": batch / s,
                            "peak_memory_gib": peak_memory_gib(device)})
                out["configs"].append(row)
                save(out)  # a run killed later keeps the rows done
                print(f"  shapes {arm} batch {batch} k={k}: warm-up {row['warmup_s']:.0f} s "
                      f"({row['graphs']} new graphs), {s:.3f} s/it, {batch / s:.0f} generator img/s", flush=True)
            del trainer
            free_device_memory(device)
    return out


def bench_cost(args) -> dict:
    """(d) What one eager iteration asks of the host and of the GPU, counted on the CPU (the model's operators
    do not depend on the device; the optimizer's do, see `counted`): top-level operator calls (each one
    dispatched from Python, a kernel launch or more on a GPU), backward nodes the autograd engine runs, and
    FLOPs (torch's FLOP counter); k = 1, LSG, bf16 autocast."""
    import collections

    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    batch = 2 if args.smoke else args.shapes_batch[0]
    with tempfile.TemporaryDirectory(prefix="bench-sid-cost-") as tmp:
        trainer = shapes_trainer(args, torch.device("cpu"), tmp, batch)
        trainer.train_iteration(1)  # lazy initialisations stay out of the count
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train_iteration(1)
        with FlopCounterMode(display=False) as flops:
            trainer.train_iteration(1)
    top = collections.Counter(e.name for e in prof.events() if e.cpu_parent is None)
    backward = sum(n for name, n in top.items() if name.startswith("autograd::engine::evaluate_function"))
    return {"teacher": args.shapes_teacher, "batch": batch, "k": 1, "guidance": args.guidance,
            "precision": "fp32 weights, bf16 autocast (as the shapes arms)",
            "counted": "top_level_ops: operator calls from Python, each Adam step counted once (its own "
                       "operators, a foreach loop on CUDA and a per-parameter one on CPU, are under it); "
                       "backward_nodes: the autograd engine's, from C++",
            "top_level_ops": sum(top.values()) - backward, "backward_nodes": backward,
            "nan_to_num_calls": top["aten::nan_to_num_"], "tflop_per_iteration": flops.get_total_flops() / 1e12,
            "most_called": top.most_common(12)}


# --------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["serve", "train", "shapes"],
                    choices=["serve", "train", "shapes", "cost"], help="cost: (d), on the CPU")
    ap.add_argument("--shapes-teacher", default=str(ROOT / "zoo" / "shapes-teacher"),
                    help="(c)'s pixel-space teacher directory")
    ap.add_argument("--shapes-batch", type=int, nargs="+", default=[64], help="(c)'s images per phase")
    ap.add_argument("--shapes-compile", nargs="+", default=["off", "off-cl", "default-cl", "reduce-overhead-cl"],
                    choices=[m + cl for m in ("off", "default", "reduce-overhead") for cl in ("", "-cl")],
                    help="(c)'s arms: eager (off) or a Trainer --compile mode, -cl with --channels-last")
    ap.add_argument("--teacher-steps", type=int, default=25)
    ap.add_argument("--runs", type=int, default=5, help="timed calls per few-step serving configuration")
    ap.add_argument("--teacher-runs", type=int, default=3, help="timed calls per teacher configuration")
    ap.add_argument("--guidance", default="lsg", choices=["lsg", "zero-cfg", "anti-cfg"],
                    help="SiD guidance preset of the training iteration (lsg: CFG pairs in every call)")
    ap.add_argument("--iterations", type=int, default=5, help="timed training iterations per configuration")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training iterations per configuration")
    ap.add_argument("--config-budget", type=float, default=10.0, help="seconds of timed iterations per config")
    ap.add_argument("--time-limit", type=float, default=480.0, help="seconds for the whole script: training "
                                                                    "configurations that would overrun are skipped")
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes, few iterations: tests the code paths")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    deadline = Deadline(args.time_limit)
    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # toy models on a shared 2-core machine: one thread beats two contended ones
        args.teacher_steps, args.runs, args.teacher_runs, args.iterations = 2, 1, 1, 2
    else:
        device = torch.device("cuda" if set(args.parts) != {"cost"} else "cpu")
    print(f"plan on {device}: "
          + ("(a) SDXL-shaped 1024x1024: 1 and 4 steps without CFG, teacher "
             f"{args.teacher_steps} steps with CFG; batch {SERVE_BATCHES}; engine and diffusers; "
             f"{args.runs}/{args.teacher_runs} timed calls after one warm-up (~2 min on an H100). "
             if "serve" in args.parts else "")
          + ("(b) SD1.5-shaped SiD iteration: checkpointing off/on x k in "
             f"{CHAINS} x batch {TRAIN_BATCHES} until OOM; {args.warmup} warm-up + up to {args.iterations} "
             f"timed iterations or {args.config_budget:.0f} s per config (~2-3 min). " if "train" in args.parts else "")
          + f"Hard stop for new training configs at {args.time_limit:.0f} s.", flush=True)
    results = {"torch": torch.__version__, "smoke": args.smoke}
    if "serve" in args.parts:
        results["serve"] = bench_serving(args, device)
        for label, row in results["serve"]["rows"].items():
            for n in SERVE_BATCHES:
                e = row[f"batch_{n}"]["engine"]
                print(f"  serve {label:>24} batch {n}: " + (e["error"] if "error" in e else
                      f"{e['images_per_s']:.2f} img/s, p50 {e['s_per_call']:.3f} s, UNet "
                      f"{e['unet_ms_per_eval'] or 0:.1f} ms/eval"), flush=True)

    def save(part: str | None = None, out: dict | None = None) -> Path:
        if part is not None:
            results[part] = out
        results["wall_s"] = args.time_limit - deadline.left()
        return write_result("sid_gpu_smoke" if args.smoke else "sid_gpu", results, args.out_dir)

    if "train" in args.parts:
        results["train"] = bench_training(args, device, deadline, lambda out: save("train", out))
    if "shapes" in args.parts:
        results["shapes"] = bench_shapes(args, device, deadline, lambda out: save("shapes", out))
    if "cost" in args.parts:
        results["cost"] = cost = bench_cost(args)
        print(f"  cost at batch {cost['batch']}: {cost['top_level_ops']} top-level ops, {cost['backward_nodes']} "
              f"backward nodes, {cost['tflop_per_iteration']:.2f} TFLOP an iteration", flush=True)
    path = save()
    print(f"total {results['wall_s']:.0f} s -> {path}")


if __name__ == "__main__":
    main()
