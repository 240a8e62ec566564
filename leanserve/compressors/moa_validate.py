"""MoA plan selection: response-masked cross-entropy of held-out items at an unseen length, with
every unit's attention limited to its plan's sink + ring (models/moa_plan.py's token-exact mask for
the item's length), averaged per task kind and then over kinds; the plan with the lowest wins.

This is a PyTorch reference of the served attention (SDPA with an explicit mask, one call per
distinct cache size in a layer), run through transformers' attention interface, so the validation
needs no serving kernels; it costs one [N, N] mask per call.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from leanserve.compressors.moa_calibration import Item
from leanserve.compressors.moa_profile import attention_modules
from leanserve.models.moa_plan import kv_slots, sink_and_ring, span_mask

ATTENTION = "leanserve_moa_spans"
Rules = list[list[tuple[float, float]]]  # [layer][kv unit] -> (alpha, beta)


def _span_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """query [1, Hq, N, D], key/value [1, Hkv, N, D]; module.moa_rules: this layer's (alpha, beta) per
    KV head, or None for dense attention."""
    rules = getattr(module, "moa_rules", None)
    if rules is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    n, group = query.shape[2], query.shape[1] // key.shape[1]
    slots = [kv_slots(a, b, n, module.moa_block_size) for a, b in rules]
    out = torch.empty_like(query)
    for size in sorted(set(slots)):
        units = [u for u, s in enumerate(slots) if s == size]
        heads = [u * group + g for u in units for g in range(group)]
        mask = span_mask(n, *sink_and_ring(size, module.moa_block_size), device=query.device)
        out[:, heads] = F.scaled_dot_product_attention(query[:, heads], key[:, units], value[:, units],
                                                       attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _span_attention)


@contextmanager
def spans(model, rules: Rules | None, block_size: int):
    """Run the model with every KV head limited to its rule's span (None: dense)."""
    attns = attention_modules(model)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    for layer, attn in enumerate(attns):
        attn.moa_rules = None if rules is None else rules[layer]
        attn.moa_block_size = block_size
    try:
        yield model
    finally:
        for attn in attns:
            del attn.moa_rules, attn.moa_block_size
        model.set_attn_implementation(previous)


@torch.no_grad()
def response_ce(model, items: list[Item]) -> dict[str, float]:
    """Mean response-token cross-entropy per task kind."""
    device = model.get_input_embeddings().weight.device
    per_kind: dict[str, list[float]] = {}
    for item in items:
        ids = torch.tensor(item.ids, device=device)[None]
        targets = ids[0, item.response_start:]
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(targets) + 1).logits
        per_kind.setdefault(item.kind, []).append(F.cross_entropy(logits[0, :-1].float(), targets).item())
    return {kind: sum(v) / len(v) for kind, v in sorted(per_kind.items())}


def validation_ce(model, items: list[Item], rules: Rules | None, block_size: int) -> tuple[float, dict[str, float]]:
    """(mean over kinds of the kinds' mean CE, the per-kind means) with `rules` (None: dense)."""
    was_training = model.training
    model.eval()
    try:
        with spans(model, rules, block_size):
            per_kind = response_ce(model, items)
    finally:
        model.train(was_training)
    return sum(per_kind.values()) / len(per_kind), per_kind
