"""Context-tree learners for experiment C1: an exact Bayesian mixture over a huge model class.

A tree source predicts a binary symbol from a suffix of its past (a leaf of a context tree). The
learners are KT estimators (P(1) = (n1 + 1/2) / (n0 + n1 + 1)) run separately in each context of a
fixed tree, and Context-Tree Weighting (Willems, Shtarkov, Tjalkens 1995): the Bayesian mixture over
every tree of depth <= D with prior 2^-Gamma_D(T), computed exactly in O(n D).

Every function returns code lengths -log2 Q(x^t) at the prefix lengths t in `at`, from one pass
over x. The past before x_1 is all zeros, for the source and for every learner (Willems et al.
take the first D symbols' context as given; zeros are that given context). So every learner codes
all n symbols, and the true tree is a member of CTW's class: its KT coder is one term of the mixture.

Contexts are integers: bit k of the context at time t is x_{t-1-k}, the most recent symbol in bit 0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# C1's source: context suffix (most recent symbol first) -> P(next symbol = 1)
C1_SOURCE: dict[tuple[int, ...], float] = {(0,): 0.1, (1, 0): 0.8, (1, 1): 0.35}


def contexts(x: np.ndarray, depth: int) -> np.ndarray:
    """For every t, the integer whose bit k (k < depth) is x_{t-1-k}; zeros before x_1."""
    ctx = np.zeros(len(x), dtype=np.int64)
    for k in range(depth):
        ctx[k + 1:] |= x[:len(x) - k - 1].astype(np.int64) << k
    return ctx


def leaf_table(leaves: Sequence[tuple[int, ...]]) -> np.ndarray:
    """Maps a context of depth max(len(leaf)) to the index of the leaf it ends in."""
    depth = max(len(leaf) for leaf in leaves)
    table = np.full(1 << depth, -1, dtype=np.int64)
    for i, leaf in enumerate(leaves):
        suffix = sum(bit << k for k, bit in enumerate(leaf))
        hits = table[suffix::1 << len(leaf)]
        if (hits != -1).any():
            raise ValueError(f"leaf {leaf} overlaps another leaf")
        table[suffix::1 << len(leaf)] = i
    if (table == -1).any():
        raise ValueError(f"leaves {list(leaves)} do not cover every context")
    return table


def tree_states(x: np.ndarray, leaves: Sequence[tuple[int, ...]]) -> np.ndarray:
    """The index of the leaf whose context each x_t follows."""
    return leaf_table(leaves)[contexts(x, max(len(leaf) for leaf in leaves))]


def prior_bits(leaves: Sequence[tuple[int, ...]], depth: int) -> int:
    """-log2 of CTW's prior weight of a tree of depth <= `depth`: Gamma_D(T) = 2|T| - 1 - (leaves at
    depth D). Every node is a coin flip, leaf or split, except that nodes at depth D must be leaves.
    For C1's source and D >= 3 it is 5 bits: CTW's regret exceeds the oracle's by at most that."""
    if max(len(leaf) for leaf in leaves) > depth:
        raise ValueError(f"a tree of depth {max(len(leaf) for leaf in leaves)} is not in the depth-{depth} class")
    return 2 * len(leaves) - 1 - sum(len(leaf) == depth for leaf in leaves)


def sample(source: dict[tuple[int, ...], float], n: int, seed: int) -> np.ndarray:
    """n symbols (uint8) of the tree source, starting from the all-zeros past."""
    leaves = list(source)
    table = leaf_table(leaves).tolist()
    p1 = [source[leaf] for leaf in leaves]
    mask = len(table) - 1
    u = np.random.default_rng(seed).random(n).tolist()
    x, ctx = [], 0
    for t in range(n):
        bit = int(u[t] < p1[table[ctx]])
        x.append(bit)
        ctx = ((ctx << 1) | bit) & mask
    return np.array(x, dtype=np.uint8)


