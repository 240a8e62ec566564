"""Serve a MoA model directory (`leanserve compress moa` output: the dense weights + moa_plan.json):
the "moa" method's convert step (models/methods.py).

The loaded Llama-family model keeps its weights and layers; each layer's attention kernel becomes
MoAAttention (models/attention/moa.py), and the model reports MoAKVSpec, so the engine allocates,
admits and frees sink + ring pages per KV head instead of dense blocks. Serving units are KV
heads; a plan of query-head units serves only where they coincide (MHA).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from leanserve.errors import UserError
from leanserve.models.attention.kv_spec import KVCache
from leanserve.models.attention.metadata import AttentionMetadata
from leanserve.models.attention.moa import MoAAttention, MoAKVSpec, MoALayerCache, MoAStep
from leanserve.models.moa_plan import PLAN_FILE, MoAPlan, kv_slots, load_plan
from leanserve.models.tensor_parallel import tp


class MoAModel(nn.Module):
    """A Llama-family engine model whose attention follows a MoA plan; forward, compute_logits and
    kv_cache_spec as the engine expects of any model."""

    def __init__(self, base: nn.Module, plan: MoAPlan, max_len: int):
        super().__init__()
        self.base = base
        self.config = base.config
        self.num_layers, self.num_kv_heads, self.head_dim = base.num_layers, base.num_kv_heads, base.head_dim
        self.vocab_size = base.vocab_size
        self.plan_block_size = plan.block_size
        device = base.lm_head.weight.device
        # float64: the device computes each unit's capacity with the host's arithmetic (kv_slots_tensor)
        self.register_buffer("alphas", torch.tensor(plan.alphas, dtype=torch.float64, device=device), persistent=False)
        self.register_buffer("betas", torch.tensor(plan.betas, dtype=torch.float64, device=device), persistent=False)
        for layer, (alphas, betas) in zip(base.model.layers, zip(plan.alphas, plan.betas), strict=True):
            attn = layer.self_attn.attn
            if attn.sliding_window is not None:
                raise UserError("a MoA plan replaces every layer's attention span; this model also has a "
                                "sliding window, which MoA serving does not combine with it")
            widest = max(kv_slots(a, b, max_len, plan.block_size) for a, b in zip(alphas, betas))
            layer.self_attn.attn = MoAAttention(attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale, widest)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                attn_meta: AttentionMetadata) -> torch.Tensor:
        """The step's cache layout once for all layers, then the base model's forward over it."""
        k_pool = kv_caches[0][0]
        step = MoAStep.compute(attn_meta, self.alphas, self.betas, self.plan_block_size, k_pool.shape[1])
        caches = [MoALayerCache(k, v, step, i) for i, (k, v) in enumerate(kv_caches)]
        return self.base(input_ids, positions, caches, attn_meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base.compute_logits(hidden)

    def kv_cache_spec(self, block_size: int, dtype: torch.dtype) -> MoAKVSpec:
        return MoAKVSpec(self.num_layers, self.num_kv_heads, self.head_dim, block_size, dtype, self.alphas.cpu(),
                         self.betas.cpu(), self.plan_block_size)


def convert(model: nn.Module, hf_config, settings: dict, *, model_dir: Path, random_weights: bool = False
            ) -> MoAModel:
    """The loaded dense model + DIR/<settings["plan"]> -> MoAModel. A plan needs no weights, so
    random_weights changes nothing here."""
    if tp().size > 1:  # each rank would need the spans of its own KV heads: not written yet
        raise UserError("MoA models cannot be served with --tensor-parallel-size > 1 yet")
    plan = load_plan(Path(model_dir) / settings.get("plan", PLAN_FILE), hf_config)
    if plan.unit != "kv_head" and plan.model["num_q_heads"] != plan.model["num_kv_heads"]:
        raise UserError(f"{model_dir}: the plan's units are query heads of a GQA model; serving keeps one span "
                        f"per KV head (plans from `leanserve compress moa` are)")
    return MoAModel(model, plan, hf_config.max_position_embeddings).eval()
