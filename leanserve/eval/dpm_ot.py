"""`leanserve eval dpm-ot`: DPM-OT maps against fast solvers, the controls and the DDPM reference
(the DPM-OT paper's comparison: FD and mode mixture against NFE), unconditional (empty prompt,
guidance 1: the paper's setting).

Rows, each at every NFE of --nfe and every evaluation seed:
- baselines: --baselines samplers from x_T with NFE steps;
- DPM-OT: for every map (a `leanserve train dpm-ot` directory), tail sampler and assignment (ot,
  the random-target control, optionally the nearest-target jump): the jump, then NFE steps from t′;
- the DDPM reference: --ddpm-reference-steps ancestral steps from x_T (one row, not per NFE).
Every row is scored on `--num-images` images against the same real reference (shapes TEST split,
never a target source): FD and KID in the attribute classifier's feature space; memorisation,
i.e. each image's pixel-L2 and feature-L2 distance to its nearest neighbour among the first
--train-images shapes TRAIN images (which hold every data target), as median, 10th percentile
and share of near-copies; for DPM-OT rows the distance to the image's own target x0 and the number
of distinct targets used; the mode-mixture ratio (share of the images the classifier calls
one-object whose shape head gives >= 2 shapes softmax >= tau: the head is undefined on two-object
images); images/s; and the UNet calls counted at run time. Alignment does not apply: there is no
prompt (spec §10.1). A near-copy is closer than NEAR_COPY × the median distance of real test images to their
nearest train image (per space). The same numbers for a second real test set are the reference
row (the FD floor), and for the first --num-images clean targets of each map its target-set floor
(DPM-OT outputs that reproduce their targets exactly would score this).

Noise: image i of evaluation seed s is drawn from one CPU generator seeded image_seed(s, 0, i)
(eval/images.py), so every method starts from the same x_T and GPU and CPU runs agree.
`plot_results` and `markdown_table` read only the results JSON: redraw anywhere. --out is
rewritten after every row with "complete": false (the DDPM reference, the costliest row, runs
last), so a run cut short by a time limit keeps the rows it finished.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from leanserve.atomic import atomic_write_text
from leanserve.errors import UserError
from leanserve.eval.images import add_runtime_arguments

NEAR_COPY = 0.5                 # near-copy threshold, as a fraction of the real test-to-train median NN distance
MMR_TAUS = (0.1, 0.2, 0.3)      # mode mixture: >= 2 shape classes with softmax >= tau
WARMUP_IMAGES = 2               # per configuration, excluded from images/s and the UNet counts


@dataclass
class EvalSettings:
    nfe: list[int] = field(default_factory=lambda: [5, 10, 20])
    baselines: list[str] = field(default_factory=lambda: ["ddim", "dpmsolver++", "unipc"])
    tails: list[str] = field(default_factory=lambda: ["dpmsolver++", "ddpm"])
    assignments: list[str] = field(default_factory=lambda: ["ot", "random"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    num_images: int = 1000
    ddpm_reference_steps: int = 1000
    train_images: int = 20_000
    batch_size: int = 500
    resolution: int = 32
    real_seed: int = 0      # the real test-split stream (reference and second set)
    data_seed: int = 0      # the train-split stream the data targets came from

    @property
    def grid_nfe(self) -> int:
        """The NFE whose images go into the grid PNG (the middle one: 10 of 5 10 20)."""
        return sorted(self.nfe)[len(self.nfe) // 2]


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--teacher", help="the teacher directory (the baselines run on it)")
    p.add_argument("--maps", nargs="*", default=[], help="directories written by `leanserve train dpm-ot` from this "
                                                         "teacher (none: only the baselines and the DDPM reference)")
    p.add_argument("--results", nargs="+", help="combine these results JSONs of runs with the same seeds, images and "
                                                "real set (e.g. a DDPM reference run apart) instead of generating")
    p.add_argument("--nfe", nargs="+", type=int, default=[5, 10, 20], help="UNet evaluations per image")
    p.add_argument("--baselines", nargs="*", default=["ddim", "dpmsolver++", "unipc"],
                   help="samplers from x_T at the same NFE (eval images' names)")
    p.add_argument("--tails", nargs="+", default=["dpmsolver++", "ddpm"], help="DPM-OT samplers after the jump")
    p.add_argument("--assignments", nargs="+", default=["ot", "random"],
                   help="ot, random (the random-target control), nearest (nearest-target jump, no solve)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="evaluation seeds; mean and std over them")
    p.add_argument("--num-images", type=int, default=1000, help="images per row and per real set")
    p.add_argument("--ddpm-reference-steps", type=int, default=1000, help="steps of the DDPM reference row (0: none)")
    p.add_argument("--train-images", type=int, default=20_000,
                   help="the memorisation reference: the first K shapes train images (must hold the data targets)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--real-seed", type=int, default=0, help="seed of the real test-split images")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train-split stream (as in train dpm-ot)")
    add_runtime_arguments(p)
    p.add_argument("--out", help="write the results JSON here (default: print it)")
    p.add_argument("--plot", help="write the FD-vs-NFE PNG here")
    p.add_argument("--grid", help="write a PNG grid of samples here (the middle NFE)")


# --------------------------------------------------------------------------- maps

@dataclass
class MapEntry:
    label: str
    ot_map: object          # OTMap on the pipeline's device
    record: dict            # what the JSON says about it
    x0_images: np.ndarray   # uint8 [N, H, W, 3]: the clean targets quantised like generated images


def map_label(settings: dict) -> str:
    """A map named by what distinguishes it: target source, t′, N and the fresh-noise variant."""
    label = f"{settings['targets']} t'={settings['t_prime']} N={settings['num_targets']}"
    return label + (" fresh-noise" if settings["fresh_noise"] else "")


def to_images(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] tensors [N, 3, H, W] -> uint8 [N, H, W, 3], as the pipeline's output_type="np" + to_uint8."""
    from leanserve.eval.classifier import to_uint8
    return to_uint8(((x.float().cpu() + 1) / 2).clamp(0, 1).movedim(1, -1).numpy())


