"""`leanserve eval dpm-ot` on the zoo teacher with two tiny OT maps built by `leanserve train
dpm-ot` (data targets at t′ = 10, i.e. near-clean, and a fresh-noise map at t′ = 342): the JSON's
rows, UNet calls counted per batch, distinct targets, memorisation (a near-clean jump copies its
target, the baselines do not), the real floor, the plot and the Markdown table."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from leanserve.cli import main
from leanserve.eval.dpm_ot import (
    count_unet,
    generate_dpm_ot,
    markdown_table,
    plot_results,
)
from leanserve.eval.image_metrics import mode_mixture, nearest_distances
from leanserve.models.model_dir import weights_sha256

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHER = Path(__file__).resolve().parents[3] / "zoo" / "shapes-teacher"
N_TARGETS, N_IMAGES, BATCH, NFE, DDPM_STEPS = 16, 16, 8, 2, 2


def build_map(out: Path, t_prime: int, *extra: str) -> Path:
    assert main(["train", "dpm-ot", "--model", str(TEACHER), "--t-prime", str(t_prime), "--targets", "data",
                 "--num-targets", str(N_TARGETS), "--max-iters", "30", "--device", "cpu", "--out", str(out),
                 *extra]) == 0
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from torch_threads import single_thread

    root = tmp_path_factory.mktemp("dpm-ot-eval")
    with single_thread():
        maps = [build_map(root / "near", 10), build_map(root / "fresh", 342, "--fresh-noise")]
        paths = {"json": root / "results.json", "plot": root / "fd.png", "grid": root / "grid.png"}
        assert main(["eval", "dpm-ot", "--teacher", str(TEACHER), "--maps", *map(str, maps), "--nfe", str(NFE),
                     "--baselines", "ddim", "--tails", "ddpm", "--assignments", "ot", "random", "--seeds", "0",
                     "--num-images", str(N_IMAGES), "--train-images", "64", "--ddpm-reference-steps", str(DDPM_STEPS),
                     "--batch-size", str(BATCH), "--device", "cpu", "--out", str(paths["json"]),
                     "--plot", str(paths["plot"]), "--grid", str(paths["grid"])]) == 0
    return json.loads(paths["json"].read_text()), paths, maps


def rows_of(results, **match):
    return [r for r in results["rows"] if all(r[k] == v for k, v in match.items())]


def test_rows_settings_and_unet_calls(run):
    results, _, _ = run
    labels = [m["label"] for m in results["maps"]]
    assert labels == ["data t'=10 N=16", "data t'=342 N=16 fresh-noise"]
    for m in results["maps"]:
        assert m["solver_result"]["iterations"] == 30 and "converged" in m["solver_result"]
    # 1 baseline x 1 NFE + 2 maps x 1 tail x 2 assignments x 1 NFE + the DDPM reference (last: the costliest)
    assert [r["method"] for r in results["rows"]] == ["baseline"] + ["dpm-ot"] * 4 + ["ddpm-reference"]
    assert results["complete"] is True
    batches = math.ceil(N_IMAGES / BATCH)
    for row in results["rows"]:
        # counted on the UNet itself: K calls per batch (the jump costs none), one image per call and image
        assert row["unet_calls"] == row["nfe"] * batches and row["unet_images"] == row["nfe"] * N_IMAGES
        assert row["nfe"] == (DDPM_STEPS if row["method"] == "ddpm-reference" else NFE)
        assert set(row["metrics"]["fd"]) == {"mean", "std", "values"} and len(row["metrics"]["fd"]["values"]) == 1
    assert results["unet_images_total"] == sum(r["unet_images"] for r in results["rows"])
    assert results["settings"]["train_images"] == 64 and results["thresholds"]["pixel"] > 0
    assert results["teacher_sha256"] == weights_sha256(TEACHER)  # the teacher by its weights, not only its path


def test_distinct_targets(run):
    results, _, _ = run
    for row in rows_of(results, method="dpm-ot"):
        unique = row["metrics"]["unique_targets"]["mean"]
        assert 1 <= unique <= min(N_TARGETS, N_IMAGES)
        assert unique == int(unique)
        assert row["metrics"]["jump_rms"]["mean"] > 0
    for row in rows_of(results, method="baseline"):
        assert not {"unique_targets", "target_pixel.median", "jump_rms"} & set(row["metrics"])


def test_near_clean_jump_copies_its_target_and_baselines_do_not(run):
    results, _, _ = run
    baseline_nn = rows_of(results, method="baseline")[0]["metrics"]["nn_pixel.median"]["mean"]
    near = rows_of(results, map="data t'=10 N=16")
    assert {r["assignment"] for r in near} == {"ot", "random"}
    for row in near:  # the random-target control runs the same 2 denoising steps from the same t′
        m = {k: v["mean"] for k, v in row["metrics"].items()}
        assert m["target_pixel.median"] < 0.2 * baseline_nn
        assert m["target_pixel.near_copy"] == 1.0
        # the data targets are in the train reference, so the nearest train image is at most as far
        assert m["nn_pixel.median"] <= m["target_pixel.median"] + 1e-6
    assert rows_of(results, method="baseline")[0]["metrics"]["nn_pixel.near_copy"]["mean"] < 0.5
    for m in results["maps"]:  # the target-set floor of data targets: train images themselves
        assert m["target_set"]["nn_pixel.median"] < 1e-4 and m["target_set"]["num_images"] == N_IMAGES


def test_real_floor_is_below_the_samplers_from_noise(run):
    results, _, _ = run
    floor = results["reference"]["fd"]
    for row in rows_of(results, method="baseline") + rows_of(results, method="ddpm-reference"):
        assert floor < row["metrics"]["fd"]["mean"]
    assert results["reference"]["nn_pixel.near_copy"] < 0.5  # by construction of the threshold (median / 2)


def test_plot_grid_and_table_come_from_the_json(run, tmp_path):
    results, paths, _ = run
    for key in ("plot", "grid"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_results(json.loads(paths["json"].read_text()), tmp_path / "again.png")
    assert (tmp_path / "again.png").stat().st_size > 1000
    table = markdown_table(results).splitlines()
    # header, separator, one line per row, the real floor, one target-set floor per map
    assert len(table) == 2 + len(results["rows"]) + 1 + len(results["maps"])
    assert all(line.startswith("| ") and line.endswith(" |") for i, line in enumerate(table) if i != 1)
    assert table[2].startswith("| ddim from x_T | 2 |")


def test_tail_starts_at_t_prime_with_k_calls_per_batch(run):
    from leanserve.models.image_pipeline import load_image_pipeline, load_ot_map

    _, _, maps = run
    pipe = load_image_pipeline(maps[1])
    ot_map = load_ot_map(maps[1], pipe)
    timesteps = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: timesteps.append(int(args[1])))
    try:
        with count_unet(pipe) as counts:
            images, jumps, _ = generate_dpm_ot(pipe, ot_map, [3, 4, 5], steps=2, sampler="ddim", assignment="ot",
                                               batch_size=2)
    finally:
        hook.remove()
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8 and jumps.indices.shape == (3,)
    assert timesteps == [342, 171] * 2 and counts == {"calls": 4, "images": 6}
    # per-image generators: an image does not depend on its batch
    alone, alone_jumps, _ = generate_dpm_ot(pipe, ot_map, [5], steps=2, sampler="ddim", assignment="ot", batch_size=1)
    assert alone_jumps.indices[0] == jumps.indices[2] and np.abs(alone[0].astype(int) - images[2]).max() <= 1
    assert alone_jumps.rms[0] == pytest.approx(jumps.rms[2])


def test_refuses_too_many_steps_for_t_prime_and_unknown_tails(run, capsys):
    _, _, maps = run
    base = ["eval", "dpm-ot", "--teacher", str(TEACHER), "--maps", str(maps[0]), "--device", "cpu"]
    assert main([*base, "--nfe", "20"]) == 2
    assert "below the largest --nfe" in capsys.readouterr().err
    assert main([*base, "--tails", "euler"]) == 2
    assert "unknown --tails" in capsys.readouterr().err


def test_nearest_distances_and_mode_mixture():
    gen = torch.Generator().manual_seed(0)
    x, bank = torch.randn(50, 7, generator=gen), torch.randn(3900, 7, generator=gen)
    brute = ((x[:, None] - bank[None]) ** 2).sum(-1).sqrt().min(1).values
    torch.testing.assert_close(nearest_distances(x, bank, chunk=16), brute.double())
    assert float(nearest_distances(bank[5:9], bank).max()) < 1e-6  # exact copies
    probs = torch.tensor([[0.5, 0.45, 0.05], [0.9, 0.05, 0.05], [0.34, 0.33, 0.33]])
    assert mode_mixture(probs, (0.1, 0.3, 0.4)) == {0.1: 2 / 3, 0.3: 2 / 3, 0.4: 1 / 3}


def test_a_reference_run_apart_combines_with_the_rest(run, tmp_path):
    """A run cut short before its DDPM reference + the reference alone (no maps, no baselines) =
    the full run's rows, since every row starts from the same per-image noise."""
    results, paths, maps = run
    common = ["--teacher", str(TEACHER), "--seeds", "0", "--num-images", str(N_IMAGES), "--train-images", "64",
              "--batch-size", str(BATCH), "--device", "cpu"]
    ref = tmp_path / "ddpm.json"
    assert main(["eval", "dpm-ot", *common, "--maps", "--baselines", "--ddpm-reference-steps", str(DDPM_STEPS),
                 "--out", str(ref)]) == 0
    cut = {**results, "complete": False, "rows": rows_of(results, method="baseline") +
           rows_of(results, method="dpm-ot")}
    (tmp_path / "cut.json").write_text(json.dumps(cut))
    out = tmp_path / "combined.json"
    assert main(["eval", "dpm-ot", "--results", str(tmp_path / "cut.json"), str(ref), "--out", str(out),
                 "--plot", str(tmp_path / "combined.png")]) == 0
    combined = json.loads(out.read_text())
    assert [(r["label"], r["nfe"]) for r in combined["rows"]] == [(r["label"], r["nfe"]) for r in results["rows"]]
    assert combined["rows"][-1]["metrics"]["fd"]["mean"] == pytest.approx(results["rows"][-1]["metrics"]["fd"]["mean"])
    assert combined["maps"] == results["maps"] and not combined["complete"]
    assert len(combined["combined_from"]) == 2
    # rows twice, or runs on other seeds, are refused
    assert main(["eval", "dpm-ot", "--results", str(ref), str(ref)]) == 2
    other = json.loads(ref.read_text())
    other["settings"]["seeds"] = [1]
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["eval", "dpm-ot", "--results", str(tmp_path / "cut.json"), str(tmp_path / "other.json")]) == 2
    other = {**json.loads(ref.read_text()), "teacher_sha256": "0" * 64}  # another teacher's run
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["eval", "dpm-ot", "--results", str(tmp_path / "cut.json"), str(tmp_path / "other.json")]) == 2
