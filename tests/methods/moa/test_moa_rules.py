"""MoA's rule grid and the optimiser's tables: the influence a rule drops, read from distance
histograms, equals the influence its token-exact serving mask removes."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from leanserve.compressors import moa_rules as mr
from leanserve.kernels.moa_influence import influence_entries, influence_ref
from leanserve.models.moa_plan import kv_slots, sink_and_ring, span_mask

# spec section 2.3: rules per alpha for MoA's 2k/4k/8k (extend 16k)
MOA_COUNTS = {-1024: 4, 0: 8, 1024: 8, 2048: 7, 3072: 6, 4096: 5, 5120: 4, 6144: 3, 7168: 2, 8192: 1}


@pytest.mark.parametrize("scale", [1, 4])  # MoA's lengths, and the 4x-scaled tiny setting 512/1k/2k
def test_rule_grid_reproduces_moas_48_rules(scale):
    lengths = [2048 // scale, 4096 // scale, 8192 // scale]
    rules = mr.rule_grid(lengths, 16384 // scale)
    assert len(rules) == 48 == len(set(rules))
    assert Counter(a for a, _ in rules) == {a // scale: c for a, c in MOA_COUNTS.items()}
    assert {b for a, b in rules if a == -1024 // scale} == {5 / 8, 6 / 8, 7 / 8, 1.0}
    spans = [a + b * 16384 // scale for a, b in rules]
    assert spans == sorted(spans) and spans[-1] == 16384 // scale  # dense (0, 1) is the widest
    for a, b in rules:
        assert a + b * lengths[-1] <= lengths[-1] and a + b * lengths[0] > 0


def test_rule_grid_generalises_to_other_lengths():
    rules = mr.rule_grid([100, 300], 600)
    assert all(a % 50 == 0 and -100 <= a <= 300 for a, _ in rules)
    assert all(a + b * 300 <= 300 and a + b * 600 <= 600 and a + b * 100 > 0 for a, b in rules)
    assert (300, 0.0) in rules and (0, 1.0) in rules and (-50, 0.5) not in rules


def test_slots_table_is_the_serving_formula():
    rules = mr.rule_grid([64, 128, 256], 512)
    assert mr.slots_table(rules, 256, 16).tolist() == [kv_slots(a, b, 256, 16) for a, b in rules]


def test_dropped_influence_equals_the_serving_mask():
    """Per rule: the histogram tail = the sum of |E| over causal pairs that the token-exact span mask
    hides, for an item of a length that is not a multiple of the block."""
    gen = torch.Generator().manual_seed(0)
    n, block = 150, 16
    q, k, v, o, do = (torch.randn(h, n, 8, generator=gen) for h in (2, 1, 1, 2, 2))
    hist = influence_ref(q, k, v, o, do, 0.4, block).sum(dim=1).double().numpy()
    entries = influence_entries(q, k, v, o, do, 0.4, torch.arange(n)).abs().double()
    rules = mr.rule_grid([64, 128, 256], 512)
    dropped = mr.dropped_influence(hist, n, rules, block)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for r, (a, b) in enumerate(rules):
        hidden = causal & ~span_mask(n, *sink_and_ring(kv_slots(a, b, n, block), block))
        expected = (entries * hidden).sum(dim=(1, 2)).numpy()
        np.testing.assert_allclose(dropped[:, r], expected, rtol=1e-5, atol=1e-6)
    assert (dropped[:, [r for r, (a, b) in enumerate(rules) if kv_slots(a, b, n, block) >= n]] == 0).all()


def test_kv_head_units_group_query_heads_in_repeat_kv_order():
    per_q = np.arange(2 * 4 * 3, dtype=float).reshape(2, 4, 3)  # 2 layers, 4 query heads, 3 rules
    units = mr.units_of(per_q, num_kv_heads=2)
    np.testing.assert_array_equal(units[0], per_q[0, 0] + per_q[0, 1])  # KV head 0 serves query heads 0, 1
    np.testing.assert_array_equal(units[3], per_q[1, 2] + per_q[1, 3])
    np.testing.assert_array_equal(mr.units_of(per_q, 2, "max")[1], per_q[0, 3])


def test_loss_table_is_the_dropped_fraction_over_items():
    rng = np.random.default_rng(0)
    rules = [(0, 1.0), (32, 0.0), (16, 0.0)]  # keeps all, 2 blocks, 2 blocks (min cache)
    items = [(rng.random((2, 4, 8)), 128), (rng.random((2, 4, 5)), 80)]
    for hist, _ in items:
        hist[..., -1] = 0  # distances reach (n - 1 - B) // B at most: the last bucket is always empty
    table = mr.loss_table(items, rules, 16, num_kv_heads=2)
    assert table.shape == (4, 3)
    np.testing.assert_array_equal(table[:, 0], 0)
    mass = sum(h.sum() for h, _ in items)
    # ring of 16 tokens: every bucket from 1 on is dropped
    expected = sum(h[..., 1:].sum(-1) for h, _ in items).reshape(2, 2, 2, 1).sum(2).reshape(4) / mass
    np.testing.assert_allclose(table[:, 1], expected)
    np.testing.assert_allclose(table[:, 2], table[:, 1])