def load_maps(dirs: list[str], teacher_dir: str, pipe, max_nfe: int) -> list[MapEntry]:
    from leanserve.models.image_pipeline import load_ot_map
    from leanserve.models.model_dir import load_model_info, weights_sha256

    teacher_sha = weights_sha256(teacher_dir)
    entries: list[MapEntry] = []
    for d in dirs:
        info = load_model_info(d)
        if info is None or info.method != "dpm_ot":
            raise UserError(f"{d} is not a DPM-OT directory (leanserve.json method dpm_ot)")
        # the map directory carries its own teacher copy; the rows use --teacher's weights
        if (info.base or {}).get("sha256") != teacher_sha:
            raise UserError(f"{d} was built from another teacher than {teacher_dir} (weights differ)")
        ot_map = load_ot_map(d, pipe)
        if ot_map.t_prime < max_nfe:
            raise UserError(f"{d}: t′ = {ot_map.t_prime} is below the largest --nfe {max_nfe} (K steps need K <= t′)")
        settings = {k: v for k, v in info.settings.items() if k != "teacher"}
        label = map_label(settings)
        if label in {e.label for e in entries}:
            label += f" ({Path(d).name})"
        solver = {k: v for k, v in info.metrics.items() if k != "history"}
        record = {"label": label, "dir": str(d), **settings, "source": (info.data or {}).get("description"),
                  "recipe": info.recipe.get("command"), "solver_result": solver}
        entries.append(MapEntry(label, ot_map, record, to_images(ot_map.x0)))
    return entries


# --------------------------------------------------------------------------- generation

@contextmanager
def count_unet(pipe):
    """Counts the UNet forward calls and the images they process while the block runs."""
    counts = {"calls": 0, "images": 0}

    def hook(module, args, kwargs):
        counts["calls"] += 1
        counts["images"] += int((args[0] if args else kwargs["sample"]).shape[0])

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()


@dataclass
class Jumps:
    indices: np.ndarray    # [N] the target of every image
    rms: np.ndarray        # [N] ‖x_T − x_t′‖ / √d


