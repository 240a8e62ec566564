"""`leanserve eval images`: FD, KID, alignment, diversity and speed of a shapes image model.

For every (sampler, steps, guidance) and every evaluation seed:
- the FD set: `--num-images` images for the held-out prompts (EVAL_PROMPTS, cycled), compared
  with real images for the same prompts (leanserve.data.shapes.sample_for_prompt, test split);
  FD and KID in the attribute classifier's feature space, alignment with the prompts, images/s
  of the pipeline calls (warm-up excluded);
- the diversity set: `--diversity-seeds` images for each of DIVERSITY_PROMPTS (the under-specified
  prompts and the first eight held-out prompts): mean pairwise feature distance, near-duplicate
  pairs and coverage of the attributes each prompt leaves open, averaged over prompts.
The same numbers for a second, disjoint set of real images are the reference: the FD/KID floor
(what a perfect generator scores at this set size), the alignment ceiling (the classifier's own
error) and the real diversity. An evaluation seed fixes the generator noise of every image (one
CPU torch.Generator per image, so GPU and CPU runs draw the same noise); the real sets are the
same for every seed. Results: JSON (mean, std and per-seed values of every metric), a PNG grid
of samples (one row of real images, then one row per configuration), and with --write-metrics
the headline numbers merged into the model's leanserve.json. (No plot: matplotlib is not a
dependency.)
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from leanserve.errors import UserError

GRID_COLUMNS = 8
NEAR_DUPLICATE = 0.1  # a pair is a near-duplicate below this fraction of the real mean pairwise distance


def diversity_prompts() -> tuple[str, ...]:
    from leanserve.data.shapes import EVAL_PROMPTS, UNDERSPECIFIED_PROMPTS
    return UNDERSPECIFIED_PROMPTS + EVAL_PROMPTS[:8]


@dataclass
class EvalSettings:
    samplers: list[str] = field(default_factory=lambda: ["ddim"])
    steps: list[int] = field(default_factory=lambda: [25])
    guidance: list[float] = field(default_factory=lambda: [2.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    num_images: int = 500
    diversity_seeds: int = 16
    batch_size: int = 64
    resolution: int = 32
    real_seed: int = 0  # seed of the real reference stream (test split)


def add_runtime_arguments(p: argparse.ArgumentParser):
    """Classifier, device and dtype options shared by the image eval commands."""
    p.add_argument("--classifier", help="attribute classifier directory (default: zoo/shapes-classifier)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="pipeline dtype (auto: float16 on cuda, float32 on cpu)")


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="image model directory (diffusers layout)")
    p.add_argument("--sampler", nargs="+", help="samplers to compare (ddim dpmsolver++ unipc euler ddpm; default ddim; "
                                             "none for a SiD generator, whose chain is fixed)")
    p.add_argument("--steps", nargs="+", type=int, default=[25], help="numbers of sampling steps to compare")
    p.add_argument("--guidance", nargs="+", type=float,
                   help="classifier-free guidance scales (1 = none; default 2, and 1 for a SiD generator)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="evaluation seeds (generator noise); mean and std over them")
    p.add_argument("--num-images", type=int, default=500, help="images per FD set (generated and each real set)")
    p.add_argument("--diversity-seeds", type=int, default=16, help="images per diversity prompt")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resolution", type=int, help="image size (default: the size the model was trained at)")
    p.add_argument("--real-seed", type=int, default=0, help="seed of the real reference images")
    add_runtime_arguments(p)
    p.add_argument("--out", help="write the results JSON here (default: print it)")
    p.add_argument("--grid", help="write a PNG grid of samples here")
    p.add_argument("--write-metrics", action="store_true", help="merge the headline metrics into the model's leanserve.json")


# --------------------------------------------------------------------------- generation

def image_seed(eval_seed: int, set_id: int, index: int) -> int:
    """The generator seed of image `index` of set `set_id` (0: FD set, 1: diversity set)."""
    return int(np.random.SeedSequence([eval_seed, set_id, index]).generate_state(1, np.uint64)[0] >> 1)


def generate(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float, resolution: int,
             batch_size: int) -> tuple[np.ndarray, float]:
    """uint8 images [N, H, W, 3] of `pipe` for `prompts` (one generator seed each) and the seconds
    the pipeline calls took."""
    import torch

    from leanserve.eval.classifier import to_uint8

    images, seconds = [], 0.0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[start:start + batch_size]]
        t0 = time.perf_counter()
        out = pipe(prompt=batch, negative_prompt=None, num_inference_steps=steps, guidance_scale=guidance,
                   generator=generators, height=resolution, width=resolution, output_type="np").images
        _synchronize()
        seconds += time.perf_counter() - t0
        images.append(to_uint8(out))
    return np.concatenate(images), seconds


def _synchronize():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- evaluation

@dataclass
class _ImageSet:
    """Images (real or generated) with what the classifier reads from them."""
    images: np.ndarray
    features: np.ndarray
    labels: list[dict]


def _real_set(classifier, prompts: list[str], seed: int, first_index: int, resolution: int) -> _ImageSet:
    from leanserve.data.shapes import sample_for_prompt

    images = np.stack([sample_for_prompt(p, seed, first_index + i, resolution).image for i, p in enumerate(prompts)])
    pred = classifier.predict(images)
    return _ImageSet(images, pred.features, pred.labels())


def _diversity_summary(specs: list[dict], features: np.ndarray, labels: list[dict], per_prompt: int,
                       thresholds: list[float]) -> dict[str, float]:
    """Diversity metrics of each prompt's group of images, averaged over the prompts (coverage of
    an attribute over the prompts that leave it open)."""
    from leanserve.eval.image_metrics import diversity

    rows: dict[str, list[float]] = {}
    for j, spec in enumerate(specs):
        group = slice(j * per_prompt, (j + 1) * per_prompt)
        for k, v in diversity(spec, features[group], labels[group], thresholds[j]).items():
            rows.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in sorted(rows.items())}


def aggregate(per_seed: list[dict[str, float]]) -> dict[str, dict]:
    """Per metric: mean, std (population, over seeds) and the per-seed values."""
    return {k: {"mean": float(np.mean([r[k] for r in per_seed])), "std": float(np.std([r[k] for r in per_seed])),
                "values": [r[k] for r in per_seed]} for k in per_seed[0]}


def evaluate(pipe, classifier, settings: EvalSettings, *, set_sampler: Callable[[object, str], object] | None = None,
             progress: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """Run the evaluation grid. Returns (results, sample rows for the grid PNG: label -> uint8
    [GRID_COLUMNS, H, W, 3], real images first, each configuration at the first seed).

    `set_sampler(pipe, name)` switches the pipeline's sampler; without it there must be one sampler
    name, which only labels the pipeline's own.
    """
    from tqdm import tqdm

    from leanserve.data.shapes import EVAL_PROMPTS, parse_caption
    from leanserve.eval.image_metrics import (
        alignment,
        frechet_distance,
        kid,
        pairwise_distances,
    )

    if set_sampler is None and len(settings.samplers) > 1:
        raise ValueError("comparing samplers needs set_sampler")
    n, s, res = settings.num_images, settings.diversity_seeds, settings.resolution
    if n < 2 or s < 2:
        raise ValueError("num_images and diversity_seeds must be >= 2")
    prompts = [EVAL_PROMPTS[i % len(EVAL_PROMPTS)] for i in range(n)]
    specs = [parse_caption(p) for p in prompts]
    div_prompts = [p for p in diversity_prompts() for _ in range(s)]
    div_specs = [parse_caption(p) for p in diversity_prompts()]

    # real reference: set A is what everything is compared with, set B (disjoint indices) is
    # scored exactly like a generator; the diversity set uses a third index range
    ref = _real_set(classifier, prompts, settings.real_seed, 0, res)
    real = _real_set(classifier, prompts, settings.real_seed, n, res)
    real_div = _real_set(classifier, div_prompts, settings.real_seed, 2 * n, res)
    thresholds = [NEAR_DUPLICATE * pairwise_distances(real_div.features[j * s:(j + 1) * s]).mean()
                  for j in range(len(div_specs))]

    def score(images_fd: _ImageSet, images_div: _ImageSet) -> dict[str, float]:
        out = {"fd": frechet_distance(images_fd.features, ref.features),
               "kid": kid(images_fd.features, ref.features, seed=0)[0]}
        out |= {f"alignment.{k}": v for k, v in alignment(specs, images_fd.labels).items()}
        out |= {f"diversity.{k}": v for k, v in _diversity_summary(div_specs, images_div.features, images_div.labels,
                                                                    s, thresholds).items()}
        return out

    reference = score(real, real_div)
    grid = {"real": real.images[:GRID_COLUMNS]}
    rows = []
    configs = [(a, b, c) for a in settings.samplers for b in settings.steps for c in settings.guidance]
    bar = tqdm(total=len(configs) * len(settings.seeds), desc="eval images", disable=not progress)
    for sampler, steps, guidance in configs:
        if set_sampler is not None:
            set_sampler(pipe, sampler)
        # warm-up (lazy init, kernel selection, allocator) kept out of the images/s
        generate(pipe, prompts[:2], [0, 1], steps=steps, guidance=guidance, resolution=res, batch_size=2)
        per_seed = []
        for seed in settings.seeds:
            fd_images, seconds = generate(pipe, prompts, [image_seed(seed, 0, i) for i in range(n)], steps=steps,
                                          guidance=guidance, resolution=res, batch_size=settings.batch_size)
            div_images, _ = generate(pipe, div_prompts, [image_seed(seed, 1, i) for i in range(len(div_prompts))],
                                     steps=steps, guidance=guidance, resolution=res, batch_size=settings.batch_size)
            fd_pred, div_pred = classifier.predict(fd_images), classifier.predict(div_images)
            metrics = score(_ImageSet(fd_images, fd_pred.features, fd_pred.labels()),
                            _ImageSet(div_images, div_pred.features, div_pred.labels()))
            per_seed.append(metrics | {"images_per_s": n / seconds})
            if seed == settings.seeds[0]:
                grid[f"{sampler} {steps} steps cfg {guidance:g}"] = fd_images[:GRID_COLUMNS]
            bar.update()
        rows.append({"sampler": sampler, "steps": steps, "guidance": guidance,
                     # classifier-free guidance (scale > 1) runs the UNet twice per step
                     "unet_evals": steps * (2 if guidance > 1 else 1), "metrics": aggregate(per_seed)})
    bar.close()
    results = {"settings": asdict(settings), "eval_prompts": len(EVAL_PROMPTS),
               "diversity_prompts": list(diversity_prompts()), "reference": reference, "rows": rows}
    return results, grid


# --------------------------------------------------------------------------- outputs

def save_grid(rows: dict[str, np.ndarray], path: str | Path, cell: int = 64) -> None:
    """A PNG with one labelled row of images per entry (images scaled to `cell` pixels, nearest)."""
    from PIL import Image, ImageDraw

    label_width = 8 + 6 * max(len(k) for k in rows)  # PIL's default bitmap font: ~6 px per character
    columns = max(len(v) for v in rows.values())
    canvas = Image.new("RGB", (label_width + columns * (cell + 2), len(rows) * (cell + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows.items()):
        y = r * (cell + 2)
        draw.text((4, y + cell // 2 - 5), label, fill=(0, 0, 0))
        for c, image in enumerate(images):
            canvas.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (label_width + c * (cell + 2), y))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def headline(results: dict) -> dict:
    """The compact summary merged into leanserve.json: means per configuration and the reference."""
    keys = ("fd", "kid", "alignment.all", "diversity.pairwise_distance", "images_per_s")
    return {
        "num_images": results["settings"]["num_images"], "seeds": results["settings"]["seeds"],
        "hardware": results.get("hardware"),
        "reference": {k: results["reference"][k] for k in keys[:-1]},
        "rows": [{"sampler": r["sampler"], "steps": r["steps"], "guidance": r["guidance"],
                  **{k: r["metrics"][k]["mean"] for k in keys}} for r in results["rows"]],
    }


def evaluate_model(model_dir: str | Path, classifier, classifier_dir: str | Path, device, dtype, *,
                   samplers: list[str] | None, steps: list[int], guidance: list[float] | None, seeds: list[int],
                   num_images: int, diversity_seeds: int, batch_size: int, resolution: int | None = None,
                   real_seed: int = 0, progress: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """Load one image model and evaluate it: (the `eval images` results JSON, the grid rows).
    samplers/guidance None: the defaults (ddim, cfg 2; a SiD generator's own chain at guidance 1)."""
    from leanserve.eval.report import hardware
    from leanserve.models.image_pipeline import (
        load_image_pipeline,
        native_size,
        set_sampler,
    )
    from leanserve.models.model_dir import load_model_info
    from leanserve.models.sid_pipeline import SiDPipeline

    pipe = load_image_pipeline(model_dir, device, dtype)
    if isinstance(pipe, SiDPipeline):  # its few-step chain is the sampler, with the guidance distilled in
        if samplers or (guidance and guidance != [1.0]):
            raise UserError(f"{model_dir} is a SiD generator: it takes no --sampler and only --guidance 1")
        samplers, guidance, switch = ["sid"], [1.0], None
    else:
        samplers, guidance, switch = samplers or ["ddim"], guidance or [2.0], set_sampler
    classifier_info, info = load_model_info(classifier_dir), load_model_info(model_dir)
    settings = EvalSettings(samplers=samplers, steps=steps, guidance=guidance, seeds=seeds, num_images=num_images,
                            diversity_seeds=diversity_seeds, batch_size=batch_size,
                            resolution=resolution or native_size(pipe), real_seed=real_seed)
    results, grid = evaluate(pipe, classifier, settings, set_sampler=switch, progress=progress)
    # what the model is travels with its numbers (a JSON may come back from a GPU without the directory)
    model_info = info and {"method": info.method, "settings": info.settings,
                           "metrics": {k: v for k, v in info.metrics.items() if isinstance(v, (int, float))}}
    return {"model": str(model_dir), "model_info": model_info, "hardware": hardware(device),
            "dtype": str(dtype).removeprefix("torch."), "classifier": {"dir": str(classifier_dir),
                           "test_accuracy": classifier_info.metrics.get("test_accuracy") if classifier_info else None},
            **results}, grid


def check_counts(args):
    """UserError for image counts or steps the evaluation cannot use."""
    for name in ("num_images", "diversity_seeds", "batch_size"):
        if getattr(args, name) < (2 if name != "batch_size" else 1):
            raise UserError(f"--{name.replace('_', '-')} is too small")
    if any(s <= 0 for s in args.steps):
        raise UserError("--steps must be > 0")


def device_and_dtype(device_name: str, dtype_name: str):
    """The torch device and pipeline dtype of --device/--dtype (auto: float16 on cuda, float32 on cpu)."""
    import torch

    from leanserve.runtime import resolve_device, resolve_dtype

    device = resolve_device(device_name)
    return device, resolve_dtype(dtype_name, device, cuda_default=torch.float16)


def run(args):
    from leanserve.eval.classifier import DEFAULT_DIR, load_classifier
    from leanserve.eval.report import emit_json
    from leanserve.models.image_pipeline import SAMPLERS
    from leanserve.models.model_dir import merge_metrics

    check_counts(args)
    unknown = [s for s in args.sampler or [] if s not in SAMPLERS]
    if unknown:
        raise UserError(f"unknown sampler(s) {unknown}; choose from {', '.join(SAMPLERS)}")
    device, dtype = device_and_dtype(args.device, args.dtype)
    classifier_dir = Path(args.classifier) if args.classifier else DEFAULT_DIR
    classifier = load_classifier(classifier_dir, device)
    results, grid = evaluate_model(args.model, classifier, classifier_dir, device, dtype, samplers=args.sampler,
                                   steps=args.steps, guidance=args.guidance, seeds=args.seeds,
                                   num_images=args.num_images, diversity_seeds=args.diversity_seeds,
                                   batch_size=args.batch_size, resolution=args.resolution, real_seed=args.real_seed)
    emit_json(results, args.out)
    if args.grid:
        save_grid(grid, args.grid)
        print(f"wrote {args.grid}")
    if args.write_metrics and not merge_metrics(args.model, {"image_eval": headline(results)}):
        print(f"{args.model} has no leanserve.json: metrics not recorded there")
    return 0
