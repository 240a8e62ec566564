"""Mean next-token loss of a causal LM over labelled batches: `train lm`'s validation losses and
`eval lm`'s test losses, computed alike (batches as leanserve.data.lm_data.batched makes them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from leanserve.data.lm_data import IGNORE
from leanserve.runtime import DistInfo, all_reduce_sum


def next_token_targets(labels: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] labels -> the [B, T − 1] mask of positions that predict a labelled next token, and those n tokens."""
    labels = labels[:, 1:].to(device)
    keep = labels != IGNORE
    return keep, labels[keep]


def labelled(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, V] logits and [B, T] labels -> the [n, V] logits that predict a labelled next token, and those tokens."""
    keep, targets = next_token_targets(labels, logits.device)
    return logits[:, :-1][keep], targets


def token_loss_sum(model, batch: dict, device, autocast) -> tuple[float, int]:
    """Summed next-token cross-entropy over the labelled tokens of a batch, and their count."""
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad(), autocast():
        logits = model(input_ids=batch["input_ids"]).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss.item(), int((labels != IGNORE).sum())


def mean_losses(model, batches: dict[str, list[dict]], device, autocast, dist_info: DistInfo) -> dict[str, float]:
    """Mean token loss per domain; under DDP every rank scores its own share of the batches."""
    was_training = model.training
    model.eval()
    sums = []
    for domain_batches in batches.values():
        total, count = 0.0, 0
        for batch in domain_batches:
            loss, n = token_loss_sum(model, batch, device, autocast)
            total, count = total + loss, count + n
        sums += [total, count]
    sums = all_reduce_sum(sums, dist_info, device)
    model.train(was_training)
    return {d: sums[2 * i] / sums[2 * i + 1] for i, d in enumerate(batches) if sums[2 * i + 1] > 0}