def generate_dpm_ot(pipe, ot_map, seeds: list[int], *, steps: int, sampler: str, assignment: str,
                    batch_size: int) -> tuple[np.ndarray, Jumps, float]:
    """uint8 images [N, H, W, 3] of the jump + `steps` steps, one CPU generator per image (its
    x_T, random target or fresh noise, then step noise), every image's jump and the seconds the
    calls took (jump included)."""
    from leanserve.eval.classifier import to_uint8
    from leanserve.eval.images import _synchronize
    from leanserve.models.dpm_ot_sampler import dpm_ot_generate

    images, indices, rms, seconds = [], [], [], 0.0
    for start in range(0, len(seeds), batch_size):
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[start:start + batch_size]]
        t0 = time.perf_counter()
        out = dpm_ot_generate(pipe, ot_map, [""] * len(generators), num_inference_steps=steps, sampler=sampler,
                              assignment=assignment, guidance_scale=1.0, generator=generators, output_type="np")
        _synchronize()
        seconds += time.perf_counter() - t0
        images.append(to_uint8(out.images))
        indices.append(out.target_indices.cpu().numpy())
        rms.append(out.jump_rms.cpu().numpy())
    return np.concatenate(images), Jumps(np.concatenate(indices), np.concatenate(rms)), seconds


def generate_baseline(pipe, sampler: str, seeds: list[int], *, steps: int, resolution: int,
                      batch_size: int) -> tuple[np.ndarray, None, float]:
    """Unconditional, unguided images of `sampler` from x_T; the pipeline's scheduler is restored."""
    from leanserve.eval.images import generate
    from leanserve.models.image_pipeline import set_sampler

    original = pipe.scheduler
    set_sampler(pipe, sampler)
    try:
        images, seconds = generate(pipe, [""] * len(seeds), seeds, steps=steps, guidance=1.0, resolution=resolution,
                                   batch_size=batch_size)
    finally:
        pipe.scheduler = original
    return images, None, seconds


# --------------------------------------------------------------------------- scoring

def _summary(name: str, d: torch.Tensor, threshold: float | None) -> dict[str, float]:
    out = {f"{name}.median": float(d.median()), f"{name}.p10": float(torch.quantile(d, 0.1))}
    if threshold is not None:
        out[f"{name}.near_copy"] = float((d < threshold).double().mean())
    return out


def _pixels(images: np.ndarray, device) -> torch.Tensor:
    from leanserve.data.shapes import to_tensor
    return to_tensor(images).flatten(1).to(device, torch.float64)


class Scorer:
    """FD/KID against the real reference, memorisation against the train bank, mode mixture."""

    def __init__(self, classifier, settings: EvalSettings, device):
        from leanserve.data.shapes import sample
        from leanserve.eval.image_metrics import nearest_distances

        n, res = settings.num_images, settings.resolution
        self.classifier, self.device = classifier, device

        def real(split: str, seed: int, indices: range) -> np.ndarray:
            return np.stack([sample(seed, i, res, split=split).image for i in indices])

        # features stay on the device: KID's 100 cubic-kernel subsets are the costly part of scoring
        self.ref_features = torch.from_numpy(classifier.predict(real("test", settings.real_seed, range(n))).features
                                             ).to(device)
        self.train_images = real("train", settings.data_seed, range(settings.train_images))
        self.train_pixels = _pixels(self.train_images, device)
        self.train_features = torch.from_numpy(classifier.predict(self.train_images).features).to(device)
        # the second real set: scored like a generator, and the scale of "near" for memorisation
        self.real_images = real("test", settings.real_seed, range(n, 2 * n))
        real_pred = classifier.predict(self.real_images)
        self.thresholds = {
            "pixel": NEAR_COPY * float(nearest_distances(_pixels(self.real_images, device), self.train_pixels).median()),
            "feature": NEAR_COPY * float(nearest_distances(real_pred.features, self.train_features).median()),
        }
        self.reference = self.score(self.real_images, real_pred)

    def score(self, images: np.ndarray, pred=None, targets: tuple[np.ndarray, np.ndarray] | None = None
              ) -> dict[str, float]:
        """Metrics of uint8 images [N, H, W, 3]; `targets` = (each image's target x0 as uint8 images,
        their features) for DPM-OT rows."""
        from leanserve.eval.classifier import COUNTS
        from leanserve.eval.image_metrics import (
            frechet_distance,
            kid,
            mode_mixture,
            nearest_distances,
        )

        pred = pred if pred is not None else self.classifier.predict(images)
        pixels = _pixels(images, self.device)
        features = torch.from_numpy(pred.features).to(self.device)
        out = {"fd": frechet_distance(features, self.ref_features), "kid": kid(features, self.ref_features, seed=0)[0]}
        out |= _summary("nn_pixel", nearest_distances(pixels, self.train_pixels), self.thresholds["pixel"])
        out |= _summary("nn_feature", nearest_distances(features, self.train_features), self.thresholds["feature"])
        if targets is not None:
            target_images, target_features = targets
            out |= _summary("target_pixel", (pixels - _pixels(target_images, self.device)).norm(dim=1),
                            self.thresholds["pixel"])
            out |= _summary("target_feature", (features - torch.from_numpy(target_features).to(self.device)).norm(dim=1),
                            self.thresholds["feature"])
        # the shape head is only defined on one-object images (eval/classifier.py)
        one = pred.probs["count"].argmax(1) == COUNTS.index(1)
        out["one_object"] = float(one.mean())
        mixed = mode_mixture(pred.probs["shape"][one], MMR_TAUS) if one.any() else dict.fromkeys(MMR_TAUS, float("nan"))
        out |= {f"mmr.{tau:g}": v for tau, v in mixed.items()}
        return out


