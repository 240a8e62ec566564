"""A model directory that a save or a copy cut short (truncated weights, missing or unparsable
config) is refused by the loaders and by `leanserve serve` with one line naming the file, exit 2."""
from __future__ import annotations

import shutil

import pytest
import torch

from leanserve.cli import main
from leanserve.errors import UserError


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
# fault -> (what it does to the directory, the file the error names, what it says)
LLM_FAULTS = {
    "truncated weights": (lambda d: cut_in_half(d / "model.safetensors"), "model.safetensors", "incomplete or corrupt"),
    "invalid config.json": (lambda d: cut_in_half(d / "config.json"), "config.json", "is not valid JSON"),
    "no config.json": (lambda d: (d / "config.json").unlink(), "", "no config.json"),
}
IMAGE_FAULTS = {
    "truncated weights": (lambda d: cut_in_half(d / UNET_WEIGHTS), UNET_WEIGHTS, "incomplete or corrupt"),
    "invalid component config": (lambda d: cut_in_half(d / "unet" / "config.json"), "unet/config.json",
                                 "is not valid JSON"),
    "missing component": (lambda d: shutil.rmtree(d / "unet"), "unet", "has no config file"),
    "invalid leanserve.json": (lambda d: (d / "leanserve.json").write_text('{"kind": "ima'), "leanserve.json",
                               "is not valid JSON"),
}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from conftest import build_tiny_teacher
    return build_tiny_teacher(tmp_path_factory.mktemp("teacher"))


def broken_copy(model_dir, fault, tmp_path):
    damage, _, _ = fault
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    damage(copy)
    return copy


@pytest.mark.parametrize("fault", list(LLM_FAULTS))
def test_llm_loader_names_the_broken_file(fault, tiny_llm_dir, tmp_path):
    from leanserve.models.loader import load_model

    model_dir = broken_copy(tiny_llm_dir, LLM_FAULTS[fault], tmp_path)
    _, file, message = LLM_FAULTS[fault]
    with pytest.raises(UserError, match=message) as e:
        load_model(str(model_dir), "cpu", torch.float32)
    assert f"{model_dir / file}" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("fault", list(IMAGE_FAULTS))
def test_image_loader_names_the_broken_file(fault, teacher_dir, tmp_path):
    from leanserve.models.image_pipeline import load_image_pipeline

    model_dir = broken_copy(teacher_dir, IMAGE_FAULTS[fault], tmp_path)
    _, file, message = IMAGE_FAULTS[fault]
    with pytest.raises(UserError, match=message) as e:
        load_image_pipeline(model_dir)
    assert f"{model_dir / file}" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind, fault", [*(("llm", fault) for fault in LLM_FAULTS),
                                         *(("image", fault) for fault in IMAGE_FAULTS)])
def test_serve_refuses_a_half_written_model_in_one_line(kind, fault, tiny_llm_dir, teacher_dir, tmp_path, capsys):
    source, faults = (tiny_llm_dir, LLM_FAULTS) if kind == "llm" else (teacher_dir, IMAGE_FAULTS)
    model_dir = broken_copy(source, faults[fault], tmp_path)
    capsys.readouterr()
    assert main(["serve", "--model", str(model_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err  # libraries' import warnings may come first: the error is the last line
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"leanserve serve: error: {model_dir}"), last
