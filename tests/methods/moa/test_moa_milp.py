"""MoA's plan MILP on HiGHS against brute force over every plan of a toy instance, bounds on a larger
one, and the Pareto scan."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from leanserve.compressors import moa_milp as mm
from leanserve.errors import UserError

LENGTHS = (64, 128, 256)


def toy(seed: int, cap: int | None, units_per_layer: int = 2, layers: int = 2, rules: int = 5) -> mm.Problem:
    """Rules keep more KV the later they come and drop less influence (noisily), as real tables do."""
    rng = np.random.default_rng(seed)
    units = layers * units_per_layer
    slots = {n: np.sort(rng.choice(np.arange(2, n // 16 + 1) * 16, rules)).astype(float) for n in (*LENGTHS, 512)}
    losses = {n: rng.random((units, rules)) * np.linspace(1, 0.05, rules) for n in LENGTHS}
    density = {n: float(np.median(slots[n])) / n for n in slots}
    return mm.Problem(losses, slots, np.repeat(np.arange(layers), units_per_layer), density, 0.8, cap)


def brute_force(p: mm.Problem) -> list[np.ndarray]:
    units, rules = p.shape
    plans = (np.array(c) for c in itertools.product(range(rules), repeat=units))
    return [c for c in plans if p.feasible(c)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cap", [1, None])
def test_single_objective_equals_brute_force(seed, cap):
    p = toy(seed, cap)
    feasible = brute_force(p)
    for length in LENGTHS:
        if not feasible:
            assert mm.solve(p, length, gap=0) is None
            continue
        best = min(p.objectives(c)[length] for c in feasible)
        solution = mm.solve(p, length, gap=0)
        assert solution.optimal and p.feasible(solution.choice)
        assert solution.objectives[length] == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_feasible_instances_exist_among_the_toys():
    assert sum(bool(brute_force(toy(seed, 1))) for seed in range(6)) >= 3


def test_optimum_lies_between_the_lp_bound_and_a_uniform_plan():
    rng = np.random.default_rng(7)
    units, rules, layers = 24, 12, 6
    slots = {n: np.linspace(32, n, rules).round() for n in (*LENGTHS, 512)}
    losses = {n: rng.random((units, rules)) * np.linspace(1, 0, rules) for n in LENGTHS}
    uniform = np.full(units, rules // 2)
    density = {n: slots[n][rules // 2] / n for n in slots}
    p = mm.Problem(losses, slots, np.repeat(np.arange(layers), units // layers), density, 0.9, cap=2)
    assert p.feasible(uniform)
    for length in LENGTHS:
        relaxed = mm.solve(p, length, relax=True).objectives[length]
        solution = mm.solve(p, length, gap=0)
        assert relaxed - 1e-9 <= solution.objectives[length] <= p.objectives(uniform)[length] + 1e-9
        assert p.feasible(solution.choice)
        assert all(len(set(solution.choice[p.layer_of == layer])) <= 2 for layer in range(layers))


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_pareto_scan_returns_only_non_dominated_plans(seed):
    p = toy(seed, cap=2)
    feasible = brute_force(p)
    if not feasible:
        pytest.skip("infeasible toy")
    everything = [mm.Solution(c, p.objectives(c), True) for c in feasible]
    plans = mm.pareto_plans(p, gap=0)
    assert plans
    for plan in plans:
        assert p.feasible(plan.choice)
        assert not any(other.dominates(plan) for other in everything)
    for length in LENGTHS:  # each objective's own optimum is among them
        best = min(s.objectives[length] for s in everything)
        assert min(plan.objectives[length] for plan in plans) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_an_impossible_budget_is_a_user_error():
    p = toy(0, cap=None)
    p.density = {n: 16 / n for n in p.slots}  # below the 2-block minimum of every rule
    with pytest.raises(UserError, match="no plan meets the density budget"):
        mm.pareto_plans(p)
