"""config.model_type -> leanserve model class (the engine's model runner builds from here)."""
from __future__ import annotations

from torch import nn

from leanserve.errors import UserError
from leanserve.models.llama import LlamaForCausalLM
from leanserve.models.moepp import MoEPPForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "leanserve_moepp": MoEPPForCausalLM,
}


def register_model(model_type: str, model_cls: type[nn.Module]) -> None:
    MODEL_REGISTRY[model_type] = model_cls


def get_model_class(model_type: str | None) -> type[nn.Module]:
    if model_type not in MODEL_REGISTRY:
        raise UserError(f"unsupported model_type {model_type!r}; leanserve's engine supports: "
                        f"{', '.join(sorted(MODEL_REGISTRY))}")
    return MODEL_REGISTRY[model_type]
