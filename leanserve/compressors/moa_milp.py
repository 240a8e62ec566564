"""MoA's plan optimisation: one rule per unit minimising the influence dropped at every profile length,
under a KV density budget at every constrained length and a cap on distinct rules per layer; solved
as mixed-integer programs with HiGHS (scipy.optimize.milp).

    x[u, r] in {0, 1}, sum_r x[u, r] = 1                          one rule per unit
    x[u, r] <= y[l(u), r], sum_r y[l, r] <= K                     at most K rules in a layer (if capped)
    lower * d_N <= sum_{u,r} slots_N[r] x[u, r] / (N U) <= d_N    density at each constrained length N
    Z_L = sum_{u,r} loss_L[u, r] x[u, r]                          one objective per profile length L

The losses are moa_rules.loss_table's (fractions of the influence profiled at L), so the objectives
are on one scale. Multi-objective scan (epsilon-constraint): minimise each Z_L alone, which gives its
range [own optimum, worst value at the others' optima]; split every range into `intervals` steps;
for each primary L and each combination of steps of the others, minimise Z_L with each other
objective at most its step's upper edge. One-sided bounds make every optimum (weakly) Pareto-optimal;
the solutions are then deduplicated and the dominated ones dropped.
"""
from __future__ import annotations

import itertools
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from leanserve.errors import UserError


@dataclass
class Problem:
    losses: dict[int, np.ndarray]   # profile length L -> [U, R]
    slots: dict[int, np.ndarray]    # constrained length N -> [R] KV slots of each rule
    layer_of: np.ndarray            # [U] layer of each unit
    density: dict[int, float]       # N -> the density budget there
    lower_ratio: float = 0.9        # densities are kept in [lower_ratio * d_N, d_N]
    cap: int | None = 2             # distinct rules per layer (None: no cap)

    @property
    def shape(self) -> tuple[int, int]:
        return next(iter(self.losses.values())).shape

    def objectives(self, choice: np.ndarray) -> dict[int, float]:
        units = np.arange(len(choice))
        return {length: float(loss[units, choice].sum()) for length, loss in self.losses.items()}

    def densities(self, choice: np.ndarray) -> dict[int, float]:
        return {n: float(s[choice].sum() / (len(choice) * n)) for n, s in self.slots.items()}

    def feasible(self, choice: np.ndarray, tol: float = 1e-9) -> bool:
        for n, d in self.densities(choice).items():
            if not self.lower_ratio * self.density[n] - tol <= d <= self.density[n] + tol:
                return False
        if self.cap is None:
            return True
        return all(len(set(choice[self.layer_of == layer])) <= self.cap for layer in np.unique(self.layer_of))


@dataclass
class Solution:
    choice: np.ndarray            # [U] rule index of each unit
    objectives: dict[int, float]  # L -> Z_L
    optimal: bool                 # False: the time limit stopped the solver at a feasible plan

    def dominates(self, other: Solution) -> bool:
        mine, theirs = np.array(list(self.objectives.values())), np.array(list(other.objectives.values()))
        return bool((mine <= theirs).all() and (mine < theirs).any())


def _constraints(p: Problem, bounds: dict[int, float]) -> tuple[sparse.csr_array, np.ndarray, np.ndarray, int]:
    """All rows of the program as one sparse matrix; and the number of variables."""
    num_units, num_rules = p.shape
    capped = p.cap is not None and p.cap < num_rules
    layers = np.unique(p.layer_of)
    layer_index = np.searchsorted(layers, p.layer_of)
    num_x = num_units * num_rules
    num_vars = num_x + (len(layers) * num_rules if capped else 0)
    x = np.arange(num_x).reshape(num_units, num_rules)
    rows, cols, vals, lb, ub = [], [], [], [], []

    def add(cols_: np.ndarray, vals_: np.ndarray, low: float, high: float):
        rows.append(np.full(len(cols_), len(lb)))
        cols.append(cols_)
        vals.append(vals_)
        lb.append(low)
        ub.append(high)

    for u in range(num_units):
        add(x[u], np.ones(num_rules), 1.0, 1.0)
    if capped:
        y = num_x + np.arange(len(layers) * num_rules).reshape(len(layers), num_rules)
        for u in range(num_units):
            for r in range(num_rules):
                add(np.array([x[u, r], y[layer_index[u], r]]), np.array([1.0, -1.0]), -np.inf, 0.0)
        for layer in range(len(layers)):
            add(y[layer], np.ones(num_rules), 0.0, float(p.cap))
    for n, slots in p.slots.items():  # in density units: slots / (N U)
        add(x.ravel(), np.tile(slots / (n * num_units), num_units), p.lower_ratio * p.density[n], p.density[n])
    for length, bound in bounds.items():
        add(x.ravel(), p.losses[length].ravel(), -np.inf, bound)
    matrix = sparse.csr_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                              shape=(len(lb), num_vars))
    return matrix, np.array(lb), np.array(ub), num_vars


