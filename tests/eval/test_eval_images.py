"""The image eval kit: FD/KID against closed forms, the zoo classifier, alignment, diversity and
the `leanserve eval images` command (on stand-in pipelines that render real shapes)."""
from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from leanserve.data.shapes import EVAL_PROMPTS, parse_caption, sample, sample_for_prompt
from leanserve.eval import image_metrics as M
from leanserve.eval.classifier import (
    HEADS,
    head_accuracy,
    labelled_images,
    load_classifier,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()  # the trained one in zoo/shapes-classifier


def random_psd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_matches_brute_force_and_closed_form():
    rng = np.random.default_rng(0)
    for d in (1, 3, 8):
        mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), random_psd(rng, d), random_psd(rng, d)
        # brute force: tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2
        brute = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
        assert M.frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(brute, rel=1e-9, abs=1e-9)
    # diagonal Gaussians: |dmu|^2 + sum (sigma1 - sigma2)^2
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu = np.array([1.0, 0.0, -2.0])
    assert M.frechet_distance_from_stats(mu, np.diag(v1), np.zeros(3), np.diag(v2)) == pytest.approx(5 + 1 + 0 + 4)


def test_frechet_distance_of_samples_is_zero_for_a_set_with_itself_and_grows_with_a_mean_shift():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(4000, 4)), rng.normal(size=(4000, 4))
    assert abs(M.frechet_distance(x, x)) < 1e-9
    # shifting every one of 4 axes by s moves the mean by |dmu|^2 = 4 s^2 and keeps the covariance
    fds = [M.frechet_distance(x, x + shift) for shift in (0.5, 1.0, 2.0)]
    assert fds == pytest.approx([1.0, 4.0, 16.0], rel=1e-9)
    # two samples of one Gaussian are close; doubling the std adds sum (1 - 2)^2 = 4
    assert M.frechet_distance(x, y) < 0.05
    assert M.frechet_distance(x, 2 * y) == pytest.approx(4.0, abs=0.3)


def test_kid_is_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    same, same_std = M.kid(x, y, num_subsets=50, subset_size=300)
    shifted, _ = M.kid(x, y + 0.5, num_subsets=50, subset_size=300)
    assert abs(same) < max(3 * same_std, 1e-3)
    assert shifted > 20 * abs(same) and shifted > 0.05


def test_zoo_classifier_is_accurate_on_fresh_held_out_images(classifier):
    data = labelled_images(seed=123, count=600, split="val")  # neither its training nor its reported test set
    pred = classifier.predict(data.images)
    accuracy = head_accuracy(pred, data.targets)
    assert set(HEADS) <= set(accuracy)
    assert all(v >= 0.9 for v in accuracy.values()), accuracy
    # features are scaled to RMS ~1 on real images (what KID's kernel assumes)
    assert 0.8 < np.sqrt(np.mean(pred.features ** 2)) < 1.25
    # 64x64 images are box-filtered down to the classifier's 32x32
    big = np.stack([sample(5, i, 64, split="val").image for i in range(100)])
    small = np.stack([sample(5, i, 32, split="val").image for i in range(100)])
    labels_big, labels_small = classifier.predict(big).labels(), classifier.predict(small).labels()
    assert np.mean([a == b for a, b in zip(labels_big, labels_small)]) >= 0.9


def test_alignment_of_real_images_is_high_with_their_captions_and_low_with_shuffled_ones(classifier):
    examples = [sample(9, i, split="test") for i in range(400)]
    labels = classifier.predict(np.stack([e.image for e in examples])).labels()
    specs = [parse_caption(e.caption) for e in examples]
    own = M.alignment(specs, labels)
    shuffled = M.alignment([specs[i] for i in np.random.default_rng(0).permutation(len(specs))], labels)
    assert own["all"] >= 0.9 and min(own.values()) >= 0.9, own
    assert shuffled["all"] <= 0.4, shuffled
    # every attribute is checked somewhere, and each one alone is far from perfect when shuffled
    assert set(own) == {"all", "count", "background", "shape", "color", "size", "position"}
    assert max(v for k, v in shuffled.items() if k not in ("all", "count")) < 0.6


def test_prompt_checks_by_attribute():
    one = {"count": 1, "background": "white", "shape": "star", "color": "red", "size": "small", "position": "top",
           "shapes_present": {"star"}, "colors_present": {"red"}}
    assert M.prompt_checks(parse_caption("a red star"), one) == {"count": True, "shape": True, "color": True}
    assert M.prompt_checks(parse_caption("a large red star on a black background"), one) == {
        "count": True, "background": False, "shape": True, "color": True, "size": False}
    two = one | {"count": 2, "shapes_present": {"star", "ring"}, "colors_present": {"red", "blue"}}
    assert M.prompt_checks(parse_caption("a red star and a blue ring"), two) == {"count": True, "shape": True, "color": True}
    assert M.prompt_checks(parse_caption("a red star and a green square"), two) == {"count": True, "shape": False, "color": False}
    assert M.prompt_checks(parse_caption("a star"), two) == {"count": False, "shape": True}
    with pytest.raises(ValueError):
        M.prompt_checks(parse_caption("hello"), one)


