"""GPU: what CUDA graphs of the UNet's forward (`leanserve serve --image-cuda-graphs`, models/unet_graphs.py)
buy per pipeline call, eager and graphed side by side in one run, on the zoo image models.

    python benchmarks/bench_image_graphs_gpu.py [--batches 1 8 64 256] [--runs 10]
    python benchmarks/bench_image_graphs_gpu.py --smoke     # CPU, a tiny pixel pipeline: eager only

Each row: one model, step count and batch; ImageModel.generate (the image engine's call: text encoding,
the denoising loop, images to the host) timed with CUDA events over --runs calls after a warm-up call
(the graphed arm's warm-up captures its graph). `max_abs_diff` is the largest pixel difference between
the two arms' images for the same prompts and seeds (0..1 scale; kernels chosen per batch size differ in
rounding). The bound a graph cannot beat is the GPU time of the eager forward's kernels; the gap
between the eager call and that is host work (Python and launches), which is what the graph removes.
Results: benchmarks/results/image_graphs-<gpu>.json.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from common import RESULTS, time_calls, write_result

from leanserve.models.image_model import load_image_model
from leanserve.models.image_params import ImageParams
from leanserve.runtime import resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
ROWS = (("shapes-sid", 1), ("shapes-sid", 4), ("shapes-teacher", 25))


def time_arm(model, batch: int, steps: int, runs: int) -> tuple[float, object]:
    p = ImageParams(model.sizes.width, model.sizes.height, steps, model.default_guidance)
    prompts = [f"a shape {i}" for i in range(batch)]

    def call():
        return model.generate(prompts, None, p, [torch.Generator("cpu").manual_seed(i) for i in range(batch)],
                              on_step=lambda: False)
    times = time_calls(call, model.device, runs=runs, warmup=1)
    return statistics.median(times), call()


def bench_row(path: Path, name: str, steps: int, batches: list[int], runs: int, device: torch.device) -> list[dict]:
    rows = []
    eager = load_image_model(path, name, device, resolve_dtype("auto", device))
    graphed = load_image_model(path, name, device, resolve_dtype("auto", device))
    graphs = graphed.enable_cuda_graphs(max(batches))
    for batch in batches:
        t_eager, images_eager = time_arm(eager, batch, steps, runs)
        row = {"model": name, "steps": steps, "batch": batch, "eager_ms": 1e3 * t_eager,
               "eager_img_s": batch / t_eager}
        if graphs:
            t_graph, images_graph = time_arm(graphed, batch, steps, runs)
            row |= {"graphed_ms": 1e3 * t_graph, "graphed_img_s": batch / t_graph, "speedup": t_eager / t_graph,
                    "max_abs_diff": float(abs(images_graph - images_eager).max())}
        print(row, flush=True)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        from tests.image_builders import build_tiny_pixel_pipeline
        path = build_tiny_pixel_pipeline(Path(tempfile.mkdtemp()) / "pixel")
        rows = bench_row(path, "pixel", 2, [1, 2], 1, device)
    else:
        rows = [r for name, steps in ROWS for r in bench_row(ROOT / "zoo" / name, name, steps, args.batches,
                                                              args.runs, device)]
    print(write_result("image_graphs_smoke" if args.smoke else "image_graphs", {"rows": rows}, args.out_dir))


if __name__ == "__main__":
    main()
