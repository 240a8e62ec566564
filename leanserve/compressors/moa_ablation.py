"""The middle steps of MoA's ablation ladder (uniform -> per-layer spans -> per-head spans from a
single profile length -> elastic, the full plan), from the profiles of the same run.

The paper does not define the middle steps precisely; here each step adds one thing to the one
before, all under the run's density budget at every constrained length:

- uniform: alpha = 0, beta = the density, every unit (no optimisation; `leanserve eval moa` builds it);
- per-layer: rules with alpha = 0 (span beta * N: the same share of the context at every length),
  one rule per layer, chosen to minimise the influence dropped at the longest profile length alone;
- per-head: the same rules and objective, one rule per unit under the run's rule cap;
- elastic: the MoA plan, (alpha, beta) rules over all profile lengths, picked by validation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leanserve.compressors.moa_milp import Problem, solve
from leanserve.compressors.moa_rules import Rule, loss_table, slots_table
from leanserve.errors import UserError

LADDER = ("per-layer", "per-head")
FOLDER = "moa_ablation"  # OUT/moa_ablation/<step>.json


@dataclass
class LadderStep:
    rules: list[list[Rule]]  # [layer][unit]
    cap: int | None          # distinct rules per layer it was chosen under
    dropped: float           # the share of influence it drops at the longest profile length


def ladder_rules(hists: dict[int, list[tuple[np.ndarray, int]]], rules: list[Rule], *, num_layers: int,
                 num_kv_heads: int, block_size: int, density: dict[int, float], lower_ratio: float,
                 cap: int | None, group_reduce: str = "sum", time_limit: float = 60.0, gap: float = 1e-4
                 ) -> dict[str, LadderStep]:
    """The per-layer and per-head steps. `hists`: profile length -> the profiled items
    (moa_profile); `density`: constrained length -> budget, as the run's; `cap`: the run's rule cap."""
    longest = max(hists)
    kept = [r for r in rules if r[0] == 0]
    slots = {n: slots_table(kept, n, block_size) for n in density}
    loss = loss_table(hists[longest], kept, block_size, num_kv_heads, group_reduce)
    layer_of = np.repeat(np.arange(num_layers), num_kv_heads)
    out = {}
    for step, step_cap in zip(LADDER, (1, cap)):
        problem = Problem({longest: loss}, slots, layer_of, density, lower_ratio, step_cap)
        solution = solve(problem, longest, time_limit=time_limit, gap=gap)
        if solution is None:
            raise UserError(f"no {step} plan of alpha-0 rules meets the density budget (lower bound "
                            f"x{lower_ratio:g}); drop --ablation-plans or raise --density")
        per_layer = [[kept[r] for r in solution.choice[layer * num_kv_heads:(layer + 1) * num_kv_heads]]
                     for layer in range(num_layers)]
        out[step] = LadderStep(per_layer, step_cap, solution.objectives[longest])
    return out
