"""C2: an SGLD ensemble against its single MAP checkpoint on a tiny code LM (one GPU).

Per seed: (1) the MAP, a tiny Llama (4 layers, d 256, 4 heads / 2 KV heads, MLP 768, context 256; ~5.3M
parameters with the 8k BPE vocabulary, 2.1M of them the tied embedding) trained by `leanserve train lm`
on the code domain only (Python stdlib source, split by file), pretraining phase only, AdamW
(lr 1e-3, wd 0.1, cosine to 1e-4), for --map-epochs passes over the code train tokens (10 by default).
Measured on an H100: after 3 epochs the code val loss was still falling (0.02-0.03 over the last 65
steps) and SGLD samples then beat the MAP on their own; read ensemble - MAP as posterior averaging only
where the reported MAP val history has flattened (train lm has no early stopping). Ensemble - last
sample is the comparison that does not depend on it.
(2) `leanserve train sgld` from it per temperature (T = 1 and a colder T): pSGLD with its RMSprop
preconditioner frozen after a burn-in of one epoch, a weak Gaussian prior of variance --prior-var
(λ = 1/(N·var): the MAP's AdamW weight decay is decoupled and does not translate into a coupled λ),
full scope, S members thinned by half an epoch. The constant step size is tuned as the spec says:
short pilot chains (T = 1, 2 members) at each of --sgld-lrs, and the largest whose single sample
keeps the code val NLL within --max-val-increase (3%) of the MAP's is used for all temperatures.
(3) `leanserve eval lm` (fp32) on the code test split (in-domain) and the docs test split (shifted):
MAP; the last SGLD sample; the SGLD ensemble with its first S in {1, 2, 4, ...} members; the
logit-averaged ensemble of all members (the negative control).

Rows {arm, S, seed, domain, nll, ece, brier, accuracy, nll_ts, temperature} go under key "c2" of
--results (read-modify-write: other keys, e.g. "c1", are kept), with the chains' own val NLLs (MAP,
last sample, ensemble: is the single sample within a few % of the MAP?), the paired differences over
seeds of ensemble(S = max) − MAP, − its chain's last sample and − its logit average (NLL, ECE, Brier)
with 95% t-intervals per domain and temperature, and one PNG of NLL against S per domain beside it.

Every run is a `leanserve` process; the runs of a phase (MAPs; pilots and the MAPs' evals; chains;
their evals) run side by side, --parallel at a time: each tiny run is host-bound alone, so a dozen share
one GPU. A run whose output directory or JSON exists is not repeated, so an interrupted sweep continues.
One `eval lm` per chain scores every S: the ensemble's report carries the mixtures of its first S members.

    python benchmarks/bayes_c2.py --parallel 15 --sgld-lrs 1e-4 3e-4 1e-3 3e-3   # GPU: 430 s on an H100
                                                                                 # (data built into --work if missing)
    python benchmarks/bayes_c2.py --smoke --work /tmp/c2      # CPU, toy sizes, about a minute
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

from common import run_processes

from leanserve.atomic import atomic_write_text
from leanserve.cli import main as leanserve
from leanserve.eval.plots import Series, line_plot
from leanserve.eval.report import hardware, provenance

RESULTS = Path(__file__).parent / "results" / "bayes_eval.json"
DOMAINS = ("code", "docs")  # in-domain, shifted
BASELINES = ("map", "last_sample", "logit_average")  # what the ensemble is paired against, seed by seed
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}

MODEL = ["--preset", "chat-tiny", "--layers", "4", "--hidden-size", "256", "--heads", "4", "--kv-heads", "2",
         "--intermediate-size", "768", "--max-len", "256", "--seq-len", "256"]
SMOKE_MODEL = ["--preset", "tiny", "--max-len", "64", "--seq-len", "64"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="build/bayes_c2", help="data, models and per-seed results")
    p.add_argument("--data", help="a `leanserve data build` directory (default: built into --work)")
    p.add_argument("--tokenizer", help="a tokenizer directory (default: trained into --work)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.3])
    p.add_argument("--members", type=int, default=16, help="S, members per chain")
    p.add_argument("--map-epochs", type=float, default=10.0)
    p.add_argument("--sgld-lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4, 1e-3, 3e-3],
                   help="step sizes tried by short pilot chains (T = the first --temperatures, 2 members); each "
                        "seed samples with the largest whose last single sample keeps the code val NLL within "
                        "--max-val-increase of the MAP's (the smallest if none does). One value: no pilot")
    p.add_argument("--max-val-increase", type=float, default=0.03, help="relative, for the pilot (spec: 1-3%%)")
    p.add_argument("--prior-var", type=float, default=0.2, help="prior variance σ_p² (λ = 1/(N σ_p²))")
    p.add_argument("--burn-in-epochs", type=float, default=1.0)
    p.add_argument("--thin-epochs", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--parallel", type=int, default=1, help="runs side by side (processes)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--results", default=str(RESULTS), help="the JSON the rows are merged into (key c2)")
    p.add_argument("--smoke", action="store_true", help="CPU, a toy data build, tiny model and chains")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.members, args.temperatures = "cpu", 4, [1.0, 0.3]
        args.batch_size, args.map_epochs, args.burn_in_epochs, args.thin_epochs = 4, 2.0, 0.25, 0.1
        args.sgld_lrs = [1e-4, 1e-3]
    return args


def run(*argv) -> None:
    words = [str(a) for a in argv]
    if leanserve(words) != 0:
        raise SystemExit(f"failed: leanserve {' '.join(words)}")


# --------------------------------------------------------------------------- shared inputs

def prepare(args) -> tuple[Path, Path]:
    work = Path(args.work)
    data = Path(args.data) if args.data else work / "data"
    tok = Path(args.tokenizer) if args.tokenizer else work / "tokenizer"
    if not (data / "manifest.json").is_file():
        smoke = ["--max-docs", "60", "--num-tasks", "10", "--max-file-bytes", "8000"] if args.smoke else []
        run("data", "build", "--out", data, *smoke)
    if not (tok / "tokenizer.json").is_file():
        run("data", "tokenizer", "--data", data, "--out", tok, *(["--vocab-size", "512"] if args.smoke else []))
    return data, tok


def code_train_tokens(data: Path, tok: Path) -> int:
    """N: what train sgld conditions on with --mix code=1 (read as it reads it)."""
    from leanserve.data.build import load_manifest
    from leanserve.data.lm_data import encode_documents, load_tokenizer, read_split

    rows = read_split(data, load_manifest(data), "code", "train")
    return len(encode_documents(load_tokenizer(tok), [r["text"] for r in rows]))


# --------------------------------------------------------------------------- the runs

def leanserve_argv(*argv) -> list[str]:
    return [sys.executable, "-m", "leanserve.cli", *(str(a) for a in argv)]


class Seed:
    """One seed's directories, step counts and the `leanserve` commands of its runs."""

    def __init__(self, args, seed: int, data: Path, tok: Path, n: int):
        self.args, self.seed, self.data, self.tok, self.n = args, seed, data, tok, n
        self.work = Path(args.work) / f"seed{seed}"
        seq_len = 64 if args.smoke else 256
        # steps per pass over the code train tokens (smoke: a fixed few, whatever the toy data holds)
        self.epoch = 10 if args.smoke else max(1, round(n / (args.batch_size * seq_len)))
        self.map_dir = self.work / "map"
        self.weight_decay = 1 / (n * args.prior_var)  # λ of the Gaussian prior
        self.common = ["--batch-size", args.batch_size, "--seed", seed, "--device", args.device]

    def train_map(self) -> list[str]:
        a = self.args
        return leanserve_argv(
            "train", "lm", "--data", self.data, "--tokenizer", self.tok, "--out", self.map_dir,
            *(SMOKE_MODEL if a.smoke else MODEL), "--mix", "code=1", "--chat-steps", "0",
            "--pretrain-steps", max(1, round(a.map_epochs * self.epoch)), "--lr", "1e-3", "--weight-decay", "0.1",
            "--save-dtype", "float32", "--eval-every", max(1, self.epoch // 4), *self.common)

    def chain(self, out: Path, t: float, lr: float, members: int) -> list[str]:
        a = self.args
        return leanserve_argv(
            "train", "sgld", "--from", self.map_dir, "--data", self.data, "--out", out, "--mix", "code=1",
            "--temperature", t, "--precond", "frozen_rmsprop", "--lr", lr, "--weight-decay", self.weight_decay,
            "--burn-in", max(1, round(a.burn_in_epochs * self.epoch)),
            "--thin", max(1, round(a.thin_epochs * self.epoch)), "--num-members", members, "--scope", "full",
            "--eval-every", max(1, self.epoch // 2), "--eval-batches", 4 if a.smoke else 16, *self.common)

    def evaluate(self, model: Path, out: Path) -> list[str]:
        return leanserve_argv(
            "eval", "lm", "--model", model, "--data", self.data, "--domains", ",".join(DOMAINS), "--no-tasks",
            "--dtype", "float32", "--device", self.args.device, "--out", out,
            *(["--max-docs", "8"] if self.args.smoke else []))

    def pilot_dir(self, lr: float) -> Path:
        return self.work / f"pilot_lr{lr:g}"

    def pilots(self) -> list[float]:
        return sorted(self.args.sgld_lrs) if len(self.args.sgld_lrs) > 1 else []

    def pilot_results(self) -> list[dict]:
        out = []
        for lr in self.pilots():
            if not (self.pilot_dir(lr) / "leanserve.json").is_file():  # train sgld stopped: the chain diverged
                out.append({"lr": lr, "diverged": True})
                continue
            val = metrics(self.pilot_dir(lr))["val_nll"]
            out.append({"lr": lr, "diverged": False, "map": val["map"]["code"],
                        "last_sample": val["last_sample"]["code"], "ensemble": val["ensemble"]["code"]})
        return out

    def chosen_lr(self) -> float:
        """The largest pilot step size whose last single sample keeps the code val NLL within
        --max-val-increase of the MAP's (the smallest tried if none does)."""
        within = [p["lr"] for p in self.pilot_results()
                  if not p["diverged"] and p["last_sample"] <= (1 + self.args.max_val_increase) * p["map"]]
        return max(within) if within else min(self.args.sgld_lrs)

    def chain_name(self, t: float) -> str:
        return f"sgld_T{t:g}_lr{self.chosen_lr():g}"


def metrics(model_dir: Path) -> dict:
    return json.loads((model_dir / "leanserve.json").read_text())["metrics"]


def row(arm: str, s: int, seed: int, domain: str, m: dict, temperature: float | None = None) -> dict:
    keys = ("nll", "ece", "brier", "accuracy", "nll_ts", "temperature")
    return {"arm": arm, "S": s, "seed": seed, "domain": domain, "sgld_temperature": temperature,
            **{("ts_temperature" if k == "temperature" else k): m.get(k) for k in keys}}


def run_phases(args, seeds: list[Seed]) -> None:
    """MAP, then pilot chains and the MAP's eval, then the sampling chains, then their evals: each phase's
    unfinished runs side by side (--parallel processes). A run whose output exists is not repeated."""
    def run_jobs(jobs, allow_failure=False) -> list[str]:
        return run_processes(jobs, args.parallel, Path(args.work) / "logs", env=env, allow_failure=allow_failure)

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.parallel)), "TOKENIZERS_PARALLELISM": "false"}
    done = lambda d: (d / "leanserve.json").is_file()  # noqa: E731
    run_jobs([(f"seed{s.seed}_map", s.train_map()) for s in seeds if not done(s.map_dir)])
    # a pilot may diverge (train sgld stops with an error): it is a step size too large, not a failure
    failed = run_jobs([(f"seed{s.seed}_eval_map", s.evaluate(s.map_dir, s.work / "eval_map.json"))
                       for s in seeds if not (s.work / "eval_map.json").is_file()]
                      + [(f"seed{s.seed}_pilot_lr{lr:g}", s.chain(s.pilot_dir(lr), args.temperatures[0], lr, 2))
                         for s in seeds for lr in s.pilots() if not done(s.pilot_dir(lr))], allow_failure=True)
    if broken := [name for name in failed if "_pilot_" not in name]:
        raise SystemExit(f"failed: {', '.join(broken)}; see {args.work}/logs")
    chains = [(s, t, s.chain_name(t)) for s in seeds for t in args.temperatures]
    run_jobs([(f"seed{s.seed}_{name}", s.chain(s.work / name, t, s.chosen_lr(), args.members))
              for s, t, name in chains if not done(s.work / name)])
    run_jobs([(f"seed{s.seed}_eval_{name}", s.evaluate(s.work / name, s.work / f"eval_{name}.json"))
              for s, _, name in chains if not (s.work / f"eval_{name}.json").is_file()])


def seed_result(args, s: Seed) -> dict:
    """One seed's rows: MAP; per temperature the ensemble at each S (the first S members' mixture), the
    logit average of all members and the last member alone."""
    rows = [row("map", 1, s.seed, d, m)
            for d, m in json.loads((s.work / "eval_map.json").read_text())["calibration"].items()]
    chains = []
    for t in args.temperatures:
        name = s.chain_name(t)
        result = json.loads((s.work / f"eval_{name}.json").read_text())
        ens = result["ensemble"]
        for d, m in result["calibration"].items():
            rows += [row("ensemble", int(k), s.seed, d, p, t) for k, p in ens["prefix_mixtures"][d].items()]
            rows += [row("ensemble", args.members, s.seed, d, m, t),
                     row("logit_average", args.members, s.seed, d, ens["logit_average"][d], t),
                     row("last_sample", 1, s.seed, d, ens["members"][d][-1], t)]
        chain = metrics(s.work / name)
        chains.append({"seed": s.seed, "sgld_temperature": t, "lr": s.chosen_lr(), "val_nll": chain["val_nll"],
                       "members_val_nll": [m["val_nll"] for m in chain["members"]]})
    map_info = json.loads((s.map_dir / "leanserve.json").read_text())
    return {"seed": s.seed, "code_train_tokens": s.n, "steps_per_epoch": s.epoch, "weight_decay": s.weight_decay,
            "pilot": s.pilot_results(), "sgld_lr": s.chosen_lr(), "rows": rows, "chains": chains,
            "map_val_history": map_info["metrics"]["val_history"], "map_recipe": map_info["recipe"]["command"]}


# --------------------------------------------------------------------------- over seeds

def paired(rows: list[dict], temperatures: list[float], s_max: int, base_arm: str) -> list[dict]:
    """ensemble(S = max) − base_arm per seed, per domain and temperature: mean and 95% t-interval. The MAP
    is one per seed; the last sample and the logit average belong to the chain of that temperature."""
    out = []
    for t in temperatures:
        for d in DOMAINS:
            ens = {r["seed"]: r for r in rows if r["arm"] == "ensemble" and r["S"] == s_max
                   and r["sgld_temperature"] == t and r["domain"] == d}
            base = {r["seed"]: r for r in rows if r["arm"] == base_arm and r["domain"] == d
                    and r["sgld_temperature"] in (None, t)}
            seeds = sorted(set(ens) & set(base))
            entry = {"sgld_temperature": t, "domain": d, "S": s_max, "seeds": seeds}
            for key in ("nll", "ece", "brier"):
                diffs = [ens[s][key] - base[s][key] for s in seeds]
                mean = statistics.fmean(diffs) if diffs else None
                half = (T_975[len(diffs) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs))
                        if 1 < len(diffs) <= 11 else None)
                entry[key] = {"diffs": diffs, "mean": mean,
                              "ci95": None if half is None else [mean - half, mean + half]}
            out.append(entry)
    return out


