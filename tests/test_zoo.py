"""The zoo's served defaults: zoo/shapes-sid (the distilled generator, the images API's default) is
a SiD generator of zoo/shapes-teacher within the zoo's size budget, records its distillation and
its eval, and runs through leanserve's loader and diffusers' generic one."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from leanserve.models.model_dir import weights_sha256
from leanserve.server.serve import DEFAULT_MODELS, _model_kind

ROOT = Path(__file__).resolve().parents[1]
SID = ROOT / "zoo" / "shapes-sid"


def test_the_default_image_model_is_the_distilled_generator():
    images = [m for m in DEFAULT_MODELS if _model_kind(str(ROOT / m)) == "image"]
    assert images == ["zoo/shapes-sid", "zoo/shapes-teacher"]  # the first image model is the default


def test_the_zoo_fits_its_budget():
    """DESIGN: at most 40 MB together. Files two models share byte for byte (shapes-sid's text encoder
    and scheduler are its teacher's) are relative symlinks inside zoo/ and count once."""
    zoo = ROOT / "zoo"
    total, links = 0, []
    for dirpath, dirnames, filenames in os.walk(zoo):  # does not descend into symlinked directories
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                links.append(path)
            elif path.is_file():
                total += path.stat().st_size
    assert total <= 40 * 2**20
    for link in links:
        assert not os.path.isabs(os.readlink(link)) and link.exists()
        assert link.resolve().is_relative_to(zoo.resolve())


def test_shapes_sid_records_its_distillation_and_eval():
    size = sum(p.stat().st_size for p in SID.rglob("*") if p.is_file())
    assert size <= 15e6
    info = json.loads((SID / "leanserve.json").read_text())
    assert info["method"] == "sid"
    assert info["base"]["sha256"] == weights_sha256(ROOT / "zoo" / "shapes-teacher")  # distilled from that teacher
    s = info["settings"]
    assert (s["num_steps"], s["t_init"], s["alpha"]) == (4, 625, 1.0)
    assert [s[f"kappa{i}"] for i in range(1, 5)] == [1.5] * 4
    assert info["metrics"]["images_seen"] > 0
    rows = {r["steps"]: r for r in info["metrics"]["image_eval"]["rows"]}
    assert sorted(rows) == [1, 2, 4] and all(np.isfinite(r["fd"]) for r in rows.values())


def test_shapes_sid_generates_through_both_loaders():
    from diffusers import DiffusionPipeline

    from leanserve.models.image_pipeline import load_image_pipeline

    pipe = load_image_pipeline(SID, torch.device("cpu"), torch.float32)
    generic = DiffusionPipeline.from_pretrained(SID, trust_remote_code=True)
    for p in (pipe, generic):
        p.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=["a red circle"], output_type="np")
    for steps in (1, 4):
        ours = pipe(**kwargs, num_inference_steps=steps, generator=[torch.Generator().manual_seed(0)]).images
        theirs = generic(**kwargs, num_inference_steps=steps, generator=[torch.Generator().manual_seed(0)]).images
        assert ours.shape == (1, 32, 32, 3) and np.isfinite(ours).all()
        np.testing.assert_allclose(ours, theirs, atol=1e-3)  # the generic loader keeps the stored fp16 weights
