"""config.model_type -> leanserve model class (the engine's model runner builds from here).

A class named as "module:Class" is imported when first asked for (as methods.METHODS does):
MoE++'s module imports transformers' model classes, most of a serving process's start-up."""
from __future__ import annotations

import importlib

from torch import nn

from leanserve.errors import UserError
from leanserve.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module] | str] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    # importing it also registers MoEPPConfig with AutoConfig, before the loader reads the config
    "leanserve_moepp": "leanserve.models.moepp:MoEPPForCausalLM",
}


def register_model(model_type: str, model_cls: type[nn.Module] | str) -> None:
    MODEL_REGISTRY[model_type] = model_cls


def get_model_class(model_type: str | None) -> type[nn.Module]:
    if model_type not in MODEL_REGISTRY:
        raise UserError(f"unsupported model_type {model_type!r}; leanserve's engine supports: "
                        f"{', '.join(sorted(MODEL_REGISTRY))}")
    model_cls = MODEL_REGISTRY[model_type]
    if isinstance(model_cls, str):
        module, name = model_cls.split(":")
        model_cls = MODEL_REGISTRY[model_type] = getattr(importlib.import_module(module), name)
    return model_cls