def plot(rows: list[dict], temperatures: list[float], results: Path) -> list[str]:
    paths = []
    for d in DOMAINS:
        series = []
        for t in temperatures:
            by_s: dict[int, list[float]] = {}
            for r in rows:
                if r["arm"] == "ensemble" and r["sgld_temperature"] == t and r["domain"] == d:
                    by_s.setdefault(r["S"], []).append(r["nll"])
            xs = sorted(by_s)
            series.append(Series(f"SGLD ensemble, T={t:g}", xs, [statistics.fmean(by_s[x]) for x in xs],
                                 yerr=[statistics.pstdev(by_s[x]) for x in xs]))
            logit = [r["nll"] for r in rows if r["arm"] == "logit_average" and r["sgld_temperature"] == t
                     and r["domain"] == d]
            if logit and xs:
                series.append(Series(f"logit average, T={t:g}", [xs[-1]], [statistics.fmean(logit)], fmt="s"))
        map_nll = [r["nll"] for r in rows if r["arm"] == "map" and r["domain"] == d]
        xs = sorted({r["S"] for r in rows if r["arm"] == "ensemble"})
        if map_nll and xs:
            series.append(Series("MAP", [xs[0], xs[-1]], [statistics.fmean(map_nll)] * 2, fmt=":"))
        path = results.with_name(f"{results.stem}_c2_nll_vs_s_{d}.png")
        line_plot(series, path, title=f"C2: test NLL vs members ({d}{', shifted' if d == 'docs' else ''}; "
                  f"mean ± std over seeds)", xlabel="members S", ylabel="NLL (nats/token)")
        paths.append(path.name)
    return paths


