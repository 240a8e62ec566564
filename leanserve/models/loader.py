"""Build a leanserve model from a Hugging Face directory: config.json + safetensors (single file or
sharded with model.safetensors.index.json). Tensors are read one at a time and copied straight
into parameters allocated in the target dtype/device, so peak host memory is one tensor. Layers
that hold a tensor-parallel shard (models/tensor_parallel.py) read only their rows or columns of
it: the loader hands every layer a lazy safetensors slice, not a tensor."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from leanserve.errors import UserError
from leanserve.models.layers import MergedLinear, RMSNorm
from leanserve.models.methods import get_method
from leanserve.models.model_dir import check_complete, load_model_info
from leanserve.models.registry import get_model_class

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
RANDOM_STD = 0.02  # random_weights: linears and embeddings ~ N(0, RANDOM_STD)


def load_model(model_dir: str, device: torch.device | str, dtype: torch.dtype, *, random_weights: bool = False,
               settings_overrides: dict | None = None):
    """-> (model in eval mode on `device` in `dtype`, transformers config). `random_weights` reads
    only config.json and fills random weights (full-size benchmarks without a checkpoint). The
    `leanserve.json` method's convert step (models/methods.py) is applied last, with its settings
    updated by `settings_overrides` (`leanserve serve --model-setting KEY=VALUE`); a directory
    without one is dense."""
    from transformers import AutoConfig

    path = Path(model_dir)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    check_complete(path)
    # check model_type ourselves first: AutoConfig's error for unknown types does not say what we support
    get_model_class(json.loads(config_file.read_text()).get("model_type"))
    info = load_model_info(path)
    if info is not None and info.kind != "llm":
        raise UserError(f"{model_dir} is an {info.kind} model (leanserve.json kind), not an LLM")
    convert = get_method(info.method if info is not None else "dense")
    hf_config = AutoConfig.from_pretrained(path)
    if random_weights:
        model = build_model(hf_config, device, dtype, random_weights=True)
    else:
        model = build_model(hf_config, device, dtype)
        load_weights(model, iter_safetensors(path), hf_config)
    settings = {**(info.settings if info is not None else {}), **(settings_overrides or {})}
    # the method's step runs on the loaded dense model, so its extra weights may be deltas over it
    model = convert(model, hf_config, settings, model_dir=path, random_weights=random_weights)
    return model, hf_config


def checkpoint_dtype(model_dir: str) -> torch.dtype | None:
    """The dtype config.json says the weights are stored in (`dtype`, or transformers 4's
    `torch_dtype`); None when it names none or no torch dtype, or there is no config.json (which
    load_model reports)."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def build_model(hf_config, device: torch.device | str, dtype: torch.dtype, *,
                random_weights: bool = False, seed: int = 0) -> nn.Module:
    """Allocate the model without running its initialisers (built on meta, then materialised).
    Weights are uninitialised unless `random_weights` (N(0, 0.02) linears/embeddings, unit norms),
    which benchmarks use for full-size shapes without a checkpoint."""
    model_cls = get_model_class(hf_config.model_type)
    with torch.device("meta"):
        model = model_cls(hf_config)
    model = model.to(dtype=dtype).to_empty(device=device).eval().requires_grad_(False)
    if random_weights:
        _init_random(model, seed)
    return model


@torch.no_grad()
def _init_random(model: nn.Module, seed: int, std: float = RANDOM_STD) -> None:
    gen = torch.Generator(device=next(model.parameters()).device)
    for i, module in enumerate(model.modules()):
        # seeded per module: tensor-parallel ranks hold shards of different sizes, and the weights
        # they replicate (norms, MoE++ experts) must still be equal on every rank
        gen.manual_seed(seed * 1_000_003 + i)
        if isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, nn.Linear | nn.Embedding):
            module.weight.normal_(0.0, std, generator=gen)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        else:  # parameters held directly, e.g. MoE expert stacks
            for param in module.parameters(recurse=False):
                param.normal_(0.0, std, generator=gen)


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    raise UserError(f"{model_dir}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} (leanserve loads safetensors only)")


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, object]]:
    """(name, lazy slice) of every checkpoint tensor: `slice[...]` reads only what it indexes,
    `slice.get_shape()` reads nothing. A slice is valid until the next one is yielded."""
    for file in safetensors_files(model_dir):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


@torch.no_grad()
def load_weights(model: nn.Module, weights: Iterator[tuple[str, object]], hf_config) -> None:
    """Copy checkpoint tensors (iter_safetensors' slices) into the model (casting dtype, moving
    device). Separate checkpoint projections go into their shard of the fused module named by
    `model.packed_modules_mapping`; a module with `load_weight(param, slice, shard)` (the
    tensor-parallel layers) reads its part itself. Raises on unexpected, missing or mis-shaped
    tensors rather than serving a half-loaded model."""
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules_mapping", {})
    loaded: set[tuple[str, int | None]] = set()
    for name, tensor in weights:
        if name.endswith("rotary_emb.inv_freq"):
            continue  # older checkpoints persist the rope table; it is recomputed from the config
        if name == "lm_head.weight" and getattr(hf_config, "tie_word_embeddings", False):
            continue  # tied: the embedding is the head
        target, shard = packed_target(name, packed)
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in {type(model).__name__}")
        param = params[target]
        module = model.get_submodule(target.rsplit(".", 1)[0]) if "." in target else model
        try:
            if hasattr(module, "load_weight"):
                module.load_weight(param, tensor, shard)
            elif shard is not None:
                module.load_shard(param, tensor[:], shard)
            elif tuple(param.shape) != tuple(tensor.get_shape()):
                raise ValueError(f"checkpoint shape {tuple(tensor.get_shape())} != model shape {tuple(param.shape)}")
            else:
                param.copy_(tensor[:])
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        loaded.add((target, shard))
    missing = [f"{n}[shard {s}]" if s is not None else n
               for n, s in _expected_tensors(model) if (n, s) not in loaded]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")


def packed_target(name: str, packed: dict[str, tuple[str, int]]) -> tuple[str, int | None]:
    """Checkpoint name -> (the parameter it loads into, its shard of a fused module or None)."""
    for ckpt_name, (fused_name, shard) in packed.items():
        if f".{ckpt_name}." in name:
            return name.replace(f".{ckpt_name}.", f".{fused_name}."), shard
    return name, None


def _expected_tensors(model: nn.Module) -> Iterator[tuple[str, int | None]]:
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, MergedLinear):
                yield from ((full, i) for i in range(len(module.output_sizes)))
            else:
                yield full, None
