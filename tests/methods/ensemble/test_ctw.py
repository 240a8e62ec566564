"""Context-tree learners of experiment C1: KT by hand, CTW against the Bayesian mixture it claims to
be (enumerated tree by tree with exact fractions), and the oracle's regret against KT asymptotics."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from leanserve.eval import ctw


def test_kt_codelengths_match_a_hand_computation():
    # order 0 on 0, 1, 1: P = 1/2 * (1/2)/2 * (3/2)/3 = 1/16
    x = np.array([0, 1, 1], dtype=np.uint8)
    assert ctw.kt_codelengths(x, np.zeros(3, dtype=np.int64), [1, 2, 3]) == pytest.approx([1, 3, 4])
    # two states, each its own KT: state 0 sees 1, 1 (1/2 * 3/4), state 1 sees 1, 0 (1/2 * 1/4)
    x = np.array([1, 1, 1, 0], dtype=np.uint8)
    states = np.array([0, 1, 0, 1])
    assert ctw.kt_codelengths(x, states, [4]) == pytest.approx([-math.log2(3 / 8 * 1 / 8)])


def test_contexts_read_the_past_most_recent_first_with_zeros_before_the_start():
    x = np.array([1, 0, 1, 1], dtype=np.uint8)
    # t=3: x_2 = 1 (bit 0), x_1 = 0 (bit 1), x_0 = 1 (bit 2)
    assert ctw.contexts(x, 3).tolist() == [0b000, 0b001, 0b010, 0b101]


def test_leaf_table_rejects_trees_that_overlap_or_leave_gaps():
    with pytest.raises(ValueError, match="overlaps"):
        ctw.leaf_table([(0,), (0, 1), (1,)])
    with pytest.raises(ValueError, match="cover"):
        ctw.leaf_table([(0,), (1, 0)])


def test_sample_follows_the_source_probabilities_per_leaf():
    x = ctw.sample(ctw.C1_SOURCE, 40_000, seed=0)
    states = ctw.tree_states(x, list(ctw.C1_SOURCE))
    for i, p in enumerate(ctw.C1_SOURCE.values()):
        ones = x[states == i]
        assert abs(ones.mean() - p) < 4 * math.sqrt(p * (1 - p) / len(ones))
    assert not np.array_equal(x[:100], ctw.sample(ctw.C1_SOURCE, 100, seed=1))


def test_ctw_of_depth_zero_is_order_zero_kt():
    x = np.random.default_rng(0).integers(0, 2, 300).astype(np.uint8)
    at = list(range(1, 301))
    np.testing.assert_allclose(ctw.ctw_codelengths(x, 0, at), ctw.kt_codelengths(x, np.zeros(300, dtype=np.int64), at))


# ---------------------------------------------------------------- CTW is the Bayesian mixture over trees

def trees(depth: int, suffix: tuple[int, ...] = ()):
    """Every tree of depth <= `depth` below `suffix`, with its prior probability under CTW's
    generative process: a node above depth D is a leaf or splits with probability 1/2 each."""
    if len(suffix) == depth:
        yield [suffix], Fraction(1)
        return
    yield [suffix], Fraction(1, 2)
    for leaves0, w0 in trees(depth, suffix + (0,)):
        for leaves1, w1 in trees(depth, suffix + (1,)):
            yield leaves0 + leaves1, Fraction(1, 2) * w0 * w1


def tree_probability(x: list[int], leaves: list[tuple[int, ...]]) -> Fraction:
    """P_T(x) with a KT coin at each leaf, read off the padded past symbol by symbol."""
    depth = max(map(len, leaves))
    past = [0] * depth
    counts = {leaf: [0, 0] for leaf in leaves}
    p = Fraction(1)
    for bit in x:
        recent = tuple(reversed(past[-depth:])) if depth else ()
        leaf = next(s for s in leaves if recent[:len(s)] == s)
        n0, n1 = counts[leaf]
        p *= Fraction(2 * counts[leaf][bit] + 1, 2 * (n0 + n1 + 1))
        counts[leaf][bit] += 1
        past.append(bit)
    return p


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_ctw_equals_the_mixture_over_all_trees_of_bounded_depth(depth):
    rng = np.random.default_rng(depth)
    x = rng.integers(0, 2, 14).astype(np.uint8)
    all_trees = list(trees(depth))
    assert len(all_trees) == {1: 2, 2: 5, 3: 26}[depth]
    assert sum(w for _, w in all_trees) == 1
    for leaves, w in all_trees:
        assert 2 ** -ctw.prior_bits(leaves, depth) == w
    at = list(range(1, len(x) + 1))
    mixture = [sum(w * tree_probability(x[:t].tolist(), leaves) for leaves, w in all_trees) for t in at]
    np.testing.assert_allclose(ctw.ctw_codelengths(x, depth, at), [-math.log2(p) for p in mixture], rtol=1e-12)


def batch_ctw(x: np.ndarray, depth: int) -> float:
    """-log2 CTW from the final counts alone (KT is exchangeable): the recursion over the tree."""
    ctx = ctw.contexts(x, depth)
    counts = np.zeros((1 << depth, 2), dtype=np.int64)
    np.add.at(counts, (ctx, x), 1)

    def log2_kt(n0, n1):  # the closed form Γ(n0 + ½) Γ(n1 + ½) / (π Γ(n0 + n1 + 1))
        lgamma = math.lgamma
        return (lgamma(n0 + 0.5) + lgamma(n1 + 0.5) - math.log(math.pi) - lgamma(n0 + n1 + 1)) / math.log(2)

    level = [log2_kt(n0, n1) for n0, n1 in counts.tolist()]  # depth D: Pw = Pe
    for d in range(depth - 1, -1, -1):
        # context s of length d has children s (older bit 0) and s + 2^d (older bit 1)
        counts = counts[: 1 << d] + counts[1 << d:]
        level = [ctw._log2_mean(log2_kt(n0, n1), level[s] + level[s + (1 << d)])
                 for s, (n0, n1) in enumerate(counts.tolist())]
    return -level[0]


def test_sequential_ctw_agrees_with_the_batch_recursion_on_a_long_sequence():
    x = ctw.sample(ctw.C1_SOURCE, 3000, seed=3)
    at = [10, 500, 3000]
    sequential = ctw.ctw_codelengths(x, 6, at)
    np.testing.assert_allclose(sequential, [batch_ctw(x[:t], 6) for t in at], rtol=1e-10)


def test_ctw_never_pays_more_than_the_prior_bits_of_the_true_tree_over_the_oracle():
    x = ctw.sample(ctw.C1_SOURCE, 3000, seed=4)
    at = list(range(1, 3001, 37))
    oracle = ctw.kt_codelengths(x, ctw.tree_states(x, list(ctw.C1_SOURCE)), at)
    for depth in (3, 10, 16):
        gap = ctw.ctw_codelengths(x, depth, at) - oracle
        assert ctw.prior_bits(list(ctw.C1_SOURCE), depth) == 5
        assert gap.max() <= 5 + 1e-9
        assert gap.min() > -40  # and it does not get the truth for free: other trees only add mass


def test_oracle_regret_follows_kt_asymptotics():
    # per leaf with n_s symbols, KT's expected regret against the true coin is ½ log2(π n_s / (2e)) + o(1)
    # (½ log2(π n_s / 2) over the ML coin, minus the ML's expected gain ½ log2 e): (k/2) log2 n + O(1)
    n, leaves = 20_000, list(ctw.C1_SOURCE)
    regrets, predicted = [], []
    for seed in range(20):
        x = ctw.sample(ctw.C1_SOURCE, n, seed)
        states = ctw.tree_states(x, leaves)
        regrets.append(ctw.kt_codelengths(x, states, [n])[0] - ctw.source_codelengths(ctw.C1_SOURCE, x, [n])[0])
        sizes = np.bincount(states, minlength=len(leaves))
        predicted.append(sum(0.5 * math.log2(math.pi * m / (2 * math.e)) for m in sizes))
        # pointwise: KT never loses more than ½ log2 n_s + 1 bits per leaf to any coin
        assert regrets[-1] <= sum(0.5 * math.log2(m) + 1 for m in sizes)
    assert np.mean(regrets) == pytest.approx(np.mean(predicted), abs=1.5)
