"""MoA's rule grid and the two tables the plan optimiser reads for every (unit, rule): the KV slots a
rule keeps at a length (the serving formula, models/moa_plan.py) and the profiled influence it drops.

Influence comes from moa_profile as per-item histograms hist[layer, q_head, e]: the summed |E_ij| of
the pairs (i, j) with j past the sink and floor((i - j) / B) = e. A rule keeping R ring slots (a
multiple of B) at length N drops exactly the pairs with i - j >= R, so its dropped influence is the
tail sum of the histogram from e = R / B: the token-exact serving mask, not a block approximation.
Each item is scored at its own length, the length a server would size it for.
"""
from __future__ import annotations

import numpy as np

from leanserve.models.moa_plan import kv_slots, sink_and_ring

Rule = tuple[float, float]  # (alpha in tokens, beta)
BETA_STEPS = 8  # beta in {0, 1/8, ..., 1}


def default_extend_length(profile_lengths: list[int]) -> int:
    return 2 * max(profile_lengths)


def default_validation_length(profile_lengths: list[int]) -> int:
    return 3 * max(profile_lengths) // 2


def rule_grid(profile_lengths: list[int], extend_length: int) -> list[Rule]:
    """MoA's grid generalised to any profile lengths: alpha from -N_min to max(P) in steps of N_min / 2,
    beta in eighths; a rule is kept iff its span stays within N at max(P) and at the extend length and
    is positive at N_min. Sorted by span at the extend length (then alpha). MoA's 2k/4k/8k (extend 16k)
    and the 4x-scaled 512/1k/2k (extend 4k) both give 48 rules."""
    n_min, n_max = min(profile_lengths), max(profile_lengths)
    step = n_min / 2
    alphas = [-n_min + k * step for k in range(int((n_max + n_min) / step) + 1)]
    rules = []
    for a in alphas:
        a = int(a) if float(a).is_integer() else a
        for i in range(BETA_STEPS + 1):
            b = i / BETA_STEPS
            if a + b * n_max <= n_max and a + b * extend_length <= extend_length and a + b * n_min > 0:
                rules.append((a, b))
    return sorted(rules, key=lambda r: (r[0] + r[1] * extend_length, r[0]))


def slots_table(rules: list[Rule], n: int, block_size: int) -> np.ndarray:
    """[R] KV slots each rule keeps at length n (the same for every unit)."""
    return np.array([kv_slots(a, b, n, block_size) for a, b in rules], dtype=np.float64)


def ring_blocks(rules: list[Rule], n: int, block_size: int) -> np.ndarray:
    """[R] ring slots / B of each rule at length n: the first distance bucket it drops."""
    return np.array([sink_and_ring(kv_slots(a, b, n, block_size), block_size)[1] // block_size
                     for a, b in rules], dtype=np.int64)


def dropped_influence(hist: np.ndarray, n: int, rules: list[Rule], block_size: int) -> np.ndarray:
    """hist [..., nb] of one item of n tokens -> [..., R]: the influence each rule drops."""
    # tail[..., e] = sum of hist[..., e:]; a zero column past the end for rules that drop nothing
    tail = np.concatenate([np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1],
                           np.zeros((*hist.shape[:-1], 1))], axis=-1)
    first = np.minimum(ring_blocks(rules, n, block_size), hist.shape[-1])
    return tail[..., first]


def units_of(per_q_head: np.ndarray, num_kv_heads: int, reduce: str = "sum") -> np.ndarray:
    """[layers, q_heads, R] -> [layers * kv_heads, R]: KV-head units (query head q uses KV head q // G,
    transformers' repeat_kv order). First-order losses add (`sum`); `max` is the conservative choice."""
    layers, q_heads, num_rules = per_q_head.shape
    grouped = per_q_head.reshape(layers, num_kv_heads, q_heads // num_kv_heads, num_rules)
    if reduce == "sum":
        units = grouped.sum(axis=2)
    elif reduce == "max":
        units = grouped.max(axis=2)
    else:
        raise ValueError(f"reduce must be 'sum' or 'max', got {reduce!r}")
    return units.reshape(layers * num_kv_heads, num_rules)


def loss_table(items: list[tuple[np.ndarray, int]], rules: list[Rule], block_size: int, num_kv_heads: int,
               reduce: str = "sum") -> np.ndarray:
    """[U, R] influence each unit drops under each rule, summed over one profile length's items
    (hist [layers, q_heads, nb], n tokens), as a fraction of all their non-sink influence: raw |E|
    sums span orders of magnitude between models and lengths; fractions are comparable."""
    if not items:
        raise ValueError("no profiled items")
    total = sum(dropped_influence(h, n, rules, block_size) for h, n in items)
    mass = sum(float(h.sum()) for h, _ in items)
    return units_of(total, num_kv_heads, reduce) / (mass if mass > 0 else 1.0)
