"""MoA influence profiling: for every calibration item, how much loss each attention head would lose
per query-key distance bucket if those entries were masked (kernels/moa_influence.py).

The model is a transformers causal LM whose attention runs through a registered attention function:
SDPA forward, and an identity autograd node on its output whose backward receives dO and, with the
saved post-RoPE q, k, v and O, computes the layer's influence there (no per-layer dO is kept). The
weights are frozen (only activation gradients flow: the input embeddings are the one leaf that
requires grad) and gradient checkpointing recomputes each layer in backward. Loss: mean
cross-entropy on the response tokens only.

Each item's result, hist [layer, q_head, e] summed over query blocks (moa_rules.py reads it), is one
safetensors file written atomically, so an interrupted run resumes at the first missing item.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AttentionInterface

from leanserve.atomic import atomic_write
from leanserve.compressors.moa_calibration import Item
from leanserve.kernels.moa_influence import block_influence

ATTENTION = "leanserve_moa_profile"


class _Tap(torch.autograd.Function):
    """Identity on the attention output; its backward records the layer's influence."""

    @staticmethod
    def forward(ctx, out, q, k, v, recorder, layer):
        ctx.save_for_backward(q, k, v, out)
        ctx.recorder, ctx.layer = recorder, layer
        return out.view_as(out)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out = ctx.saved_tensors
        ctx.recorder.record(ctx.layer, q[0], k[0], v[0], out[0], d_out[0])
        return d_out, None, None, None, None, None


def _profile_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """query [1, Hq, N, D], key/value [1, Hkv, N, D]: one unpadded sequence, causal."""
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    recorder = getattr(module, "moa_recorder", None)
    if recorder is not None:
        out = _Tap.apply(out, query, key, value, recorder, module.layer_idx)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _profile_attention)


class InfluenceRecorder:
    def __init__(self, num_layers: int, block_size: int, sm_scale: float):
        self.block_size, self.sm_scale = block_size, sm_scale
        self.hist: list[torch.Tensor | None] = [None] * num_layers

    def record(self, layer: int, q, k, v, o, do) -> None:
        blocks = block_influence(q.detach(), k.detach(), v.detach(), o.detach(), do.detach(),
                                 self.sm_scale, self.block_size)
        self.hist[layer] = blocks.sum(dim=1).cpu()  # over query blocks -> [Hq, nb]


def attention_modules(model) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


def prepare_for_profiling(model) -> None:
    """Frozen weights, the profiling attention, gradient checkpointing (train mode is what turns it
    on in transformers; Llama-family attention has no dropout at the default attention_dropout 0)."""
    model.requires_grad_(False)
    model.set_attn_implementation(ATTENTION)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()


def profile_item(model, item: Item, block_size: int) -> np.ndarray:
    """hist [layer, q_head, nb] (float64) of one item: summed |E| per distance bucket past the sink."""
    attns = attention_modules(model)
    recorder = InfluenceRecorder(len(attns), block_size, attns[0].scaling)
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor(item.ids, device=device)[None]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    targets = ids[0, item.response_start:]
    for attn in attns:
        attn.moa_recorder = recorder
    try:
        logits = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=len(targets) + 1).logits
        F.cross_entropy(logits[0, :-1].float(), targets).backward()
    finally:
        for attn in attns:
            del attn.moa_recorder
    if any(h is None for h in recorder.hist):
        raise RuntimeError("a layer recorded no influence: the model does not run attention through "
                           "transformers' attention interface")
    return torch.stack(recorder.hist).double().numpy()


def item_file(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.safetensors"


def save_hist(path: Path, hist: np.ndarray, n: int) -> None:
    with atomic_write(path) as tmp:
        save_file({"hist": torch.from_numpy(hist)}, str(tmp), metadata={"n": str(n)})


def load_hist(path: Path) -> tuple[np.ndarray, int]:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("hist").numpy(), int(f.metadata()["n"])


def profile_items(model, items: list[Item], folder: Path, block_size: int,
                  on_item: Callable[[bool], None] = lambda resumed: None) -> list[tuple[np.ndarray, int]]:
    """(hist, n tokens) of every item, profiling those without a file in `folder` yet; `on_item(resumed)`
    after each (resumed: read back from an earlier run)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for index, item in enumerate(items):
        path = item_file(folder, index)
        resumed = path.is_file()
        if not resumed:
            save_hist(path, profile_item(model, item, block_size), len(item.ids))
        out.append(load_hist(path))
        on_item(resumed)
    return out
