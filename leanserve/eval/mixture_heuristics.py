"""MoDoMoDo's seed mixtures and the heuristic mixtures computed from their runs (no model fit).

A record is one pilot run: its mixture w (on the simplex, over m groups), In-Score and Out-Score.
  seed_mixtures   the 2m+1 seed design: each group alone, each group left out (uniform over the rest),
                  and all (uniform)
  alpha_mixture   A_in (α = 1), A_out (α = 0), A_bal (α = 0.5): every record adds its scores to each group
                  it used (single-group records weighted α_single; the paper does not give its value, 0.5
                  here), per-group sums min-max normalised, C_i = α·Ŝ_in + (1−α)·Ŝ_out, normalised
  coli_mixture    ridge (λ = 1e-3, no intercept) of Out-Score on group-inclusion indicators, each
                  coefficient over its variance-inflation term diag((XᵀX+λI)⁻¹), negatives clipped, normalised
  norm_mixture    from the m leave-one-out runs: min-max normalised Out-Scores ŝ_i of "all but i", weights
                  (1 − ŝ_i/2)/m (m = 5: 0.2 − 0.1·ŝ_i; leaving i out hurt → i weighted up), normalised
A heuristic whose weights all vanish falls back to uniform (said in its name by the caller, not hidden:
`fallback` is True).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Record:
    w: tuple[float, ...]
    in_score: float
    out_score: float


def seed_mixtures(m: int) -> dict[str, list[float]]:
    mixtures = {}
    for i in range(m):
        mixtures[f"single_{i}"] = [1.0 if j == i else 0.0 for j in range(m)]
    for i in range(m):
        mixtures[f"exclude_{i}"] = [0.0 if j == i else 1.0 / (m - 1) for j in range(m)]
    mixtures["uniform"] = [1.0 / m] * m
    return mixtures


def _minmax(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.ones_like(x)


def _normalised(c: torch.Tensor) -> tuple[list[float], bool]:
    c = c.clamp(min=0)
    if float(c.sum()) <= 0:
        return [1.0 / len(c)] * len(c), True
    return (c / c.sum()).tolist(), False


def alpha_mixture(records: list[Record], alpha: float, alpha_single: float = 0.5) -> tuple[list[float], bool]:
    m = len(records[0].w)
    s_in, s_out = torch.zeros(m, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
    for r in records:
        used = torch.tensor(r.w) > 0
        weight = alpha_single if int(used.sum()) == 1 else 1.0
        s_in += weight * r.in_score * used
        s_out += weight * r.out_score * used
    return _normalised(alpha * _minmax(s_in) + (1 - alpha) * _minmax(s_out))


def coli_mixture(records: list[Record], lam: float = 1e-3) -> tuple[list[float], bool]:
    X = torch.tensor([[1.0 if v > 0 else 0.0 for v in r.w] for r in records], dtype=torch.float64)
    y = torch.tensor([r.out_score for r in records], dtype=torch.float64)
    A_inv = torch.linalg.inv(X.T @ X + lam * torch.eye(X.shape[1], dtype=torch.float64))
    beta = A_inv @ X.T @ y
    return _normalised(beta / torch.diagonal(A_inv))


def norm_mixture(leave_one_out_scores: list[float]) -> tuple[list[float], bool]:
    """`leave_one_out_scores[i]`: the Out-Score of the run on every group but i."""
    s = _minmax(torch.tensor(leave_one_out_scores, dtype=torch.float64))
    m = len(s)
    return _normalised((1 - s / 2) / m)
