"""What an LLM artifact's `leanserve.json` `method` does to the model at load time.

A method that makes a model lean (a MoA attention plan, MoE++ layers, ensemble members) ships a
plain transformers directory plus its settings in `leanserve.json`. The loader builds the dense
model from the directory's weights, then applies the method's convert step (gpt-fast's
`convert_for_runtime`): `convert(model, hf_config, settings, model_dir=..., random_weights=...) -> model`,
free to swap modules, attach extra weights read from the directory (safetensors only) or change the
KV-cache spec the model reports. `settings` are leanserve.json's, updated by the serve-time
overrides (`--model-setting`); `random_weights` (`--load-format dummy`) asks for random extra weights
too, so full-size benchmarks need no weight files. The engine never branches on a method name: it
serves whatever comes back.

Built-in methods are named here as "module:function" and imported on first use, so a CPU install
never imports a method it does not serve; `register_method` adds one at run time (plugins, tests).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from torch import nn

from leanserve.errors import UserError

Convert = Callable[..., nn.Module]  # (model, hf_config, settings: dict, *, model_dir: Path, random_weights: bool)


def dense(model: nn.Module, hf_config, settings: dict, *, model_dir: Path, random_weights: bool = False) -> nn.Module:
    """A dense model serves as loaded."""
    return model


# method name -> convert function, or "module:function" imported on first use
METHODS: dict[str, Convert | str] = {"dense": dense, "ensemble": "leanserve.models.ensemble:convert",
                                     "moa": "leanserve.models.moa:convert"}


def register_method(name: str, convert: Convert | str) -> None:
    METHODS[name] = convert


def get_method(name: str) -> Convert:
    if name not in METHODS:
        raise UserError(f"leanserve.json names method {name!r}, which leanserve cannot serve for LLMs; "
                        f"known: {', '.join(sorted(METHODS))}")
    convert = METHODS[name]
    if isinstance(convert, str):
        module, function = convert.split(":")
        convert = METHODS[name] = getattr(importlib.import_module(module), function)
    return convert
