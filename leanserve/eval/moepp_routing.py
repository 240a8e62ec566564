"""How a MoE / MoE++ model routes held-out tokens, against what its load-balance loss aims at.

Per layer: f_i (the fraction of tokens that select expert i; sum_i f_i = top_k), the FFN experts per
token (sum of f_i over FFN experts), the FFN share of routed slots (that over top_k) next to the
theory tau * n_ffn / (tau * n_ffn + n_zc), the slot share of each expert kind (FFN, constant, copy,
zero) and the spread of the router logits (their std over experts, averaged over tokens). The FFN
share is what MoE++ saves: FFN FLOPs per token scale with it (plain MoE: 1).

`train lm --arch moe|moepp` records these at every validation, `eval lm` on the test split.
"""
from __future__ import annotations

import torch

from leanserve.models.moepp_hf import MoEPPConfig
from leanserve.runtime import DistInfo, all_reduce_sum


def expert_kinds(config: MoEPPConfig) -> dict[str, slice]:
    """Expert index ranges of each kind, in the layout's order."""
    layout = config.layout
    return {"ffn": slice(0, layout.n_ffn), "const": slice(layout.n_ffn, layout.first_copy),
            "copy": slice(layout.first_copy, layout.first_zero), "zero": slice(layout.first_zero, layout.n_experts)}


def routing_stats(model, batches: dict[str, list[dict]], device, autocast, dist_info: DistInfo) -> dict:
    """Routing of every non-padding token of the batches (all domains together); under DDP each rank
    routes its own share and the sums are reduced."""
    config: MoEPPConfig = getattr(model, "module", model).config
    layers, n = config.num_hidden_layers, config.layout.n_experts
    load = torch.zeros(layers, n, dtype=torch.float64)  # sum over tokens of the selections
    logit_std = torch.zeros(layers, dtype=torch.float64)
    tokens = 0
    was_training = model.training
    model.eval()
    for batch in (b for domain_batches in batches.values() for b in domain_batches):
        input_ids = batch["input_ids"].to(device)
        pad = config.pad_token_id
        mask = input_ids != pad if pad is not None else torch.ones_like(input_ids, dtype=torch.bool)
        with torch.no_grad(), autocast():
            out = model(input_ids=input_ids, attention_mask=mask.long())
        count = int(mask.sum())
        load += out.expert_load.double().cpu() * count
        flat = mask.reshape(-1)
        logit_std += torch.stack([logits[flat].std(dim=-1).sum() for logits in out.router_logits]).double().cpu()
        tokens += count
    model.train(was_training)
    sums = all_reduce_sum([*load.flatten().tolist(), *logit_std.tolist(), float(tokens)], dist_info, device)
    tokens = sums[-1]
    load = torch.tensor(sums[:layers * n], dtype=torch.float64).view(layers, n) / tokens
    logit_std = torch.tensor(sums[layers * n:-1], dtype=torch.float64) / tokens

    top_k = config.num_experts_per_tok
    ffn_per_token = load[:, expert_kinds(config)["ffn"]].sum(dim=1)
    return {
        "tokens": int(tokens),
        "ffn_share": ffn_per_token.mean().item() / top_k,
        "ffn_share_theory": config.ffn_share_theory,
        "ffn_experts_per_token": ffn_per_token.mean().item(),
        "ffn_experts_per_token_theory": top_k * config.ffn_share_theory,
        "ffn_share_per_layer": (ffn_per_token / top_k).tolist(),
        "ffn_experts_per_token_per_layer": ffn_per_token.tolist(),
        "slot_share": {kind: load[:, s].sum(dim=1).mean().item() / top_k for kind, s in expert_kinds(config).items()},
        "router_logit_std_per_layer": logit_std.tolist(),
        "expert_load_per_layer": load.tolist(),
    }


def summary(stats: dict) -> str:
    """One log line."""
    return (f"FFN share {stats['ffn_share']:.3f} (theory {stats['ffn_share_theory']:.3f}), "
            f"FFN experts/token {stats['ffn_experts_per_token']:.2f}, router logit std "
            f"{sum(stats['router_logit_std_per_layer']) / len(stats['router_logit_std_per_layer']):.2f}")