# --------------------------------------------------------------------------- the grid of rows

@dataclass
class _Config:
    row: dict                                                   # method, label, sampler, ... (the JSON row head)
    run: Callable[[list[int]], tuple[np.ndarray, np.ndarray | None, float]]
    entry: MapEntry | None = None


def _configs(pipe, maps: list[MapEntry], settings: EvalSettings) -> list[_Config]:
    res, bs = settings.resolution, settings.batch_size

    def baseline(sampler: str, steps: int):
        return lambda seeds: generate_baseline(pipe, sampler, seeds, steps=steps, resolution=res, batch_size=bs)

    def dpm_ot(entry: MapEntry, tail: str, assignment: str, steps: int):
        return lambda seeds: generate_dpm_ot(pipe, entry.ot_map, seeds, steps=steps, sampler=tail,
                                             assignment=assignment, batch_size=bs)

    configs = [_Config({"method": "baseline", "label": f"{s} from x_T", "map": None, "sampler": s, "assignment": None,
                        "nfe": k}, baseline(s, k)) for s in settings.baselines for k in settings.nfe]
    for entry in maps:
        n = entry.ot_map.num_targets
        for tail in settings.tails:
            for assignment in settings.assignments:
                for k in settings.nfe:
                    configs.append(_Config({
                        "method": "dpm-ot", "label": f"DPM-OT [{entry.label}] {tail} {assignment}", "map": entry.label,
                        "sampler": tail, "assignment": assignment, "nfe": k,
                        # distinct targets expected from uniform draws: what an exact OT map gives (spec §2)
                        "unique_targets_if_uniform": n * (1 - (1 - 1 / n) ** settings.num_images)},
                        dpm_ot(entry, tail, assignment, k), entry))
    # last: the costliest row (1000 steps) and the one a cut-short run can best do without
    if settings.ddpm_reference_steps:
        k = settings.ddpm_reference_steps
        configs.append(_Config({"method": "ddpm-reference", "label": f"ddpm {k} steps", "map": None, "sampler": "ddpm",
                                "assignment": None, "nfe": k}, baseline("ddpm", k)))
    return configs


def _check_data_targets(maps: list[MapEntry], train_images: np.ndarray):
    """Data targets must be the first N images of the memorisation reference (else its NN
    distances would miss the very images DPM-OT copies)."""
    for entry in maps:
        if entry.record["targets"] != "data":
            continue
        n = entry.ot_map.num_targets
        if n > len(train_images) or not np.array_equal(entry.x0_images, train_images[:n]):
            raise UserError(f"{entry.record['dir']}: its {n} data targets are not the first images of the "
                            f"--train-images {len(train_images)} reference (raise it, or check --data-seed)")