def _check_prefixes(at: Sequence[int], n: int) -> np.ndarray:
    at = np.asarray(at, dtype=np.int64)
    if ((at < 1) | (at > n)).any():
        raise ValueError(f"prefix lengths {at.tolist()} must lie in [1, {n}]")
    return at


def _at(cumulative: np.ndarray, at: Sequence[int]) -> np.ndarray:
    return cumulative[_check_prefixes(at, len(cumulative)) - 1]


def source_codelengths(source: dict[tuple[int, ...], float], x: np.ndarray, at: Sequence[int]) -> np.ndarray:
    """-log2 P_source(x^t): the code length of the truth, which regrets are measured against."""
    p1 = np.array([source[leaf] for leaf in source])[tree_states(x, list(source))]
    return _at(np.cumsum(-np.log2(np.where(x == 1, p1, 1 - p1))), at)


def _earlier_equal(keys: np.ndarray) -> np.ndarray:
    """For every position, how many earlier positions hold the same key."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_keys)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
    earlier = np.empty(len(keys), dtype=np.int64)
    earlier[order] = np.arange(len(keys)) - group_start
    return earlier


def kt_codelengths(x: np.ndarray, states: np.ndarray, at: Sequence[int]) -> np.ndarray:
    """-log2 of KT estimators run separately in each state (x_t's context class) at prefix lengths `at`.

    Sequential KT predicts x_t from the counts of earlier symbols in the same state; those counts
    are ranks among equal keys, so the whole pass is vectorised."""
    same_symbol = _earlier_equal(states.astype(np.int64) * 2 + x)
    same_state = _earlier_equal(states.astype(np.int64))
    return _at(np.cumsum(-np.log2((same_symbol + 0.5) / (same_state + 1.0))), at)


def _log2_mean(a: float, b: float) -> float:
    """log2(2^a / 2 + 2^b / 2) without leaving the log domain (2^a underflows past ~1000 bits)."""
    hi, lo = (a, b) if a >= b else (b, a)
    return hi - 1.0 + math.log1p(2.0 ** (lo - hi)) / math.log(2.0)


def ctw_codelengths(x: np.ndarray, depth: int, at: Sequence[int]) -> np.ndarray:
    """-log2 of depth-`depth` Context-Tree Weighting at prefix lengths `at`.

    Node s keeps its counts, log2 Pe(s) (KT on the symbols that followed context s) and
    log2 Pw(s) = log2 Pe(s) at depth D, log2(Pe(s)/2 + Pw(0s) Pw(1s)/2) above. A symbol changes only
    the D+1 nodes on its context path, updated from the leaf up, so a pass is O(n D); the root's
    Pw is the mixture probability of the prefix."""
    wanted = sorted(set(_check_prefixes(at, len(x)).tolist()))
    ctx = contexts(x, depth).tolist()
    # heap numbering: context s of length d is node 2^d - 1 + s. An absent node has seen nothing:
    # Pe = Pw = 1. Values: [n0, n1, log2 Pe, log2 Pw].
    nodes: dict[int, list] = {}
    codelengths, next_wanted = {}, 0
    for t, bit in enumerate(x.tolist()):
        c = ctx[t]
        below = 0.0  # log2 Pw of the updated child on the path
        for d in range(depth, -1, -1):
            node = nodes.setdefault((1 << d) - 1 + (c & ((1 << d) - 1)), [0, 0, 0.0, 0.0])
            node[2] += math.log2((node[bit] + 0.5) / (node[0] + node[1] + 1.0))
            node[bit] += 1
            if d == depth:
                node[3] = node[2]
            else:
                sibling = nodes.get((1 << (d + 1)) - 1 + ((c & ((1 << (d + 1)) - 1)) ^ (1 << d)))
                node[3] = _log2_mean(node[2], below + (sibling[3] if sibling else 0.0))
            below = node[3]
        if t + 1 == wanted[next_wanted]:
            codelengths[t + 1] = -below
            next_wanted += 1
            if next_wanted == len(wanted):
                break
    return np.array([codelengths[int(t)] for t in at])
