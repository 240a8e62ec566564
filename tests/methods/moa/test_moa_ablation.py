"""The ablation ladder's middle plans (compressors/moa_ablation.py) on profiles built by hand: alpha-0
rules within the density budget, one rule per layer for the per-layer step, heads of a layer told
apart by the per-head step (which drops less), and only the longest profile length counts."""
from __future__ import annotations

import numpy as np
import pytest

from leanserve.compressors.moa_ablation import ladder_rules
from leanserve.compressors.moa_rules import rule_grid
from leanserve.errors import UserError
from leanserve.models.moa_plan import kv_slots

LENGTHS, EXTEND, B = (128, 256, 512), 1024, 16
LAYERS, Q_HEADS, KV_HEADS = 2, 4, 2


def hists(far_head: int) -> dict[int, list[tuple[np.ndarray, int]]]:
    """One item per length: every query head's influence at distance bucket 0 (local), except the
    two query heads of KV head `far_head` in layer 0, which also look 60% of the context back."""
    out = {}
    for n in LENGTHS:
        h = np.zeros((LAYERS, Q_HEADS, n // B))
        h[:, :, 0] = 1.0
        h[0, 2 * far_head:2 * far_head + 2, int(0.6 * n) // B] = 5.0
        out[n] = [(h, n)]
    return out


def ladder(profiles, density=0.5, cap=2):
    constrained = (*LENGTHS, EXTEND)
    return ladder_rules(profiles, rule_grid(list(LENGTHS), EXTEND), num_layers=LAYERS, num_kv_heads=KV_HEADS,
                        block_size=B, density={n: density for n in constrained}, lower_ratio=0.5, cap=cap, gap=0)


def test_steps_keep_alpha_zero_within_budget_and_their_caps():
    steps = ladder(hists(far_head=1), density=0.375)  # too little for a whole layer to look far back
    assert set(steps) == {"per-layer", "per-head"}
    for name, step in steps.items():
        rules = [r for layer in step.rules for r in layer]
        assert all(a == 0 for a, _ in rules)
        for n in (*LENGTHS, EXTEND):
            assert 0.1875 - 1e-9 <= np.mean([kv_slots(a, b, n, B) for a, b in rules]) / n <= 0.375 + 1e-9
        assert step.cap == (1 if name == "per-layer" else 2)
        assert all(len(set(layer)) <= step.cap for layer in step.rules)
    per_layer, per_head = steps["per-layer"], steps["per-head"]
    # layer 0's far-looking head keeps 60% of the context back, its local neighbour less
    assert per_head.rules[0][1][1] > 0.6 > per_head.rules[0][0][1]
    assert per_head.dropped < per_layer.dropped


def test_only_the_longest_profile_length_counts():
    base, other = hists(far_head=1), hists(far_head=0)
    mixed = {n: (base if n == max(LENGTHS) else other)[n] for n in LENGTHS}
    for name, step in ladder(mixed, density=0.375).items():
        assert step.rules == ladder(base, density=0.375)[name].rules


def test_an_impossible_budget_is_a_user_error():
    with pytest.raises(UserError, match="no per-layer plan of alpha-0 rules meets the density budget"):
        ladder(hists(far_head=0), density=0.05)