def evaluate(pipe, classifier, maps: list[MapEntry], settings: EvalSettings, device, progress: bool = True,
             on_row: Callable[[dict], None] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(results without the run's provenance, grid rows: label -> uint8 images). `on_row` gets the
    results so far (`complete` false) after every row: a run cut short keeps what it finished."""
    from tqdm import tqdm

    from leanserve.eval.images import GRID_COLUMNS, aggregate, image_seed

    n = settings.num_images
    scorer = Scorer(classifier, settings, device)
    _check_data_targets(maps, scorer.train_images)  # before any image is generated
    grid = {"real": scorer.real_images[:GRID_COLUMNS]}
    target_features = {}
    for entry in maps:
        target_features[entry.label] = classifier.predict(entry.x0_images).features
        floor_images = entry.x0_images[:n]
        entry.record["target_set"] = {"num_images": len(floor_images), **scorer.score(floor_images)}
        grid[f"targets [{entry.label}]"] = entry.x0_images[:GRID_COLUMNS]

    configs = _configs(pipe, maps, settings)
    rows = []

    def results(complete: bool) -> dict:
        return {"complete": complete,
                "settings": {**asdict(settings), "grid_nfe": settings.grid_nfe, "near_copy": NEAR_COPY,
                             "mmr_taus": list(MMR_TAUS), "prompt": "", "guidance": 1.0},
                "thresholds": scorer.thresholds, "maps": [e.record for e in maps], "reference": scorer.reference,
                "rows": rows, "unet_images_total": sum(r["unet_images"] for r in rows) * len(settings.seeds)}

    bar = tqdm(total=len(configs) * len(settings.seeds), desc="eval dpm-ot", disable=not progress)
    for config in configs:
        config.run(list(range(WARMUP_IMAGES)))  # lazy init, kernel selection, allocator: kept out of the timing
        per_seed, counts = [], None
        for seed in settings.seeds:
            with count_unet(pipe) as counted:
                images, jumps, seconds = config.run([image_seed(seed, 0, i) for i in range(n)])
            counts = counts or dict(counted)
            targets = None
            if jumps is not None:
                targets = (config.entry.x0_images[jumps.indices], target_features[config.entry.label][jumps.indices])
            metrics = scorer.score(images, targets=targets) | {"images_per_s": n / seconds}
            if jumps is not None:
                metrics["unique_targets"] = float(len(np.unique(jumps.indices)))
                metrics["jump_rms"] = float(jumps.rms.mean())
            per_seed.append(metrics)
            if seed == settings.seeds[0] and (config.row["nfe"] == settings.grid_nfe
                                              or config.row["method"] == "ddpm-reference"):
                grid[f"{config.row['label']} {config.row['nfe']} NFE"] = images[:GRID_COLUMNS]
            bar.update()
        rows.append({**config.row, "unet_calls": counts["calls"], "unet_images": counts["images"],
                     "metrics": aggregate(per_seed)})
        if on_row is not None and len(rows) < len(configs):
            on_row(results(complete=False))
    bar.close()
    return results(complete=True), grid


# --------------------------------------------------------------------------- outputs (from the JSON only)

def plot_results(results: dict, path: str | Path) -> None:
    """FD against NFE: one line per method (mean ± std over seeds), the DDPM reference and the
    real-vs-real floor as horizontal lines."""
    from leanserve.eval.plots import Series, line_plot

    lines: dict[str, list[dict]] = {}
    for row in results["rows"]:
        if row["method"] != "ddpm-reference":
            lines.setdefault(row["label"], []).append(row)
    nfes = sorted({r["nfe"] for rows in lines.values() for r in rows}) or [1]
    span = [nfes[0], nfes[-1]]
    series = []
    for label, rows in lines.items():
        rows = sorted(rows, key=lambda r: r["nfe"])
        # baselines solid with circles; DPM-OT with squares, its controls dashed/dash-dotted
        fmt = {None: "-o", "ot": "-s", "random": "--s", "nearest": "-.s"}[rows[0]["assignment"]]
        series.append(Series(label, [r["nfe"] for r in rows], [r["metrics"]["fd"]["mean"] for r in rows],
                             yerr=[r["metrics"]["fd"]["std"] for r in rows], fmt=fmt))
    for row in results["rows"]:
        if row["method"] == "ddpm-reference":
            fd = row["metrics"]["fd"]
            series.append(Series(f"{row['label']} (reference)", span, [fd["mean"]] * 2, yerr=[fd["std"]] * 2, fmt=":"))
    series.append(Series("real vs real (floor)", span, [results["reference"]["fd"]] * 2, fmt=":"))
    settings = results["settings"]
    values = [y for s in series for y in s.y]
    line_plot(series, path, title=f"DPM-OT vs solvers: FD against NFE ({settings['num_images']} images, "
                                  f"{len(settings['seeds'])} seeds)",
              xlabel="NFE (UNet evaluations per image)", ylabel="FD (classifier features)", log_y=min(values) > 0)


TABLE_COLUMNS = (("FD ↓", "fd"), ("KID", "kid"), ("unique targets", "unique_targets"),
                 ("NN px median", "nn_pixel.median"), ("NN feat median", "nn_feature.median"),
                 ("near-copy px", "nn_pixel.near_copy"), ("to target px", "target_pixel.median"),
                 ("MMR τ=0.2", "mmr.0.2"), ("jump ‖x_T − x_t′‖/√d", "jump_rms"), ("img/s", "images_per_s"))


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, dict):
        mean, std = value["mean"], value["std"]
        return f"{mean:.3g} ± {std:.2g}" if std else f"{mean:.3g}"
    return f"{value:.3g}"


def markdown_table(results: dict) -> str:
    """One line per row (mean ± std over seeds), then the real second set and each map's target-set floor."""
    head = "| method | NFE | " + " | ".join(name for name, _ in TABLE_COLUMNS) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(TABLE_COLUMNS)]
    for row in results["rows"]:
        cells = [_cell(row["metrics"].get(key)) for _, key in TABLE_COLUMNS]
        lines.append(f"| {row['label']} | {row['nfe']} | " + " | ".join(cells) + " |")
    floors = [("real test set (floor)", results["reference"])]
    floors += [(f"targets [{m['label']}] (floor, {m['target_set']['num_images']} images)", m["target_set"])
               for m in results["maps"]]
    for label, metrics in floors:
        lines.append(f"| {label} | – | " + " | ".join(_cell(metrics.get(key)) for _, key in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command

def _check_args(args):
    from leanserve.models.dpm_ot_sampler import ASSIGNMENTS, TAIL_SAMPLERS
    from leanserve.models.image_pipeline import SAMPLERS

    if args.results:
        if args.teacher or args.maps or args.grid:
            raise UserError("--results combines finished runs: no --teacher, --maps or --grid")
        return
    if not args.teacher:
        raise UserError("--teacher is required (or --results to combine finished runs)")
    if args.num_images < 2 or args.train_images < 1 or args.batch_size < 1:
        raise UserError("need --num-images >= 2, --train-images >= 1 and --batch-size >= 1")
    if not (args.baselines or args.maps or args.ddpm_reference_steps):
        raise UserError("nothing to evaluate: give --baselines, --maps or --ddpm-reference-steps")
    if min(args.nfe) < 1 or args.ddpm_reference_steps < 0:
        raise UserError("--nfe must be >= 1 and --ddpm-reference-steps >= 0")
    for option, names, known in (("--baselines", args.baselines, SAMPLERS), ("--tails", args.tails, TAIL_SAMPLERS),
                                 ("--assignments", args.assignments, ASSIGNMENTS)):
        unknown = [s for s in names if s not in known]
        if unknown:
            raise UserError(f"unknown {option} {unknown}; choose from {', '.join(known)}")


# settings that make rows of different runs comparable: same noise, same images, same real and train sets
COMBINE_KEYS = ("seeds", "num_images", "train_images", "real_seed", "data_seed", "resolution", "near_copy",
                "mmr_taus", "prompt", "guidance")


def combine(runs: list[dict], names: list[str]) -> dict:
    """One results dict from several runs' JSONs (all rows, DDPM references last, every map): the
    runs must agree on COMBINE_KEYS, and no (label, NFE) row may come twice."""
    first = runs[0]
    for name, run in zip(names[1:], runs[1:]):
        differ = [k for k in COMBINE_KEYS if run["settings"].get(k) != first["settings"].get(k)]
        if differ:
            raise UserError(f"{name}: settings {differ} differ from {names[0]}'s; its rows are not comparable")
        if run.get("teacher_sha256") != first.get("teacher_sha256"):  # (files written before it was recorded: None)
            raise UserError(f"{name}: its teacher's weights differ from {names[0]}'s; its rows are not comparable")
    rows, seen, maps = [], set(), {}
    for name, run in zip(names, runs):
        for row in run["rows"]:
            key = (row["label"], row["nfe"])
            if key in seen:
                raise UserError(f"{name}: row {row['label']!r} at NFE {row['nfe']} is in an earlier file too")
            seen.add(key)
            rows.append(row)
        maps.update({m["label"]: m for m in run["maps"]})
    rows.sort(key=lambda r: r["method"] == "ddpm-reference")  # stable: the reference rows last
    return {**first, "complete": all(r["complete"] for r in runs), "rows": rows, "maps": list(maps.values()),
            "unet_images_total": sum(r["unet_images_total"] for r in runs),
            "combined_from": [{"file": n, "hardware": r["hardware"], "complete": r["complete"],
                               "rows": [f"{x['label']} @ {x['nfe']}" for x in r["rows"]]}
                              for n, r in zip(names, runs)]}


def _outputs(results: dict, args):
    from leanserve.eval.report import emit_json

    emit_json(results, args.out)
    print(markdown_table(results))
    if args.plot:
        plot_results(results, args.plot)
        print(f"wrote {args.plot}")


def run(args):
    from leanserve.eval.classifier import DEFAULT_DIR, load_classifier
    from leanserve.eval.images import device_and_dtype, save_grid
    from leanserve.eval.report import hardware, provenance as run_provenance
    from leanserve.models.image_pipeline import load_image_pipeline, native_size
    from leanserve.models.model_dir import load_model_info, weights_sha256

    _check_args(args)
    if args.results:
        try:
            runs = [json.loads(Path(f).read_text()) for f in args.results]
        except (OSError, ValueError) as e:
            raise UserError(f"--results: {e}") from None
        _outputs(combine(runs, args.results), args)
        return 0
    device, dtype = device_and_dtype(args.device, args.dtype)
    pipe = load_image_pipeline(args.teacher, device, dtype)
    if not hasattr(pipe, "default_size"):
        raise UserError(f"{args.teacher}: DPM-OT needs a pixel-space PixelDiffusionPipeline teacher")
    maps = load_maps(args.maps, args.teacher, pipe, max(args.nfe))
    classifier_dir = Path(args.classifier) if args.classifier else DEFAULT_DIR
    classifier = load_classifier(classifier_dir, device)
    classifier_info = load_model_info(classifier_dir)
    settings = EvalSettings(nfe=args.nfe, baselines=args.baselines, tails=args.tails, assignments=args.assignments,
                            seeds=args.seeds, num_images=args.num_images, ddpm_reference_steps=args.ddpm_reference_steps,
                            train_images=args.train_images, batch_size=args.batch_size, resolution=native_size(pipe),
                            real_seed=args.real_seed, data_seed=args.data_seed)
    provenance = {**run_provenance(), "teacher": str(args.teacher), "teacher_sha256": weights_sha256(args.teacher),
                  "hardware": hardware(device),
                  "dtype": str(dtype).removeprefix("torch."),
                  "classifier": {"dir": str(classifier_dir), "test_accuracy": classifier_info.metrics.get("test_accuracy")
                                 if classifier_info else None}}

    def write_partial(partial: dict):
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        # a run killed mid-write keeps the previous complete file
        atomic_write_text(args.out, json.dumps({**provenance, **partial}, indent=2) + "\n")

    results, grid = evaluate(pipe, classifier, maps, settings, device, on_row=write_partial if args.out else None)
    _outputs({**provenance, **results}, args)
    if args.grid:
        save_grid(grid, args.grid)
        print(f"wrote {args.grid}")
    return 0