def aggregate(args, per_seed: list[dict]) -> None:
    results = Path(args.results)
    rows = [r for s in per_seed for r in s["rows"]]
    c2 = {**provenance(), "hardware": hardware(), "smoke": args.smoke, "seeds": [s["seed"] for s in per_seed],
          "settings": {k: getattr(args, k) for k in ("temperatures", "members", "map_epochs", "sgld_lrs",
                                                     "max_val_increase", "prior_var", "burn_in_epochs", "thin_epochs",
                                                     "batch_size")},
          "pilots": {s["seed"]: {"chosen_lr": s["sgld_lr"], "tried": s["pilot"]} for s in per_seed},
          "code_train_tokens": per_seed[0]["code_train_tokens"], "steps_per_epoch": per_seed[0]["steps_per_epoch"],
          "map_recipes": [s["map_recipe"] for s in per_seed],
          "map_val_history": {s["seed"]: s["map_val_history"] for s in per_seed},
          "chains": [c for s in per_seed for c in s["chains"]],
          **{f"paired_ensemble_minus_{base}": paired(rows, args.temperatures, args.members, base)
             for base in BASELINES},
          "rows": rows}
    c2["plots"] = plot(rows, args.temperatures, results)
    merged = json.loads(results.read_text()) if results.is_file() else {}
    merged["c2"] = c2  # other experiments' keys stay
    results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results, json.dumps(merged, indent=2) + "\n")
    print(f"wrote key c2 of {results}")
    for base in BASELINES:
        for p in c2[f"paired_ensemble_minus_{base}"]:
            nll = p["nll"]
            ci = "" if nll["ci95"] is None else f" (95% CI {nll['ci95'][0]:+.4f} .. {nll['ci95'][1]:+.4f})"
            print(f"T={p['sgld_temperature']:g} {p['domain']}: NLL ensemble(S={p['S']}) - {base} = "
                  f"{nll['mean']:+.4f}{ci}, ECE {p['ece']['mean']:+.4f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)  # --data and --tokenizer given: nothing else creates it
    data, tok = prepare(args)
    n = code_train_tokens(data, tok)
    seeds = [Seed(args, seed, data, tok, n) for seed in args.seeds]
    run_phases(args, seeds)
    aggregate(args, [seed_result(args, s) for s in seeds])
    return 0


if __name__ == "__main__":
    sys.exit(main())
