"""The shapes text-image set: determinism, disjoint splits, correct pixels and honest captions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from leanserve.data import shapes
from leanserve.data.shapes import (
    BACKGROUND_RGB,
    EVAL_PROMPTS,
    OBJECT_ATTRIBUTES,
    POSITIONS,
    RGB,
    SHAPES,
    UNDERSPECIFIED_PROMPTS,
    ShapesDataset,
    describe,
    parse_caption,
    render,
    sample,
    sample_for_prompt,
)


def test_same_seed_and_index_give_identical_bytes():
    for index in (0, 7, 123_456):
        a, b = sample(3, index), sample(3, index)
        assert a.image.tobytes() == b.image.tobytes() and a.caption == b.caption and a.attrs == b.attrs
    assert sample(3, 5, 64).image.shape == (64, 64, 3)


def test_different_seeds_indices_and_splits_differ():
    base = sample(0, 0).image
    others = [sample(1, 0).image, sample(0, 1).image, sample(0, 0, split="val").image, sample(0, 0, split="test").image]
    assert all(not np.array_equal(base, o) for o in others)
    with pytest.raises(ValueError):
        sample(0, 0, split="dev")


def _center_px(obj: dict, resolution: int) -> tuple[int, int]:
    row, col = divmod(POSITIONS.index(obj["position"]), 3)
    return int(shapes.CELL_CENTERS[row] * resolution), int(shapes.CELL_CENTERS[col] * resolution)


@pytest.mark.parametrize("resolution", [32, 64])
def test_rendered_pixels_match_the_labels(resolution):
    for shape in SHAPES:
        for position in POSITIONS:
            attrs = {"background": "navy", "objects": [{"shape": shape, "color": "yellow", "size": "large", "position": position}]}
            img = render(attrs, resolution).astype(int)
            y, x = _center_px(attrs["objects"][0], resolution)
            # a ring is hollow: its colour lies on the circle of radius ~0.78, its centre is background
            if shape == "ring":
                y -= round(0.78 * shapes.RADIUS["large"] * resolution)
            assert np.abs(img[y, x] - RGB["yellow"]).max() <= 40, (shape, position)
            # the quadrant farthest from the shape is pure background
            far_y = 0 if y > resolution / 2 else resolution - 1
            far_x = 0 if x > resolution / 2 else resolution - 1
            assert tuple(img[far_y, far_x]) == BACKGROUND_RGB["navy"], (shape, position)
            # the object covers a plausible share of the image, drawn only in its own third
            mask = np.abs(img - BACKGROUND_RGB["navy"]).sum(-1) > 30
            rows = np.nonzero(mask)[0]
            assert 0.02 < mask.mean() < 0.2
            assert abs(rows.mean() / resolution - shapes.CELL_CENTERS[divmod(POSITIONS.index(position), 3)[0]]) < 0.1


def test_sizes_are_ordered():
    def area(size):
        img = render({"background": "black", "objects": [{"shape": "square", "color": "red", "size": size, "position": "center"}]})
        return (np.abs(img.astype(int) - BACKGROUND_RGB["black"]).sum(-1) > 30).sum()
    assert area("small") < area("medium") < area("large")


def test_two_objects_never_overlap_and_both_are_drawn():
    for i in range(300):
        ex = sample(0, i, two_object_prob=1.0)
        a, b = ex.attrs["objects"]
        (r1, c1), (r2, c2) = (divmod(POSITIONS.index(o["position"]), 3) for o in (a, b))
        assert max(abs(r1 - r2), abs(c1 - c2)) >= 2
        for obj in (a, b):
            y, x = _center_px(obj, 32)
            if obj["shape"] != "ring":
                assert np.abs(ex.image[y, x].astype(int) - obj["rgb"]).max() <= 40


def test_captions_state_exactly_the_specified_attributes():
    kinds = set()
    for i in range(2000):
        ex = sample(11, i)
        spec = ex.attrs["specified"]
        assert parse_caption(ex.caption) == spec, ex.caption
        # what the caption says is true of the image
        for said, obj in zip(spec["objects"], ex.attrs["objects"], strict=True):
            assert said.items() <= obj.items()
        assert spec.get("background", ex.attrs["background"]) == ex.attrs["background"]
        kinds.add((len(spec["objects"]), tuple(sorted(spec["objects"][0])), "background" in spec))
    # under-specified captions of every kind occur, one- and two-object ones, with and without background
    assert len(kinds) > 30
    assert {k[0] for k in kinds} == {1, 2} and {k[2] for k in kinds} == {True, False}
    assert any(len(k[1]) < 4 and "shape" in k[1] for k in kinds)


def test_unspecified_attributes_leave_no_words_behind():
    spec = {"objects": [{"shape": "star"}]}
    rng = np.random.default_rng(0)
    vocabulary_words = {w for table in (shapes.COLOR_WORDS, shapes.SIZE_WORDS, shapes.BACKGROUND_WORDS)
                        for words in table.values() for phrase in words for w in phrase.split()}
    vocabulary_words |= {"top", "bottom", "left", "right", "center", "centre", "middle", "upper", "lower"}
    for _ in range(50):
        caption = describe(spec, rng)
        assert not vocabulary_words & set(caption.replace(",", " ").split()), caption
        assert parse_caption(caption) == spec


def test_parse_caption_reads_free_text_and_rejects_contradictions():
    assert parse_caption("In the upper left, a big crimson disc, and a tiny cobalt plus at the bottom against a grey background") == {
        "objects": [{"shape": "circle", "color": "red", "size": "large", "position": "top left"},
                    {"shape": "cross", "color": "blue", "size": "small", "position": "bottom"}],
        "background": "gray"}
    assert parse_caption("a blue square on a dark blue background") == {"objects": [{"shape": "square", "color": "blue"}],
                                                                        "background": "navy"}
    assert parse_caption("hello world") == {"objects": []}
    for bad in ("a small large circle", "a red circle in the top bottom", "a red"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_prompt_sets():
    specs = [parse_caption(p) for p in EVAL_PROMPTS]
    assert len(set(EVAL_PROMPTS)) == len(EVAL_PROMPTS) == 72
    assert all(len(s["objects"]) == 1 and set(s["objects"][0]) == set(OBJECT_ATTRIBUTES) and "background" in s for s in specs)
    for attr, vocab in shapes.VOCAB.items():  # balanced: every value used equally often
        values = [s.get(attr) or s["objects"][0][attr] for s in specs]
        assert {values.count(v) for v in vocab} == {72 // len(vocab)}
    for p in UNDERSPECIFIED_PROMPTS:
        s = parse_caption(p)
        assert len(s["objects"]) == 1 and (len(s["objects"][0]) < 4 or "background" not in s)


def test_sample_for_prompt_satisfies_the_prompt_and_varies_the_rest():
    positions = set()
    for i in range(40):
        ex = sample_for_prompt("a large red circle on a white background", seed=0, index=i)
        (obj,) = ex.attrs["objects"]
        assert (obj["shape"], obj["color"], obj["size"], ex.attrs["background"]) == ("circle", "red", "large", "white")
        positions.add(obj["position"])
    assert len(positions) >= 6
    with pytest.raises(ValueError, match="overlap"):
        sample_for_prompt("a circle in the center and a square", seed=0, index=0)
    with pytest.raises(ValueError, match="unknown color"):
        sample_for_prompt({"objects": [{"color": "beige"}]}, seed=0, index=0)


def test_dataset_returns_normalised_tensors_and_captions():
    ds = ShapesDataset(seed=2, length=5, resolution=64, split="val")
    x, caption = ds[3]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    ex = sample(2, 3, 64, split="val")
    assert caption == ex.caption
    assert torch.equal(x, torch.from_numpy(ex.image).permute(2, 0, 1).float() / 127.5 - 1)
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(ValueError):
        ShapesDataset(resolution=48)
