"""`leanserve eval bayes`: Bayesian mixtures measured against the truth.

--c1: exact regret of Context-Tree Weighting (C1). Sequences from a 3-leaf binary tree source; four
learners code each one: KT on the true tree (the oracle, which knows the model), KT on every
depth-D context (the most complex member of the class), order-0 KT (too simple), and CTW, the
Bayesian mixture over all trees of depth <= D, at several depth bounds. Regret in bits =
-log2 Q(x^n) + log2 P_true(x^n). The claim under test (the Universality Lens in miniature): CTW pays
about -log2 w(true tree) = 5 bits over the oracle, whatever the depth bound, i.e. the weight of the
truth, not the size of the class, sets the regret.

Each seed draws one sequence of the largest n; the smaller n are its prefixes. Results go under
the key "c1" of --out (other keys, such as C2's, are kept) and the plot beside it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from leanserve.errors import UserError
from leanserve.eval import ctw

DEFAULT_OUT = "benchmarks/results/bayes_eval.json"
C1_PLOT = "bayes_c1_regret.png"
MAX_DEPTH = 32  # CTW keeps up to n (D+1) nodes; deeper bounds only cost memory


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--c1", action="store_true", help="C1: exact CTW regret against KT learners on a tree source")
    p.add_argument("--n", type=int, nargs="+", default=[1000, 10000, 50000], help="sequence lengths (C1)")
    p.add_argument("--seeds", type=int, default=10, help="sequences per length: seeds 0..N-1 (C1)")
    p.add_argument("--ctw-depths", type=int, nargs="+", default=[10, 16], help="CTW depth bounds D (C1)")
    p.add_argument("--kt-depth", type=int, default=10, help="depth of the all-contexts KT learner (C1)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results JSON, updated in place (default {DEFAULT_OUT}); "
                                                      f"C1's plot {C1_PLOT} goes beside it")


def c1_codelengths(x: np.ndarray, ns: list[int], ctw_depths: list[int], kt_depth: int) -> dict:
    """(learner, depth) -> -log2 Q(x^n) for n in ns."""
    leaves = list(ctw.C1_SOURCE)
    oracle_depth = max(len(leaf) for leaf in leaves)
    lengths = {("oracle", oracle_depth): ctw.kt_codelengths(x, ctw.tree_states(x, leaves), ns),
               ("kt", kt_depth): ctw.kt_codelengths(x, ctw.contexts(x, kt_depth), ns),
               ("order0", 0): ctw.kt_codelengths(x, np.zeros(len(x), dtype=np.int64), ns)}
    for depth in ctw_depths:
        lengths["ctw", depth] = ctw.ctw_codelengths(x, depth, ns)
    return lengths


def _mean_std(values: list[float]) -> dict:
    """Mean and sample std (ddof 1; 0 for one seed) over seeds."""
    values = np.asarray(values)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "seeds": len(values)}


def run_c1(ns: list[int], seeds: int, ctw_depths: list[int], kt_depth: int) -> dict:
    rows = []
    for seed in range(seeds):
        x = ctw.sample(ctw.C1_SOURCE, max(ns), seed)
        truth = ctw.source_codelengths(ctw.C1_SOURCE, x, ns)
        for (learner, depth), lengths in c1_codelengths(x, ns, ctw_depths, kt_depth).items():
            rows += [{"learner": learner, "depth": depth, "n": n, "seed": seed, "regret_bits": float(r)}
                     for n, r in zip(ns, lengths - truth)]
    regret = {(r["learner"], r["depth"], r["n"], r["seed"]): r["regret_bits"] for r in rows}
    learners = list(dict.fromkeys((r["learner"], r["depth"]) for r in rows))
    summary = [{"learner": learner, "depth": depth, "n": n,
                **_mean_std([regret[learner, depth, n, s] for s in range(seeds)])}
               for learner, depth in learners for n in ns]
    oracle = next(key for key in learners if key[0] == "oracle")
    # paired over seeds: both learners code the same sequence
    gap = [{"depth": depth, "n": n,
            **_mean_std([regret["ctw", depth, n, s] - regret[(*oracle, n, s)] for s in range(seeds)])}
           for learner, depth in learners if learner == "ctw" for n in ns]
    return {"settings": {"source": {"".join(map(str, leaf)): p for leaf, p in ctw.C1_SOURCE.items()},
                         "context_keys": "most recent symbol first; the past before x_1 is all zeros",
                         "n": ns, "seeds": list(range(seeds)), "ctw_depths": ctw_depths, "kt_depth": kt_depth},
            "expected_ctw_minus_oracle_bits": {str(d): ctw.prior_bits(list(ctw.C1_SOURCE), d) for d in ctw_depths
                                               if d >= oracle[1]},
            "rows": rows, "summary": summary, "ctw_minus_oracle": gap}


LABELS = {"oracle": "KT on the true tree (oracle)", "kt": "KT on all depth-{d} contexts", "order0": "KT order 0",
          "ctw": "CTW, depth {d}"}


def plot_c1(c1: dict, path: str | Path) -> None:
    """Regret against n, one line per learner (mean ± std over seeds), both axes logarithmic."""
    from leanserve.eval.plots import Series, line_plot

    lines: dict[tuple, list[dict]] = {}
    for row in c1["summary"]:
        lines.setdefault((row["learner"], row["depth"]), []).append(row)
    ctw_styles = iter(["-s", "--^", ":v", "-.D"] * len(lines))  # CTW's depth bounds overlap: tell them apart
    series = [Series(LABELS[learner].format(d=depth), [r["n"] for r in rows], [r["mean"] for r in rows],
                     yerr=[r["std"] for r in rows], fmt=next(ctw_styles) if learner == "ctw" else "-o")
              for (learner, depth), rows in lines.items()]
    values = [y for s in series for y in s.y]
    line_plot(series, path, title=f"C1: regret against the true source ({len(c1['settings']['seeds'])} seeds)",
              xlabel="n (symbols)", ylabel="regret (bits)", log_x=True, log_y=min(values) > 0)


def markdown_table(c1: dict) -> str:
    ns = c1["settings"]["n"]
    lines = ["| learner | depth | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|---:|" + "---:|" * len(ns)]
    cells: dict[tuple, list[str]] = {}
    for row in c1["summary"]:
        cells.setdefault((row["learner"], row["depth"]), []).append(f"{row['mean']:.2f} ± {row['std']:.2f}")
    for row in c1["ctw_minus_oracle"]:
        cells.setdefault(("ctw − oracle", row["depth"]), []).append(f"{row['mean']:.2f} ± {row['std']:.2f}")
    lines += [f"| {learner} | {depth} | " + " | ".join(values) + " |" for (learner, depth), values in cells.items()]
    return "\n".join(lines)


def _check_args(args):
    if not args.c1:
        raise UserError("nothing to run: pass --c1 (exact CTW regret)")
    if min(args.n) < 1 or args.seeds < 1:
        raise UserError("--n and --seeds must be positive")
    depths = [*args.ctw_depths, args.kt_depth]
    if min(depths) < 0 or max(depths) > MAX_DEPTH:
        raise UserError(f"--ctw-depths and --kt-depth must lie in [0, {MAX_DEPTH}]")


def run(args):
    from leanserve.eval.report import emit_json_section, hardware

    _check_args(args)
    ns = sorted(set(args.n))
    c1 = run_c1(ns, args.seeds, list(dict.fromkeys(args.ctw_depths)), args.kt_depth)
    emit_json_section("c1", {"hardware": hardware("cpu"), **c1}, args.out)
    plot = Path(args.out).parent / C1_PLOT
    plot_c1(c1, plot)
    print(f"wrote {plot}")
    print(markdown_table(c1))
    return 0
