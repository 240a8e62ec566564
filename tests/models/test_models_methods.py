"""The loader's method hook: leanserve.json `method` -> a registered convert step on the loaded model."""
from __future__ import annotations

import shutil

import pytest
import torch

from leanserve.errors import UserError
from leanserve.models.loader import load_model
from leanserve.models.methods import METHODS, register_method
from leanserve.models.model_dir import ModelInfo, save_model_info


@pytest.fixture
def llm_copy(tiny_llm_dir, tmp_path):
    return shutil.copytree(tiny_llm_dir, tmp_path / "model")


@pytest.fixture
def scaled_method():
    """A test method that scales the LM head by settings["scale"] and records what it was given."""
    calls = []

    def convert(model, hf_config, settings, *, model_dir, random_weights):
        calls.append((hf_config.model_type, dict(settings), model_dir, random_weights))
        model.lm_head.weight.mul_(settings["scale"])
        return model

    register_method("test-scaled", convert)
    yield calls
    del METHODS["test-scaled"]


def test_plain_directory_and_dense_method_load_unchanged(llm_copy):
    plain, _ = load_model(llm_copy, "cpu", torch.float32)
    save_model_info(llm_copy, ModelInfo(kind="llm", method="dense"))
    dense, _ = load_model(llm_copy, "cpu", torch.float32)
    for (name, a), (_, b) in zip(plain.state_dict().items(), dense.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_registered_method_converts_the_loaded_model(llm_copy, scaled_method):
    plain, _ = load_model(llm_copy, "cpu", torch.float32)
    save_model_info(llm_copy, ModelInfo(kind="llm", method="test-scaled", settings={"scale": 2.0}))
    model, _ = load_model(llm_copy, "cpu", torch.float32)
    assert scaled_method == [("llama", {"scale": 2.0}, llm_copy, False)]
    # the step ran after the weights were loaded: the head is exactly twice the checkpoint's
    assert torch.equal(model.lm_head.weight, 2.0 * plain.lm_head.weight)


def test_method_applies_to_random_weights_too(llm_copy, scaled_method):
    save_model_info(llm_copy, ModelInfo(kind="llm", method="test-scaled", settings={"scale": 0.5}))
    load_model(llm_copy, "cpu", torch.float32, random_weights=True)
    assert scaled_method == [("llama", {"scale": 0.5}, llm_copy, True)]  # told so: its own weights random too


def test_settings_overrides_update_leanserve_json_settings(llm_copy, scaled_method):
    save_model_info(llm_copy, ModelInfo(kind="llm", method="test-scaled", settings={"scale": 2.0, "keep": 1}))
    load_model(llm_copy, "cpu", torch.float32, settings_overrides={"scale": 3.0, "extra": [1]})
    assert scaled_method[0][1] == {"scale": 3.0, "keep": 1, "extra": [1]}


def test_unknown_method_and_image_kind_are_clear_errors(llm_copy):
    save_model_info(llm_copy, ModelInfo(kind="llm", method="no-such-method"))
    with pytest.raises(UserError, match="no-such-method.*known: .*dense"):
        load_model(llm_copy, "cpu", torch.float32)
    save_model_info(llm_copy, ModelInfo(kind="image", method="sid"))
    with pytest.raises(UserError, match="image model"):
        load_model(llm_copy, "cpu", torch.float32)


def test_lazy_method_reference_is_imported_on_first_use(llm_copy):
    register_method("test-lazy", "leanserve.models.methods:dense")
    try:
        save_model_info(llm_copy, ModelInfo(kind="llm", method="test-lazy"))
        load_model(llm_copy, "cpu", torch.float32)
        assert callable(METHODS["test-lazy"])
    finally:
        del METHODS["test-lazy"]
