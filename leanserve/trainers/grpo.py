"""GRPO's pieces (group relative policy optimisation), for `train rlvr`: group sampling, group-normalised
advantages, per-token log-probs of the sampled completions and the clipped surrogate with a k3 KL penalty.

Per prompt, G completions a_1..a_G; rewards r_g; Â_g = (r_g − mean r) / (std r + 1e-6), shared by every token
of a_g (std with Bessel's correction, as TRL computes it). The loss, minimised, is minus
(1/G) Σ_g (1/|a_g|) Σ_t [min(ρ·Â_g, clip(ρ, 1−ε, 1+ε)·Â_g) − β·k3], averaged over the prompts, where
ρ = π_θ/π_old per token and k3 = π_ref/π_θ − log(π_ref/π_θ) − 1 (an unbiased, non-negative KL estimate).

Sampling is transformers' `generate` on the policy itself (KV cache, left-padded prompts, pure sampling at
a temperature: no top-k/top-p, so that π_old is the distribution the tokens came from); on the tiny models
RLVR trains here this is fast enough and needs no second engine. A completion runs to its first stop token
(end of turn or text), which counts as one of its tokens (the policy learns when to stop), or to
max_new_tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [N, W + T]: left-padded prompt, then the completion (padded after its stop)
    attention_mask: torch.Tensor  # [N, W + T]: prompt tokens and completion tokens up to its stop
    prompt_width: int  # W
    completion_mask: torch.Tensor  # [N, T] float: the completion's own tokens (the stop token included)

    @property
    def position_ids(self) -> torch.Tensor:
        # as generate numbers left-padded rows: from the first real token
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width:]


def left_pad(encoded: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, width - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[row, width - len(e):] = 1
    return ids, mask


@torch.no_grad()
def sample(model, encoded: list[list[int]], *, max_new_tokens: int, temperature: float, stop_ids: list[int],
           pad_id: int, device) -> Rollout:
    """One completion per prompt in `encoded` (repeat a prompt G times for a group), drawn from torch's
    global RNG (checkpointed, so a resumed run draws the same tokens)."""
    ids, mask = left_pad(encoded, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                         temperature=temperature, top_k=0, top_p=1.0, eos_token_id=stop_ids, pad_token_id=pad_id)
    width = ids.shape[1]
    own = completion_mask(out[:, width:], stop_ids)
    return Rollout(out, torch.cat([mask, own.long()], 1), width, own)


def completion_mask(completion: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """[N, T] float: 1 on each row's tokens up to and including its first stop token (no stop before them)."""
    is_stop = torch.isin(completion, torch.tensor(stop_ids, device=completion.device)).long()
    return (is_stop.cumsum(-1) - is_stop == 0).to(torch.float32)


def token_logprobs(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """[N, T] log-probs of the completion tokens under `model` (at the sampling temperature)."""
    logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                   position_ids=rollout.position_ids).logits
    logits = logits[:, rollout.prompt_width - 1:-1].float() / temperature
    return torch.gather(logits.log_softmax(-1), 2, rollout.completion_ids()[..., None]).squeeze(-1)


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[P, G] rewards -> [P, G] advantages; a group whose rewards are all equal gets zeros (no signal)."""
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + 1e-6)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, clip_eps: float, beta: float) -> tuple[torch.Tensor, dict]:
    """The GRPO loss over N = P·G completions ([N, T] token tensors, [N] advantages) and its parts:
    the mean per-completion KL (k3) and the share of tokens whose ratio was clipped."""
    # the log-ratios are zeroed off the completions before exp: after a stop token the policy and the
    # reference can disagree by > 88 nats on the padding, and exp overflows to inf, which the mask (inf * 0)
    # would turn into a NaN loss
    own = mask > 0
    ratio = torch.exp(torch.where(own, logp - old_logp, 0.0))
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    log_ref_ratio = torch.where(own, ref_logp - logp, 0.0)
    k3 = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    lengths = mask.sum(1).clamp(min=1)

    def per_completion(x):  # (1/|a|) Σ_t over each completion's own tokens
        return (x * mask).sum(1) / lengths

    loss = -(per_completion(surrogate) - beta * per_completion(k3)).mean()
    clipped = ((ratio - ratio.clamp(1 - clip_eps, 1 + clip_eps)).abs() > 0).float()
    return loss, {"kl": per_completion(k3).mean().item(), "clipped": ((clipped * mask).sum() / mask.sum()).item()}
