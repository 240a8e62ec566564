"""`leanserve train dpm-ot`: fit the semi-discrete OT map of DPM-OT (Li et al., ICCV 2023).

Source μ = N(0, I_d), the law the sampler draws x_T from; targets y_1..y_N at noise level t′
(y_i = a·x0_i + s·ε_i with fixed ε_i, a = √ᾱ_t′, s = √(1 − ᾱ_t′); the fresh-noise variant solves
against a·x0_i). The potentials h minimise the convex energy E(h) = E_μ[max_i <x, y_i> + h_i] −
mean(h), whose gradient is (cell masses − 1/N). Solver (§3.2):
- initialisation: the best, on the evaluation batch, of h = 0, h = −‖y‖²/2 (nearest target) and
  h = −√(2 ln N)·‖y − ȳ‖, or a warm start from an earlier map with the same targets;
- minibatch Monte-Carlo cell masses (M_step = batch_factor·N fresh antithetic samples per step),
  Adam (0.9, 0.999, no bias correction), lr = lr_scale·median‖y − ȳ‖ / √(1 + k/lr_decay_iters),
  h re-centred after every step, and an EMA of h (what is evaluated and saved);
- convergence on a fixed evaluation batch of M_e = eval_factor·N samples: the maximum relative
  cell-mass error max_i |N·ŵ_i − 1| ≤ --tol-max-rel, χ²_excess = N·Σ(ŵ − 1/N)² − (N − 1)/M_e ≤
  --tol-chi2 (the unbiased mean squared relative error) and no empty cell. The Monte-Carlo floor
  of the maximum error is ≈ √(2 ln N · N / M_e) (logged): --tol-max-rel must sit above it.
The scores are one fused GEMM + running argmax over target tiles (kernels/ot_argmax.py); the
[M, N] score matrix never exists. Single process (no torchrun sharding yet); the best EMA h seen
is kept. `--solve-dtype bfloat16` feeds the GEMM bf16 (tensor cores on GPU).

Checkpoints: OUT/ot_checkpoint.safetensors (solver state, RNG, targets; written atomically every
--save-every iterations and at --stop-at); `--resume` continues bit for bit on the same device and
reuses the saved targets (no second round of teacher sampling).

Output: a copy of the teacher directory plus `ot_map.safetensors` (targets, clean x0, h; t′ and
provenance in its header) and a `leanserve.json` with method "dpm_ot". With model targets
DPM-OT is a cache of the teacher's own samples: the target NFE is recorded.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from leanserve.atomic import atomic_write
from leanserve.errors import UserError
from leanserve.kernels.ot_argmax import ot_argmax

SAMPLE_CHUNK = 1 << 14  # source samples scored at once: bounds the [chunk, d] noise block
CHECKPOINT = "ot_checkpoint.safetensors"
# options that may differ between a run and its resume without changing the result
RESUME_FREE = ("resume", "stop_at", "save_every", "out")


# --------------------------------------------------------------------------- the solver

@dataclass
class SolverConfig:
    max_iters: int = 2000
    batch_factor: float = 10.0      # M_step = batch_factor * N fresh samples per step
    eval_factor: float = 100.0      # M_e = eval_factor * N fixed evaluation samples
    eval_every: int = 25
    lr_scale: float = 0.01          # lr0 = lr_scale * median ||y_i - mean(y)||
    lr_decay_iters: float = 100.0   # lr_k = lr0 / sqrt(1 + k / lr_decay_iters)
    ema_decay: float = 0.99
    tol_max_rel: float = 0.5
    tol_chi2: float = 1e-3
    seed: int = 0


@dataclass
class MassError:
    max_rel: float          # max_i |N * w_i - 1|
    chi2_excess: float      # N * sum (w_i - 1/N)^2 - (N - 1) / M: mean squared relative error, MC noise removed
    empty: int              # cells that got no sample
    num_samples: int

    def converged(self, config: SolverConfig) -> bool:
        return self.empty == 0 and self.max_rel <= config.tol_max_rel and self.chi2_excess <= config.tol_chi2


@dataclass
class SolverState:
    """Everything the next iteration depends on: a resumed solve continues bit for bit (same device)."""
    h: torch.Tensor
    m: torch.Tensor             # Adam moments
    v: torch.Tensor
    ema: torch.Tensor
    best_h: torch.Tensor        # the EMA h with the lowest χ²_excess evaluated so far
    best: MassError
    iteration: int
    init: str
    history: list[dict]
    rng: torch.Tensor           # the training stream's generator state (uint8)
    seconds: float = 0.0        # solve time spent so far, over all resumes


@dataclass
class SolveResult:
    h: torch.Tensor
    error: MassError
    converged: bool
    iterations: int
    init: str
    history: list[dict] = field(default_factory=list)
    finished: bool = True       # False: stopped at `stop_at`, continue from the saved state
    seconds: float = 0.0


def source_samples(num: int, dim: int, generator: torch.Generator, device: torch.device):
    """N(0, I) samples in chunks, as antithetic pairs (x, −x): the pair's contributions to a cell
    mass are negatively correlated, which halves the variance for near-symmetric targets."""
    for start in range(0, num, SAMPLE_CHUNK):
        n = min(SAMPLE_CHUNK, num - start)
        half = torch.randn((n + 1) // 2, dim, generator=generator, device=device)
        yield torch.cat([half, -half])[:n]


def cell_counts(y: torch.Tensor, h: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """How many of `num_samples` fresh source samples fall in each cell: [N] int64."""
    counts = torch.zeros(y.shape[0], dtype=torch.int64, device=y.device)
    for x in source_samples(num_samples, y.shape[1], generator, y.device):
        counts += torch.bincount(ot_argmax(x.to(y.dtype), y, h)[1], minlength=y.shape[0])
    return counts


def mass_error(counts: torch.Tensor) -> MassError:
    n, m = counts.numel(), int(counts.sum())
    w = counts.double() / m
    return MassError(max_rel=float((n * w - 1).abs().max()), chi2_excess=float(n * ((w - 1 / n) ** 2).sum() - (n - 1) / m),
                     empty=int((counts == 0).sum()), num_samples=m)


def evaluate(y: torch.Tensor, h: torch.Tensor, num_samples: int, seed: int) -> MassError:
    """Mass error on the fixed evaluation batch (regenerated from `seed`, so never held in memory)."""
    generator = torch.Generator(y.device).manual_seed(seed)
    return mass_error(cell_counts(y, h, num_samples, generator))


def initial_candidates(y: torch.Tensor) -> dict[str, torch.Tensor]:
    y = y.float()
    spread = (y - y.mean(0)).norm(dim=1)
    return {"zero": torch.zeros_like(spread), "nearest": -0.5 * y.pow(2).sum(1),
            # for a centred Gaussian source target i's score fluctuates with std ||y_i - ȳ||, so
            # large-spread targets win too often at h = 0; √(2 ln N) is the Gaussian max's scale
            "spread": -math.sqrt(2 * math.log(max(y.shape[0], 2))) * spread}


def solve(y: torch.Tensor, config: SolverConfig, h0: torch.Tensor | None = None,
          log: Callable[[str], None] = print, progress: bool = False, *, state: SolverState | None = None,
          save: Callable[[SolverState], None] | None = None, save_every: int = 0,
          stop_at: int | None = None, report: Callable[[int, dict, bool], None] | None = None) -> SolveResult:
    """Potentials h [N] (float32) for targets y [N, d] on the solve device. y in bfloat16 scores with
    tensor cores (fp32 accumulation): rounding moves only near-tie assignments, which adds noise to
    the mass estimates but not bias worth a slower solve; the sampler scores in fp32.

    `state` resumes a saved solve (h0 is then ignored); `save(state)` is called every `save_every`
    iterations and at `stop_at`, where the solve stops unfinished; `report(iteration, last evaluation,
    saved)` after every iteration (a ProgressFile's update)."""
    from tqdm import tqdm

    n = y.shape[0]
    if n < 2:
        raise ValueError("semi-discrete OT needs at least 2 targets")
    started = time.perf_counter()
    num_eval = max(int(config.eval_factor * n), 20 * n)
    num_step = max(int(config.batch_factor * n), 2)
    eval_seed = config.seed + 1_000_003  # the evaluation batch never overlaps the training stream
    generator = torch.Generator(y.device).manual_seed(config.seed)
    if state is None:
        log(f"OT solve: N={n} d={y.shape[1]} M_step={num_step} M_eval={num_eval}; Monte-Carlo floor of the max "
            f"relative mass error ≈ {math.sqrt(2 * math.log(n) * n / num_eval):.3f} (tolerance {config.tol_max_rel})")
        candidates = {"warm start": h0.float().to(y.device)} if h0 is not None else initial_candidates(y)
        scored = {name: evaluate(y, h - h.mean(), num_eval, eval_seed) for name, h in candidates.items()}
        init = min(scored, key=lambda k: scored[k].chi2_excess)
        log("init: " + ", ".join(f"{k} chi2={e.chi2_excess:.4g} max_rel={e.max_rel:.3g}" for k, e in scored.items())
            + f" -> {init}")
        h = candidates[init] - candidates[init].mean()
        state = SolverState(h=h, m=torch.zeros_like(h), v=torch.zeros_like(h), ema=h.clone(), best_h=h.clone(),
                            best=scored[init], iteration=0, init=init,
                            history=[{"iter": 0, **asdict(scored[init])}], rng=generator.get_state())
    else:
        log(f"resuming the OT solve at iteration {state.iteration}")
    generator.set_state(state.rng)
    h, m, v, ema = state.h, state.m, state.v, state.ema

    lr0 = config.lr_scale * float((y.float() - y.float().mean(0)).norm(dim=1).median())
    k = state.iteration
    finished = state.best.converged(config) or k >= config.max_iters
    bar = tqdm(total=config.max_iters, initial=k, disable=not progress, dynamic_ncols=True, desc="dpm-ot solve")
    postfix = {}
    while not finished:
        k += 1
        g = cell_counts(y, h, num_step, generator).to(h.dtype) / num_step - 1.0 / n
        m.mul_(0.9).add_(g, alpha=0.1)
        v.mul_(0.999).addcmul_(g, g, value=0.001)
        # a cell with too much mass gets its potential lowered
        h -= lr0 / math.sqrt(1 + k / config.lr_decay_iters) * m / (v.sqrt() + 1e-8)
        h -= h.mean()  # h is defined up to a constant
        ema.mul_(config.ema_decay).add_(h, alpha=1 - config.ema_decay)
        bar.update(1)
        finished = k == config.max_iters
        if k % config.eval_every == 0 or finished:
            error = evaluate(y, ema, num_eval, eval_seed)
            state.history.append({"iter": k, **asdict(error)})
            postfix = {"max_rel": f"{error.max_rel:.3f}", "chi2": f"{error.chi2_excess:.2e}", "empty": error.empty}
            bar.set_postfix(**postfix)
            if error.chi2_excess < state.best.chi2_excess:
                state.best_h, state.best = ema.clone(), error
            finished |= error.converged(config)
        state.iteration = k
        saved = save is not None and not finished and ((save_every and k % save_every == 0) or k == stop_at)
        if saved:
            state.rng = generator.get_state()
            state.seconds += time.perf_counter() - started
            started = time.perf_counter()
            save(state)
        if report is not None:
            report(k, postfix, saved)
        if k == stop_at and not finished:
            bar.close()
            log(f"stopped at iteration {k}; continue with --resume")
            return SolveResult(state.best_h, state.best, False, k, state.init, state.history, finished=False,
                               seconds=state.seconds)
    bar.close()
    converged = state.best.converged(config)
    log(f"{'converged' if converged else 'NOT converged'} after {k} iterations: max_rel={state.best.max_rel:.3f} "
        f"chi2_excess={state.best.chi2_excess:.3g} empty={state.best.empty}")
    return SolveResult(state.best_h, state.best, converged, k, state.init, state.history,
                       seconds=state.seconds + time.perf_counter() - started)


# --------------------------------------------------------------------------- checkpoints

STATE_TENSORS = ("h", "m", "v", "ema", "best_h", "rng")


def save_state(path: Path, state: SolverState, tensors: dict[str, torch.Tensor], info: dict):
    """The solver state, the targets (`tensors`) and `info` (plain data) in one safetensors file,
    written atomically (a killed job keeps the previous one)."""
    from safetensors.torch import save_file

    header = {"iteration": state.iteration, "init": state.init, "best": asdict(state.best),
              "history": state.history, "seconds": state.seconds, **info}
    out = {name: getattr(state, name).detach().cpu().contiguous() for name in STATE_TENSORS}
    out.update({k: t.detach().cpu().contiguous() for k, t in tensors.items()})
    with atomic_write(path) as tmp:
        save_file(out, str(tmp), metadata={"state": json.dumps(header)})


def load_state(path: Path, device: torch.device) -> tuple[SolverState, dict[str, torch.Tensor], dict]:
    """(solver state on `device`, the other tensors on CPU, the rest of the header)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is truncated or corrupt ({e}); it cannot be resumed from") from None
    state = SolverState(**{k: tensors.pop(k).to(device) for k in STATE_TENSORS if k != "rng"},
                        rng=tensors.pop("rng"), best=MassError(**header.pop("best")),
                        iteration=header.pop("iteration"), init=header.pop("init"),
                        history=header.pop("history"), seconds=header.pop("seconds"))
    return state, tensors, header


# --------------------------------------------------------------------------- targets

def data_images(num: int, resolution: int, data_seed: int) -> torch.Tensor:
    """The first `num` shapes train images, [num, 3, R, R] in [-1, 1] (captions ignored: unconditional)."""
    import numpy as np

    from leanserve.data.shapes import sample, to_tensor
    return to_tensor(np.stack([sample(data_seed, i, resolution, split="train").image for i in range(num)]))


def model_images(pipe, num: int, steps: int, sampler: str, batch_size: int, seed: int) -> torch.Tensor:
    """`num` unconditional (empty-prompt, unguided) teacher samples, [num, 3, H, W], final x unclamped;
    image i comes from generator seed + i. The pipeline's scheduler is left as it was."""
    from tqdm import tqdm

    from leanserve.models.image_pipeline import set_sampler

    original = pipe.scheduler
    set_sampler(pipe, sampler)
    device = pipe._execution_device
    images = []
    try:
        for start in tqdm(range(0, num, batch_size), desc="model targets", dynamic_ncols=True):
            n = min(batch_size, num - start)
            generators = [torch.Generator(device).manual_seed(seed + start + i) for i in range(n)]
            images.append(pipe(prompt=[""] * n, num_inference_steps=steps, guidance_scale=1.0,
                               generator=generators, output_type="latent").images.float().cpu())
    finally:
        pipe.scheduler = original
    return torch.cat(images)


def noised_targets(x0: torch.Tensor, alpha_bar: float, fresh_noise: bool, seed: int) -> torch.Tensor:
    """y_i = a·x0_i + s·ε_i with fixed ε_i from `seed` (faithful), or the means a·x0_i (fresh noise)."""
    y = alpha_bar ** 0.5 * x0
    if fresh_noise:
        return y
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return y + (1 - alpha_bar) ** 0.5 * noise


# --------------------------------------------------------------------------- the command

def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="the teacher (a PixelDiffusionPipeline directory)")
    p.add_argument("--out", required=True, help="directory to write: the teacher + ot_map.safetensors + leanserve.json")
    p.add_argument("--t-prime", type=int, required=True, help="timestep t′ the OT map jumps to (0..T-1)")
    p.add_argument("--targets", required=True, choices=["data", "model"],
                   help="shapes train images (faithful) or the teacher's own samples (data-free)")
    p.add_argument("--num-targets", type=int, required=True, help="N")
    p.add_argument("--fresh-noise", action="store_true",
                   help="solve against the clean means a·x0; the sampler adds new noise (spec §4 variant)")
    p.add_argument("--warm-start", help="an ot_map.safetensors with the same targets: start from its h")
    p.add_argument("--seed", type=int, default=0, help="target noise, solver samples, model-target seeds")
    p.add_argument("--data-seed", type=int, default=0, help="the shapes stream (--targets data)")
    g = p.add_argument_group("model targets")
    g.add_argument("--target-steps", type=int, default=50, help="teacher steps per target image")
    g.add_argument("--target-sampler", default="dpmsolver++", help="teacher sampler for the targets")
    g.add_argument("--batch-size", type=int, default=256, help="images per teacher call")
    g.add_argument("--targets-from", metavar="MAP_DIR",
                   help="reuse the clean teacher samples of an earlier map of this teacher (same N): a t′ sweep "
                        "pays the teacher's sampling once")
    g = p.add_argument_group("solver")
    defaults = SolverConfig()
    for name in ("max_iters", "batch_factor", "eval_factor", "eval_every", "lr_scale", "lr_decay_iters",
                 "ema_decay", "tol_max_rel", "tol_chi2"):
        value = getattr(defaults, name)
        g.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help=f"(default {value})")
    g.add_argument("--save-every", type=int, default=100, help="iterations between checkpoints")
    g.add_argument("--resume", action="store_true", help=f"continue exactly from OUT/{CHECKPOINT}")
    g.add_argument("--stop-at", type=int, help="stop after this iteration with a checkpoint; resume later")
    g.add_argument("--solve-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the scores' inputs during the solve (bfloat16: tensor cores on GPU)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _check_args(args):
    for name in ("num_targets", "max_iters", "eval_every", "target_steps", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    if args.num_targets < 2:
        raise UserError("--num-targets must be at least 2")
    for name in ("batch_factor", "eval_factor", "lr_scale", "lr_decay_iters", "tol_max_rel", "tol_chi2"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    if not 0 <= args.ema_decay < 1:
        raise UserError("--ema-decay must be in [0, 1)")
    for name in ("save_every", "stop_at"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    out = Path(args.out)
    if args.resume and not (out / CHECKPOINT).is_file():
        raise UserError(f"--resume: no checkpoint {out / CHECKPOINT}")
    if not args.resume and out.exists():
        raise UserError(f"{args.out} already exists; choose another --out (or --resume an unfinished solve)")
    if args.warm_start is not None and not Path(args.warm_start).is_file():
        raise UserError(f"--warm-start {args.warm_start} does not exist")
    if args.targets_from is not None and args.targets != "model":
        raise UserError("--targets-from reuses teacher samples: it needs --targets model (data targets cost nothing)")


def reused_model_images(map_dir: str, teacher_dir: str, num_targets: int) -> tuple[torch.Tensor, str, int]:
    """x0, source and target NFE of an earlier map's model targets, refused unless they are this teacher's
    samples (same weights) and as many as asked for."""
    from leanserve.models.dpm_ot_sampler import OT_MAP_FILE, OTMap
    from leanserve.models.model_dir import load_model_info, weights_sha256

    info = load_model_info(map_dir)
    if info is None or info.method != "dpm_ot" or not (Path(map_dir) / OT_MAP_FILE).is_file():
        raise UserError(f"--targets-from {map_dir}: not a directory written by `leanserve train dpm-ot`")
    if info.settings["targets"] != "model" or info.base["sha256"] != weights_sha256(teacher_dir):
        raise UserError(f"--targets-from {map_dir}: its targets are not samples of {teacher_dir} (targets "
                        f"{info.settings['targets']!r}, teacher weights {info.base['sha256'][:12]})")
    x0 = OTMap.load(Path(map_dir) / OT_MAP_FILE).x0
    if len(x0) != num_targets:
        raise UserError(f"--targets-from {map_dir} holds {len(x0)} targets, --num-targets is {num_targets}")
    return x0, f"{info.data['description']} (from {map_dir})", info.metrics["target_nfe"]


def run(args):
    from leanserve.models.dpm_ot_sampler import OT_MAP_FILE, OTMap
    from leanserve.models.image_pipeline import load_image_pipeline, native_size
    from leanserve.models.model_dir import (
        ModelInfo,
        load_model_info,
        make_recipe,
        save_model_info,
        weights_sha256,
    )
    from leanserve.trainers.checkpoint import check_resume_args
    from leanserve.trainers.progress import ProgressFile
    from leanserve.runtime import resolve_device

    _check_args(args)
    device = resolve_device(args.device)
    pipe = load_image_pipeline(args.model, device=device)
    if not hasattr(pipe, "default_size"):
        raise UserError(f"{args.model}: DPM-OT needs a pixel-space PixelDiffusionPipeline teacher")
    num_train = pipe.scheduler.config.num_train_timesteps
    if not 0 <= args.t_prime < num_train:
        raise UserError(f"--t-prime must be in [0, {num_train - 1}]")
    alpha_bar = float(pipe.scheduler.alphas_cumprod[args.t_prime])
    if not alpha_bar > 0:
        raise UserError(f"--t-prime {args.t_prime}: ᾱ = 0 there (a zero-terminal-SNR schedule): x_t′ is pure noise, "
                        "there is nothing to jump to; choose a smaller t′")
    resolution = native_size(pipe)

    out = Path(args.out)
    checkpoint = out / CHECKPOINT
    state = None
    if args.resume:
        state, tensors, saved = load_state(checkpoint, device)
        check_resume_args(saved["args"], args, RESUME_FREE)
        x0, targets = tensors["x0"], tensors["targets"]
        source, target_nfe, target_seconds = saved["source"], saved["target_nfe"], saved["target_seconds"]
    else:
        start = time.perf_counter()
        if args.targets_from is not None:
            x0, source, target_nfe = reused_model_images(args.targets_from, args.model, args.num_targets)
        elif args.targets == "data":
            x0 = data_images(args.num_targets, resolution, args.data_seed)
            source = f"shapes train split, seed {args.data_seed}, examples 0..{args.num_targets - 1}"
            target_nfe = 0
        else:
            x0 = model_images(pipe, args.num_targets, args.target_steps, args.target_sampler, args.batch_size,
                              args.seed)
            source = (f"teacher samples, empty prompt, {args.target_sampler} {args.target_steps} steps, "
                      f"generator seeds {args.seed}..{args.seed + args.num_targets - 1}")
            target_nfe = args.num_targets * args.target_steps
        targets = noised_targets(x0, alpha_bar, args.fresh_noise, args.seed)
        target_seconds = time.perf_counter() - start

    h0 = None
    if args.warm_start is not None and state is None:
        previous = OTMap.load(args.warm_start)
        if previous.targets.shape != targets.shape:
            raise UserError(f"--warm-start {args.warm_start} has {tuple(previous.targets.shape)} targets, "
                            f"this run {tuple(targets.shape)}")
        h0 = previous.h.to(device)
    config = SolverConfig(**{k: getattr(args, k) for k in asdict(SolverConfig()) if k != "seed"}, seed=args.seed)
    info = {"args": vars(args), "source": source, "target_nfe": target_nfe, "target_seconds": target_seconds}

    def save(solver_state: SolverState):
        out.mkdir(parents=True, exist_ok=True)
        save_state(checkpoint, solver_state, {"targets": targets, "x0": x0}, info)

    done_iters = state.iteration if state is not None else 0
    progress = ProgressFile(out, "iteration", config.max_iters, done_iters,
                            checkpoint_step=done_iters if state is not None else None)
    result = solve(targets.flatten(1).to(device, getattr(torch, args.solve_dtype)), config, h0=h0, progress=True,
                   state=state, save=save, save_every=args.save_every, stop_at=args.stop_at, report=progress.update)
    if not result.finished:
        return 0

    shutil.copytree(args.model, out, ignore=shutil.ignore_patterns("checkpoint.pt", OT_MAP_FILE, CHECKPOINT),
                    dirs_exist_ok=True)
    sigma = ((1 - alpha_bar) / alpha_bar) ** 0.5
    ot_map = OTMap(targets=targets, x0=x0, h=result.h.cpu(), t_prime=args.t_prime, alpha_bar=alpha_bar,
                   fresh_noise=args.fresh_noise,
                   metadata={"targets": args.targets, "source": source, "noise_seed": str(args.seed),
                             "converged": str(result.converged).lower(), "init": result.init})
    ot_map.save(Path(args.out) / OT_MAP_FILE)
    teacher = load_model_info(args.model)
    save_model_info(args.out, ModelInfo(
        kind="image", method="dpm_ot",
        settings={"ot_map": OT_MAP_FILE, "t_prime": args.t_prime, "sigma": sigma, "alpha_bar": alpha_bar,
                  "targets": args.targets, "num_targets": args.num_targets, "fresh_noise": args.fresh_noise,
                  "solver": {**asdict(config), "dtype": args.solve_dtype}, "teacher": teacher.settings if teacher else None},
        base={"path": str(args.model), "sha256": weights_sha256(args.model)},
        recipe=make_recipe("leanserve train dpm-ot", args, args.seed, skip=("resume", "stop_at")),
        data={"description": source},
        metrics={"converged": result.converged, "iterations": result.iterations, "init": result.init,
                 **{f"final_{k}": v for k, v in asdict(result.error).items()},
                 "solve_seconds": result.seconds, "target_seconds": target_seconds, "target_nfe": target_nfe,
                 "device": str(device), "history": result.history}))
    checkpoint.unlink(missing_ok=True)  # the model directory is the artifact now
    progress.update(result.iterations, done=True)
    print(f"wrote {args.out} (N={args.num_targets}, t′={args.t_prime}, σ={sigma:.3g}, "
          f"{'converged' if result.converged else 'NOT converged'})")
    return 0
