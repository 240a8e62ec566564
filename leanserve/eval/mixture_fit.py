"""`leanserve mixture fit`: Scheffé quadratic and linear surrogates of pilot runs' scores over their task
mixtures, with leave-one-out R², and the best mixtures of the quadratic in a trust region around the
pilots (eval/scheffe.py).

--pilots is a JSON file {"groups": [NAME, ...], "pilots": [{"mixture": {NAME: WEIGHT}, TARGET: SCORE, ...}]}
(extra keys, e.g. "name", "seed", "in_score", are kept; repeated mixtures, e.g. seeds, are separate
observations; weights are normalised). The result names both fits (coefficients, λ, R², LOO R², the LOO
prediction of every pilot) and the top-k candidates (mixture, predicted score, se, distance to the
nearest pilot).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from leanserve.errors import UserError
from leanserve.eval import scheffe
from leanserve.eval.report import emit_json, hardware


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--pilots", required=True, help="JSON: {groups: [...], pilots: [{mixture: {...}, TARGET: x}]}")
    p.add_argument("--out", help="write the fit JSON here (default: print it)")
    p.add_argument("--target", default="out_score", help="the pilot key to model (default out_score)")
    p.add_argument("--top-k", type=int, default=3, help="candidate mixtures to return")
    p.add_argument("--radius", type=float, default=0.4,
                   help="trust region: L1 distance to the nearest pilot mixture a candidate may have")
    p.add_argument("--kappa", type=float, default=0.0, help="pessimism: rank by predicted − κ·se")
    p.add_argument("--min-separation", type=float, default=0.2, help="L1 distance between candidates")
    p.add_argument("--samples", type=int, default=100_000, help="Dirichlet(1) candidates before polishing")
    p.add_argument("--seed", type=int, default=0)


def read_pilots(path: Path, target: str) -> tuple[list[str], torch.Tensor, torch.Tensor, list[dict]]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--pilots {path}: {e}") from None
    groups, pilots = raw.get("groups"), raw.get("pilots")
    if not isinstance(groups, list) or not groups or not isinstance(pilots, list):
        raise UserError(f"--pilots {path}: expected {{\"groups\": [...], \"pilots\": [...]}}")
    rows, y = [], []
    for k, pilot in enumerate(pilots):
        mixture = pilot.get("mixture", {})
        if set(mixture) != set(groups):
            raise UserError(f"--pilots: pilot {k} weighs {sorted(mixture)}, not the groups {groups}")
        w = [float(mixture[g]) for g in groups]
        if min(w) < 0 or not sum(w) > 0:
            raise UserError(f"--pilots: pilot {k} has a negative weight or none positive")
        score = pilot.get(target)
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise UserError(f"--pilots: pilot {k} has no finite {target!r}")
        rows.append([v / sum(w) for v in w])
        y.append(float(score))
    return groups, torch.tensor(rows, dtype=torch.float64), torch.tensor(y, dtype=torch.float64), pilots


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def fit_report(groups: list[str], W: torch.Tensor, y: torch.Tensor, *, k: int = 3, radius: float = 0.4,
               kappa: float = 0.0, min_separation: float = 0.2, samples: int = 100_000, seed: int = 0) -> dict:
    fits, record = {}, {}
    for name, quadratic in (("quadratic", True), ("linear", False)):
        try:
            fits[name] = scheffe.fit(W, y, quadratic)
        except ValueError as e:
            raise UserError(f"{name} fit: {e}") from None
        s = fits[name]
        # R² is undefined (NaN) when every pilot scored the same: null in the JSON
        record[name] = {"loo_r2": _finite(s.loo_r2), "r2": _finite(s.r2), "loo_mse": s.loo_mse, "lambda": s.lam,
                        "sigma2": s.sigma2, "coefficients": s.coefficients(groups),
                        "loo_predictions": s.loo_predictions}
    candidates = scheffe.argmax(fits["quadratic"], W, k=k, radius=radius, kappa=kappa, samples=samples,
                                min_separation=min_separation, seed=seed)
    return {"groups": groups, "n": len(y), "fits": record,
            "argmax": {"surrogate": "quadratic", "radius": radius, "kappa": kappa, "min_separation": min_separation,
                       "samples": samples, "seed": seed},
            "candidates": [{"mixture": dict(zip(groups, c.w.tolist())), "predicted": c.predicted, "se": c.se,
                            "score": c.score, "distance": c.distance} for c in candidates]}


def run(args):
    if args.top_k <= 0 or args.samples <= 0 or not args.radius > 0 or args.kappa < 0 or args.min_separation < 0:
        raise UserError("--top-k, --samples and --radius must be > 0, --kappa and --min-separation >= 0")
    groups, W, y, pilots = read_pilots(Path(args.pilots), args.target)
    result = fit_report(groups, W, y, k=args.top_k, radius=args.radius, kappa=args.kappa,
                        min_separation=args.min_separation, samples=args.samples, seed=args.seed)
    result = {"pilots_file": str(args.pilots), "target": args.target, "hardware": hardware("cpu"), **result,
              "pilots": pilots}
    emit_json(result, args.out)
    if args.out:
        fits = result["fits"]
        print(f"LOO R²: quadratic {fits['quadratic']['loo_r2']}, linear {fits['linear']['loo_r2']}")
        for c in result["candidates"]:
            print("  " + ", ".join(f"{g} {v:.3f}" for g, v in c["mixture"].items())
                  + f": predicted {c['predicted']:.4f} ± {c['se']:.4f}")
    return 0
