"""The optimizer and LR schedule `train lm` and `train diffusion` share."""
from __future__ import annotations

import math

import torch


def make_optimizer(model, lr: float, weight_decay: float):
    """AdamW (0.9, 0.95) over the trainable parameters, weight decay on matrices only."""
    # no decay on norms (1-D); the tied embedding matrix is decayed like any weight matrix
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def warmup_cosine(step: int, steps: int, warmup: float, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warm-up over `warmup` of the steps, then cosine down to `min_ratio`."""
    warm = int(warmup * steps)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
