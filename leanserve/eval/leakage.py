"""`leanserve eval leakage`: what a noise schedule's late x_t still says about a shapes image.

A denoiser is trained on x_t = a_t·x0 + s_t·ε at every t up to T. If x_T still holds some of x0,
the network learns to read that part of the image off its input instead of the prompt, and at
sampling time x_T ~ N(0, I) carries none of it: the prompt is then ignored for exactly those
attributes (Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed"). This
measures the leak directly, with no model: one-object shapes images are noised at a few late
timesteps of each schedule and two fixed probes try to read attributes back from x_t.

- background: linear discriminant analysis of x_t's three channel means (class means and pooled
  covariance fitted on the train split, scored on the val split);
- position: a matched filter with no fitting. Given the object's and the background's colours (what
  the caption names; the denoiser infers them from text and x_t alike), each pixel's x_t is projected
  on (object colour − background colour) and summed over a disc of the medium radius at each of the
  nine grid cells; the largest sum is the guess.

Chance is the most frequent class of the scored split. A row's accuracy comes with its normal 95%
interval; an attribute leaks at t when the interval's lower end is above chance. With a zero
terminal SNR schedule (ᾱ_T = 0) x_T is pure noise and both probes must score chance at t = T.

Schedules: `sd` (SD's scaled_linear betas 0.00085 -> 0.012, the first zoo teacher's), `sd-zero-snr`
(the same betas rescaled by diffusers' rescale_betas_zero_snr), or a model directory / scheduler
folder, whose config gives the forward process the model was trained with (computed by diffusers'
DDPMScheduler from it). Output: JSON (every row, the chance levels, each schedule's ᾱ_T and SNR_T)
and a PNG of accuracy against t.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from leanserve.errors import UserError

BUILTIN_SCHEDULES = ("sd", "sd-zero-snr")
POSITION_RADIUS = "medium"  # the matched filter's disc (data.shapes.RADIUS)


@dataclass
class LeakageSettings:
    schedules: list[str] = field(default_factory=lambda: list(BUILTIN_SCHEDULES))
    timesteps: list[int] = field(default_factory=lambda: [999, 950, 900, 800])
    num_images: int = 2000  # per split: the background probe is fitted on one, both are scored on the other
    resolution: int = 32
    data_seed: int = 0
    seed: int = 0           # the noise ε


@dataclass
class ProbeSet:
    """One-object shapes images with what the probes are told or must find."""
    x0: torch.Tensor          # [N, 3, H, W] in [-1, 1]
    background: torch.Tensor  # [N] index into BACKGROUNDS
    position: torch.Tensor    # [N] index into POSITIONS
    direction: torch.Tensor   # [N, 3] object colour − background colour, in x0's units


def probe_set(num: int, resolution: int, data_seed: int, split: str) -> ProbeSet:
    from leanserve.data.shapes import BACKGROUND_RGB, BACKGROUNDS, POSITIONS, RGB, sample, to_tensor

    examples = [sample(data_seed, i, resolution, split=split, two_object_prob=0.0) for i in range(num)]
    objects = [ex.attrs["objects"][0] for ex in examples]
    backgrounds = [ex.attrs["background"] for ex in examples]
    colour = torch.tensor([RGB[o["color"]] for o in objects], dtype=torch.float32)
    behind = torch.tensor([BACKGROUND_RGB[b] for b in backgrounds], dtype=torch.float32)
    return ProbeSet(x0=to_tensor(np.stack([ex.image for ex in examples])),
                    background=torch.tensor([BACKGROUNDS.index(b) for b in backgrounds]),
                    position=torch.tensor([POSITIONS.index(o["position"]) for o in objects]),
                    direction=(colour - behind) / 127.5)


def noised(x0: torch.Tensor, alphas_cumprod: torch.Tensor, t: int, generator: torch.Generator) -> torch.Tensor:
    ab = alphas_cumprod[t].double()
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    return (ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps).float()


def channel_means(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


def lda_accuracy(fit_x: torch.Tensor, fit_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int) -> float:
    """Accuracy on (test_x, test_y) of linear discriminant analysis fitted on (fit_x, fit_y): class
    means, one pooled covariance (with a 1e-9 ridge), the fit set's class frequencies as priors."""
    fit_x, test_x = fit_x.double(), test_x.double()
    counts = torch.bincount(fit_y, minlength=num_classes).double()
    if (counts < 2).any():
        raise ValueError(f"every class needs 2+ fit examples, got counts {counts.tolist()}")
    means = torch.stack([fit_x[fit_y == k].mean(0) for k in range(num_classes)])
    centred = fit_x - means[fit_y]
    cov = centred.T @ centred / (len(fit_x) - num_classes) + 1e-9 * torch.eye(fit_x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(cov, means.T)  # [D, K]
    scores = test_x @ w - 0.5 * (means * w.T).sum(1) + (counts / counts.sum()).log()
    return (scores.argmax(1) == test_y).double().mean().item()


def cell_discs(resolution: int) -> torch.Tensor:
    """[9, H, W] indicator of a disc of the medium radius at each grid cell's centre (POSITIONS order)."""
    from leanserve.data.shapes import CELL_CENTERS, POSITIONS, RADIUS

    centres = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    discs = []
    for i in range(len(POSITIONS)):
        row, col = divmod(i, 3)
        dy, dx = centres[:, None] - CELL_CENTERS[row], centres[None, :] - CELL_CENTERS[col]
        discs.append((dx.square() + dy.square() <= RADIUS[POSITION_RADIUS] ** 2).float())
    return torch.stack(discs)


def matched_filter_accuracy(x_t: torch.Tensor, direction: torch.Tensor, position: torch.Tensor) -> float:
    """Share of images whose object cell the matched filter finds (see the module docstring)."""
    response = torch.einsum("nchw,nc->nhw", x_t, direction)
    scores = torch.einsum("nhw,khw->nk", response, cell_discs(x_t.shape[-1]))
    return (scores.argmax(1) == position).float().mean().item()


def chance(labels: torch.Tensor) -> float:
    """Accuracy of always guessing the most frequent class."""
    return torch.bincount(labels).max().item() / len(labels)


def interval95(p: float, n: int) -> list[float]:
    half = 1.96 * (p * (1 - p) / n) ** 0.5
    return [max(0.0, p - half), min(1.0, p + half)]


def schedule_rows(alphas_cumprod: torch.Tensor, timesteps: list[int], fit: ProbeSet, test: ProbeSet,
                  seed: int) -> list[dict]:
    """Both probes at every t (the same noise draws for every schedule: common random numbers)."""
    from leanserve.data.shapes import BACKGROUNDS

    chances = {"background": chance(test.background), "position": chance(test.position)}
    rows = []
    for t in timesteps:
        g = torch.Generator().manual_seed(seed)
        fit_t, test_t = noised(fit.x0, alphas_cumprod, t, g), noised(test.x0, alphas_cumprod, t, g)
        ab = float(alphas_cumprod[t])
        accuracy = {"background": lda_accuracy(channel_means(fit_t), fit.background, channel_means(test_t),
                                               test.background, len(BACKGROUNDS)),
                    "position": matched_filter_accuracy(test_t, test.direction, test.position)}
        row = {"t": t, "alpha_bar": ab, "sqrt_alpha_bar": ab ** 0.5, "snr": ab / (1 - ab) if ab < 1 else None}
        for name, acc in accuracy.items():
            ci = interval95(acc, len(test.x0))
            row[name] = {"accuracy": acc, "ci95": ci, "leaks": ci[0] > chances[name]}
        rows.append(row)
    return rows


def load_schedule(name: str):
    """A DDPMScheduler with the named schedule's training-time ᾱ (see the module docstring)."""
    from diffusers import DDPMScheduler

    from leanserve.models.pixel_pipeline import teacher_scheduler

    if name == "sd":
        return DDPMScheduler.from_config(teacher_scheduler().config)
    if name == "sd-zero-snr":
        return DDPMScheduler.from_config(teacher_scheduler("v_prediction", rescale_betas_zero_snr=True).config)
    path = Path(name)
    folder = path / "scheduler" if (path / "scheduler" / "scheduler_config.json").is_file() else path
    config_file = folder / "scheduler_config.json"
    if not config_file.is_file():
        raise UserError(f"--schedule {name}: not one of {', '.join(BUILTIN_SCHEDULES)} nor a model directory or "
                        "scheduler folder (no scheduler_config.json)")
    return DDPMScheduler.from_config(json.loads(config_file.read_text()))


def evaluate(settings: LeakageSettings) -> dict:
    fit = probe_set(settings.num_images, settings.resolution, settings.data_seed, "train")
    test = probe_set(settings.num_images, settings.resolution, settings.data_seed, "val")
    schedules = []
    for name in settings.schedules:
        scheduler = load_schedule(name)
        ac = scheduler.alphas_cumprod
        if max(settings.timesteps) >= len(ac):
            raise UserError(f"--timesteps: schedule {name} has {len(ac)} steps (t < {len(ac)})")
        ab_T = float(ac[-1])
        schedules.append({
            "name": name,
            "config": {k: scheduler.config.get(k) for k in ("num_train_timesteps", "beta_schedule", "beta_start",
                                                            "beta_end", "rescale_betas_zero_snr", "prediction_type")},
            "terminal": {"alpha_bar": ab_T, "sqrt_alpha_bar": ab_T ** 0.5, "snr": ab_T / (1 - ab_T)},
            "rows": schedule_rows(ac, settings.timesteps, fit, test, settings.seed)})
    return {"settings": asdict(settings), "probes": {
                "background": "LDA on x_t's channel means (fit: train split, scored: val split)",
                "position": f"matched filter (object - background colour) over {POSITION_RADIUS} discs at the 9 cells"},
            "chance": {"background": chance(test.background), "position": chance(test.position)},
            "schedules": schedules}


def plot(results: dict, path: str | Path):
    from leanserve.eval.plots import Series, line_plot

    series, span = [], [min(results["settings"]["timesteps"]), max(results["settings"]["timesteps"])]
    for schedule in results["schedules"]:
        rows = schedule["rows"]
        for probe, fmt in (("background", "-o"), ("position", "--s")):
            acc = [r[probe]["accuracy"] for r in rows]
            err = [acc_ - r[probe]["ci95"][0] for acc_, r in zip(acc, rows)]
            series.append(Series(f"{schedule['name']}: {probe}", [r["t"] for r in rows], acc, yerr=err, fmt=fmt))
    for probe, value in results["chance"].items():
        series.append(Series(f"chance: {probe}", span, [value] * 2, fmt=":"))
    line_plot(series, path, title=f"What x_t says about the image ({results['settings']['num_images']} images)",
              xlabel="timestep t", ylabel="probe accuracy")


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--schedule", nargs="+", default=list(BUILTIN_SCHEDULES),
                   help=f"schedules to probe: {' or '.join(BUILTIN_SCHEDULES)}, or a model directory / scheduler "
                        "folder (default: both built-in ones)")
    p.add_argument("--timesteps", nargs="+", type=int, default=[999, 950, 900, 800], help="timesteps to probe x_t at")
    p.add_argument("--num-images", type=int, default=2000, help="one-object images per split (fit and scored)")
    p.add_argument("--resolution", type=int, default=32, choices=[32, 64])
    p.add_argument("--data-seed", type=int, default=0, help="the shapes streams (train: fit, val: scored)")
    p.add_argument("--seed", type=int, default=0, help="the noise")
    p.add_argument("--out", help="write the results JSON here (default: print it)")
    p.add_argument("--plot", help="write a PNG of accuracy against t here")


def run(args):
    from leanserve.eval.report import emit_json, hardware

    if args.num_images < 50:
        raise UserError("--num-images must be >= 50 (the probes' intervals would span everything)")
    if any(t < 0 for t in args.timesteps):
        raise UserError("--timesteps must be >= 0")
    settings = LeakageSettings(schedules=args.schedule, timesteps=sorted(set(args.timesteps), reverse=True),
                               num_images=args.num_images, resolution=args.resolution, data_seed=args.data_seed,
                               seed=args.seed)
    results = {"hardware": hardware("cpu"), **evaluate(settings)}
    emit_json(results, args.out)
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    for schedule in results["schedules"]:
        cells = ", ".join(f"t={r['t']}: bg {r['background']['accuracy']:.2f} pos {r['position']['accuracy']:.2f}"
                          for r in schedule["rows"])
        print(f"{schedule['name']} (sqrt(alpha_bar_T) = {schedule['terminal']['sqrt_alpha_bar']:.3f}): {cells}; "
              f"chance bg {results['chance']['background']:.2f} pos {results['chance']['position']:.2f}")
    return 0
