"""MoA model directories over the tiny Llama (a plan written directly, no profiling) and the explicit
reference the served model must match: the dense model re-run over the whole sequence for every
token, each KV head's attention masked with span_mask for the request's planned length."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from leanserve.models.model_dir import ModelInfo, save_model_info
from leanserve.models.moa_plan import PLAN_FILE, MoAPlan, save_plan, sink_and_ring, span_mask


def tiny_plan(alphas: list[list[float]], betas: list[list[float]], block_size: int = 16) -> MoAPlan:
    """A plan for the tiny Llama (2 layers, 4 query heads, 2 KV heads, head_dim 16)."""
    return MoAPlan(model={"name": "tiny", "num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16},
                   alphas=alphas, betas=betas, profile_lengths=[64, 128, 256], extend_length=512,
                   validation_length=384, density_target=0.5, block_size=block_size, rule_cap_per_layer=None)


def build_moa_dir(base_dir: Path, out_dir: Path, plan: MoAPlan) -> Path:
    shutil.copytree(base_dir, out_dir)
    save_plan(out_dir / PLAN_FILE, plan)
    save_model_info(out_dir, ModelInfo(kind="llm", method="moa", settings={"plan": PLAN_FILE}))
    return out_dir


class _MaskedAttention(nn.Module):
    """Whole-sequence attention of one layer, KV head u masked by masks[u] ([n, n] bool)."""

    def __init__(self, masks: torch.Tensor, group: int, scale: float):
        super().__init__()
        self.masks, self.group, self.scale = masks, group, scale

    def forward(self, q, k, v, kv_cache, meta):
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, n, D]
        mask = self.masks.repeat_interleave(self.group, 0)[None]  # query head h uses KV head h // G
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(self.group, 1), v.repeat_interleave(self.group, 1),
                                           attn_mask=mask, scale=self.scale)
        return o[0].transpose(0, 1).flatten(1)


@torch.inference_mode()
def masked_dense_greedy(dense: nn.Module, plan: MoAPlan, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of the dense model (leanserve's LlamaForCausalLM, fp32) with every KV head's
    span applied as an explicit mask, recomputing the whole sequence per token."""
    planned = len(prompt) + max_tokens
    attns = [layer.self_attn.attn for layer in dense.model.layers]
    tokens = list(prompt)
    try:
        for _ in range(max_tokens):
            n = len(tokens)
            for layer, attn, slots in zip(dense.model.layers, attns, plan.slots(planned)):
                masks = torch.stack([span_mask(n, *sink_and_ring(c, plan.block_size)) for c in slots])
                layer.self_attn.attn = _MaskedAttention(masks, attn.num_heads // attn.num_kv_heads, attn.scale)
            hidden = dense(torch.tensor(tokens), torch.arange(n), [None] * len(attns), None)
            tokens.append(int(dense.compute_logits(hidden[-1:]).argmax(-1)))
    finally:
        for layer, attn in zip(dense.model.layers, attns):
            layer.self_attn.attn = attn
    return tokens[len(prompt):]