@contextmanager
def _quiet_stdout():
    """HiGHS (as scipy bundles it) prints debug lines from C straight to file descriptor 1, disp=False
    or not; they would fill a job's log. Python's own stdout is flushed first and left alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def solve(p: Problem, primary: int, bounds: dict[int, float] | None = None, *, time_limit: float = 60.0,
          gap: float = 1e-4, relax: bool = False) -> Solution | None:
    """Minimise Z_primary subject to Z_L <= bounds[L]; None if infeasible (or no plan found in time).
    `relax`: the LP relaxation (a lower bound; its `choice` is the largest x of each unit)."""
    num_units, num_rules = p.shape
    matrix, lb, ub, num_vars = _constraints(p, bounds or {})
    c = np.zeros(num_vars)
    c[: num_units * num_rules] = p.losses[primary].ravel()
    with _quiet_stdout():
        res = milp(c, constraints=LinearConstraint(matrix, lb, ub), integrality=np.zeros(num_vars) if relax
                   else np.ones(num_vars), bounds=Bounds(0, 1),
                   options={"time_limit": time_limit, "mip_rel_gap": gap, "disp": False})
    if res.x is None:
        return None
    choice = res.x[: num_units * num_rules].reshape(num_units, num_rules).argmax(axis=1)
    objectives = p.objectives(choice)
    if relax:
        objectives[primary] = float(res.fun)
    return Solution(choice, objectives, res.status == 0)


def pareto_plans(p: Problem, *, intervals: int = 4, time_limit: float = 60.0, gap: float = 1e-4,
                 on_solve=lambda: None) -> list[Solution]:
    """The non-dominated plans the epsilon-constraint scan finds, sorted by the first objective;
    `on_solve()` after each MILP (len(L) + len(L) * intervals ** (len(L) - 1) of them)."""
    lengths = sorted(p.losses)
    anchors = {}
    for length in lengths:
        anchors[length] = solve(p, length, time_limit=time_limit, gap=gap)
        on_solve()
        if anchors[length] is None:
            budget = ", ".join(f"{p.density[n]:g} at {n}" for n in sorted(p.density))
            raise UserError(f"no plan meets the density budget ({budget}, lower bound x{p.lower_ratio:g}) "
                            f"within the rule cap {p.cap} and the rule grid: at short lengths the minimum cache "
                            "(2 blocks) may exceed it; raise --density or lower --block-size")
    found = list(anchors.values())
    edges = {}
    for length in lengths:
        low = anchors[length].objectives[length]
        high = max(s.objectives[length] for s in anchors.values())
        edges[length] = [low + (high - low) * k / intervals for k in range(1, intervals + 1)]
    for primary in lengths:
        others = [length for length in lengths if length != primary]
        for combo in itertools.product(*(edges[o] for o in others)):
            solution = solve(p, primary, dict(zip(others, combo)), time_limit=time_limit, gap=gap)
            on_solve()
            if solution is not None:
                found.append(solution)
    unique = {tuple(s.choice): s for s in found}.values()
    pareto = [s for s in unique if not any(o.dominates(s) for o in unique)]
    return sorted(pareto, key=lambda s: [s.objectives[length] for length in lengths])