def test_diversity_and_coverage_of_real_images(classifier):
    def group(prompt):
        images = np.stack([sample_for_prompt(prompt, 0, i).image for i in range(24)])
        pred = classifier.predict(images)
        return M.diversity(parse_caption(prompt), pred.features, pred.labels(), near_duplicate_distance=1e-6)
    open_ = group("a red circle")
    fixed = group(EVAL_PROMPTS[0])
    assert set(open_) == {"pairwise_distance", "near_duplicates", "coverage.size", "coverage.position", "coverage.background"}
    assert set(fixed) == {"pairwise_distance", "near_duplicates"}
    assert open_["coverage.position"] >= 6 / 9 and open_["coverage.size"] == 1 and open_["coverage.background"] == 1
    assert open_["pairwise_distance"] > 1.5 * fixed["pairwise_distance"] > 0
    assert open_["near_duplicates"] == 0
    # identical images are all near-duplicates and have no spread
    pred = classifier.predict(np.repeat(sample(0, 0).image[None], 5, 0))
    same = M.diversity(parse_caption("a shape"), pred.features, pred.labels(), near_duplicate_distance=1e-3)
    assert same["near_duplicates"] == 1 and same["pairwise_distance"] < 1e-3 and same["coverage.shape"] == 1 / 8


class RealShapesPipeline:
    """Stands in for a text-to-image pipeline (same call convention): a real render of each prompt,
    unspecified attributes drawn from the image's generator, or with `blind` a random scene that
    ignores the prompt."""
    default_size = 32

    def __init__(self, blind: bool = False):
        from diffusers import DDIMScheduler
        self.scheduler = DDIMScheduler()
        self.blind = blind

    def __call__(self, *, prompt, negative_prompt, num_inference_steps, guidance_scale, generator, height, width,
                 output_type):
        assert output_type == "np" and len(generator) == len(prompt) and height == width
        images = []
        for p, g in zip(prompt, generator):
            seed = int(torch.randint(0, 2 ** 31, (1,), generator=g))
            ex = sample(seed, 0, height) if self.blind else sample_for_prompt(p, seed, 0, height, split="train")
            images.append(ex.image)
        return SimpleNamespace(images=np.stack(images).astype(np.float32) / 255)


def test_evaluate_separates_a_faithful_pipeline_from_a_prompt_blind_one(classifier):
    from leanserve.eval.images import EvalSettings, evaluate
    from leanserve.models.image_pipeline import set_sampler

    settings = EvalSettings(samplers=["ddim", "euler"], steps=[2], guidance=[1.0], seeds=[0, 1], num_images=144,
                            diversity_seeds=4, batch_size=50)
    pipe = RealShapesPipeline()
    results, grid = evaluate(pipe, classifier, settings, set_sampler=set_sampler, progress=False)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"  # the samplers were switched, in order
    ref = results["reference"]
    assert [(r["sampler"], r["unet_evals"]) for r in results["rows"]] == [("ddim", 2), ("euler", 2)]
    good = results["rows"][0]["metrics"]
    assert len(good["fd"]["values"]) == 2 and good["fd"]["std"] > 0  # the seeds change the noise
    # a perfect generator scores like the second real set
    assert good["fd"]["mean"] < 1.5 * ref["fd"] + 0.1 * np.mean([abs(v) for v in good["fd"]["values"]])
    assert good["alignment.all"]["mean"] >= 0.9 and ref["alignment.all"] >= 0.9
    assert good["diversity.coverage.position"]["mean"] >= 0.5 * ref["diversity.coverage.position"]
    assert list(grid) == ["real", "ddim 2 steps cfg 1", "euler 2 steps cfg 1"]
    assert all(v.shape == (8, 32, 32, 3) and v.dtype == np.uint8 for v in grid.values())

    blind, _ = evaluate(RealShapesPipeline(blind=True), classifier, EvalSettings(
        samplers=["ddim"], steps=[2], guidance=[1.0], seeds=[0], num_images=144, diversity_seeds=4), progress=False)
    bad = blind["rows"][0]["metrics"]
    assert bad["alignment.all"]["mean"] <= 0.2
    assert bad["fd"]["mean"] > 3 * good["fd"]["mean"] and bad["kid"]["mean"] > 3 * good["kid"]["mean"]


def test_eval_images_command_writes_json_grid_and_metrics(tmp_path, monkeypatch):
    from PIL import Image

    from leanserve.eval import images
    from leanserve.models import image_pipeline
    from leanserve.models.model_dir import ModelInfo, load_model_info, save_model_info

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_model_info(model_dir, ModelInfo(kind="image", method="dense"))
    monkeypatch.setattr(image_pipeline, "load_image_pipeline", lambda path, device, dtype: RealShapesPipeline())
    parser = argparse.ArgumentParser()
    images.add_arguments(parser)
    out, grid = tmp_path / "eval.json", tmp_path / "grid.png"
    args = parser.parse_args(["--model", str(model_dir), "--sampler", "ddim", "dpmsolver++", "--steps", "1",
                              "--num-images", "72", "--diversity-seeds", "3", "--device", "cpu", "--out", str(out),
                              "--grid", str(grid), "--write-metrics"])
    assert images.run(args) == 0
    result = json.loads(out.read_text())
    assert result["classifier"]["test_accuracy"]["shape"] >= 0.9 and result["hardware"].startswith("CPU")
    assert [r["sampler"] for r in result["rows"]] == ["ddim", "dpmsolver++"]
    assert result["rows"][0]["metrics"]["images_per_s"]["mean"] > 0
    assert Image.open(grid).size[1] == 3 * 66  # real + one row per configuration
    merged = load_model_info(model_dir).metrics["image_eval"]
    assert merged["rows"][1]["sampler"] == "dpmsolver++" and merged["reference"]["fd"] == result["reference"]["fd"]

    bad = parser.parse_args(["--model", str(model_dir), "--sampler", "heun"])
    from leanserve.errors import UserError
    with pytest.raises(UserError, match="heun"):
        images.run(bad)
