"""A model directory as the members `eval lm` scores: one member for an ordinary LM, the first K of
S for an ensemble directory (models/ensemble_dir.py).

The base model is loaded once; a member is the base with its stored parameters substituted by name
(torch.func.functional_call, untied: a member's `lm_head.weight` replaces the head and not the tied
input embedding), so K members cost one model plus K x their stored parameters, and nothing is copied
per batch. The ensemble predicts by probability averaging (eval/calibration.py's mixture), also
when it decodes greedily.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.func import functional_call
from transformers import AutoModelForCausalLM

from leanserve.data.tokenizer import stop_token_ids
from leanserve.errors import UserError
from leanserve.eval.calibration import mixture_logprobs
from leanserve.models.ensemble_dir import METHOD, read_members
from leanserve.models.hf_causal_lm import padding_safe
from leanserve.models.model_dir import load_model_info


@dataclass
class Members:
    model: torch.nn.Module
    params: list[dict[str, torch.Tensor]] = field(default_factory=lambda: [{}])  # [{}]: the base model alone
    ensemble: bool = False

    def __len__(self) -> int:
        return len(self.params)

    def logits(self, s: int, **inputs) -> torch.Tensor:
        return functional_call(self.model, self.params[s], args=(), kwargs=inputs, tie_weights=False,
                               strict=False).logits

    def each_logits(self, **inputs):
        """Every member's logits for the same inputs, one at a time (for EnsembleMetrics.update)."""
        return (self.logits(s, **inputs) for s in range(len(self)))


def load_members(model_dir: str | Path, device: torch.device, dtype: torch.dtype,
                 num_members: int | None = None) -> Members:
    """The model of `model_dir` and, for an ensemble directory, its first `num_members` members (all by default)."""
    info = load_model_info(model_dir)
    ensemble = info is not None and info.method == METHOD
    if num_members is not None and not ensemble:
        raise UserError(f"--members: {model_dir} is not an ensemble directory (leanserve.json method "
                        f"{info.method if info else 'missing'!r})")
    if ensemble and num_members is not None and not 1 <= num_members <= info.settings.get("num_members", 0):
        raise UserError(f"--members must be between 1 and the directory's {info.settings.get('num_members')} "
                        f"members, got {num_members}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    if not ensemble:
        return Members(model)
    params = read_members(model_dir, info.settings, device=device, dtype=dtype)
    return Members(model, params[:num_members], ensemble=True)


def mixture_greedy_answers(members: Members, tokenizer, encoded: list[list[int]], *, batch_size: int,
                           max_new_tokens: int, device) -> list[str]:
    """Greedy replies decoded from the members' mixture p̄ (the `token_mean` serving mode), batched by
    length with left padding. No KV cache: every step reruns each member on the whole prefix, which is
    affordable for the evaluation's small models and short answers."""
    stops = torch.tensor(stop_token_ids(tokenizer), device=device)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    replies = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(idx), width), dtype=torch.long, device=device)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        with torch.no_grad(), padding_safe(members.model):
            for _ in range(max_new_tokens):
                positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
                last = torch.stack([lg[:, -1].float().log_softmax(-1) for lg in
                                    members.each_logits(input_ids=ids, attention_mask=mask, position_ids=positions)])
                token = mixture_logprobs(last).argmax(-1)
                token = torch.where(done, tokenizer.pad_token_id, token)  # finished rows only pad
                ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, (~done).long()[:, None]], 1)
                done |= torch.isin(token, stops)
                if done.all():
                    break
        for row, i in enumerate(idx):
            replies[i] = tokenizer.decode(ids[row, width:], skip_special_tokens=True)
    return replies
