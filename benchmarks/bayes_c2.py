"""C2: an SGLD ensemble against its single MAP checkpoint on a tiny code LM (one GPU).

Per seed: (1) the MAP, a tiny Llama (4 layers, d 256, 4 heads / 2 KV heads, MLP 768, context 256; ~5.3M
parameters with the 8k BPE vocabulary, 2.1M of them the tied embedding) trained by `leanserve train lm`
on the code domain only (Python stdlib source, split by file), pretraining phase only, AdamW
(lr 1e-3, wd 0.1, cosine to 1e-4), for --map-epochs passes over the code train tokens (3 by default).
Measured on an H100: after 3 epochs the code val loss was still falling (0.02-0.03 over the last 65
steps) and SGLD samples then beat the MAP on their own, so raise --map-epochs until the reported val
history has turned (train lm has no early stopping) before reading ensemble - MAP as posterior averaging;
ensemble - last sample is the comparison that does not depend on it.
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
last sample, ensemble: is the single sample within a few % of the MAP?), the paired differences
ensemble(S = max) − MAP over seeds with 95% t-intervals per domain and temperature, and one PNG of
NLL against S per domain beside it.

Every step skips what a previous run already finished (its output directory or JSON), so an
interrupted run continues. Seeds run one after another, or as --parallel N processes on one GPU.

    python benchmarks/bayes_c2.py --parallel 3                # GPU; data built into --work if missing
    python benchmarks/bayes_c2.py --smoke --work /tmp/c2      # CPU, toy sizes, about a minute
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from leanserve.atomic import atomic_write_text
from leanserve.cli import main as leanserve
from leanserve.eval.plots import Series, line_plot
from leanserve.eval.report import provenance

RESULTS = Path(__file__).parent / "results" / "bayes_eval.json"
DOMAINS = ("code", "docs")  # in-domain, shifted
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
    p.add_argument("--map-epochs", type=float, default=3.0)
    p.add_argument("--sgld-lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4, 1e-3, 3e-3],
                   help="step sizes tried by short pilot chains (T = the first --temperatures, 2 members); each "
                        "seed samples with the largest whose last single sample keeps the code val NLL within "
                        "--max-val-increase of the MAP's (the smallest if none does). One value: no pilot")
    p.add_argument("--max-val-increase", type=float, default=0.03, help="relative, for the pilot (spec: 1-3%%)")
    p.add_argument("--prior-var", type=float, default=0.2, help="prior variance σ_p² (λ = 1/(N σ_p²))")
    p.add_argument("--burn-in-epochs", type=float, default=1.0)
    p.add_argument("--thin-epochs", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--parallel", type=int, default=1, help="seeds run as this many processes at once")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--results", default=str(RESULTS), help="the JSON the rows are merged into (key c2)")
    p.add_argument("--smoke", action="store_true", help="CPU, a toy data build, tiny model and chains")
    p.add_argument("--only-seed", type=int, help=argparse.SUPPRESS)  # a --parallel worker
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


# --------------------------------------------------------------------------- one seed

def eval_json(args, data: Path, model: Path, out: Path, *flags) -> dict:
    if not out.is_file():
        run("eval", "lm", "--model", model, "--data", data, "--domains", ",".join(DOMAINS), "--no-tasks",
            "--dtype", "float32", "--device", args.device, "--out", out, *(["--max-docs", "8"] if args.smoke else []),
            *flags)
    return json.loads(out.read_text())


def row(arm: str, s: int, seed: int, domain: str, metrics: dict, temperature: float | None = None) -> dict:
    keys = ("nll", "ece", "brier", "accuracy", "nll_ts", "temperature")
    return {"arm": arm, "S": s, "seed": seed, "domain": domain, "sgld_temperature": temperature,
            **{("ts_temperature" if k == "temperature" else k): metrics.get(k) for k in keys}}


def run_seed(args, seed: int, data: Path, tok: Path) -> dict:
    work = Path(args.work) / f"seed{seed}"
    n = code_train_tokens(data, tok)
    seq_len = 64 if args.smoke else 256
    # steps per pass over the code train tokens (smoke: a fixed few, whatever the toy data holds)
    epoch = 10 if args.smoke else max(1, round(n / (args.batch_size * seq_len)))
    common = ["--batch-size", args.batch_size, "--seed", seed, "--device", args.device]
    map_dir = work / "map"
    if not (map_dir / "leanserve.json").is_file():
        run("train", "lm", "--data", data, "--tokenizer", tok, "--out", map_dir,
            *(SMOKE_MODEL if args.smoke else MODEL), "--mix", "code=1", "--chat-steps", "0",
            "--pretrain-steps", max(1, round(args.map_epochs * epoch)), "--lr", "1e-3", "--weight-decay", "0.1",
            "--save-dtype", "float32", "--eval-every", max(1, epoch // 4), *common)
    map_info = json.loads((map_dir / "leanserve.json").read_text())
    rows, chains = [], []
    for d, m in eval_json(args, data, map_dir, work / "eval_map.json")["calibration"].items():
        rows.append(row("map", 1, seed, d, m))
    lambda_ = 1 / (n * args.prior_var)
    burn_in, thin = max(1, round(args.burn_in_epochs * epoch)), max(1, round(args.thin_epochs * epoch))

    def chain(out: Path, t: float, lr: float, members: int) -> dict:
        if not (out / "leanserve.json").is_file():
            run("train", "sgld", "--from", map_dir, "--data", data, "--out", out, "--mix", "code=1",
                "--temperature", t, "--precond", "frozen_rmsprop", "--lr", lr, "--weight-decay", lambda_,
                "--burn-in", burn_in, "--thin", thin, "--num-members", members, "--scope", "full",
                "--eval-every", max(1, epoch // 2), "--eval-batches", 4 if args.smoke else 16, *common)
        return json.loads((out / "leanserve.json").read_text())["metrics"]

    pilot = []
    for lr in sorted(args.sgld_lrs) if len(args.sgld_lrs) > 1 else []:
        val = chain(work / f"pilot_lr{lr:g}", args.temperatures[0], lr, 2)["val_nll"]
        pilot.append({"lr": lr, "map": val["map"]["code"], "last_sample": val["last_sample"]["code"],
                      "ensemble": val["ensemble"]["code"]})
    within = [p["lr"] for p in pilot if p["last_sample"] <= (1 + args.max_val_increase) * p["map"]]
    lr = max(within) if within else min(args.sgld_lrs)
    for t in args.temperatures:
        name = f"sgld_T{t:g}_lr{lr:g}"
        metrics = chain(work / name, t, lr, args.members)
        chains.append({"seed": seed, "sgld_temperature": t, "lr": lr, "val_nll": metrics["val_nll"],
                       "members_val_nll": [m["val_nll"] for m in metrics["members"]]})
        sizes = [s for s in (2 ** i for i in range(8)) if s < args.members] + [args.members]
        for s in sizes:
            flags = [] if s == args.members else ["--members", s]
            result = eval_json(args, data, work / name, work / f"eval_{name}_S{s}.json", *flags)
            for d, m in result["calibration"].items():
                rows.append(row("ensemble", s, seed, d, m, t))
            if s == args.members:
                for d in result["calibration"]:
                    rows.append(row("logit_average", s, seed, d, result["ensemble"]["logit_average"][d], t))
                    rows.append(row("last_sample", 1, seed, d, result["ensemble"]["members"][d][-1], t))
    out = {"seed": seed, "code_train_tokens": n, "steps_per_epoch": epoch, "weight_decay": lambda_, "pilot": pilot,
           "sgld_lr": lr, "rows": rows, "chains": chains,
           "map_val_history": map_info["metrics"]["val_history"], "map_recipe": map_info["recipe"]["command"]}
    atomic_write_text(work / "rows.json", json.dumps(out, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------- over seeds

def paired(rows: list[dict], temperatures: list[float], s_max: int) -> list[dict]:
    """ensemble(S = max) − MAP per seed, per domain and temperature: mean and 95% t-interval."""
    out = []
    for t in temperatures:
        for d in DOMAINS:
            ens = {r["seed"]: r for r in rows if r["arm"] == "ensemble" and r["S"] == s_max
                   and r["sgld_temperature"] == t and r["domain"] == d}
            base = {r["seed"]: r for r in rows if r["arm"] == "map" and r["domain"] == d}
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
    c2 = {**provenance(), "smoke": args.smoke, "seeds": [s["seed"] for s in per_seed],
          "settings": {k: getattr(args, k) for k in ("temperatures", "members", "map_epochs", "sgld_lrs",
                                                     "max_val_increase", "prior_var", "burn_in_epochs", "thin_epochs",
                                                     "batch_size")},
          "pilots": {s["seed"]: {"chosen_lr": s["sgld_lr"], "tried": s["pilot"]} for s in per_seed},
          "code_train_tokens": per_seed[0]["code_train_tokens"], "steps_per_epoch": per_seed[0]["steps_per_epoch"],
          "map_recipes": [s["map_recipe"] for s in per_seed],
          "map_val_history": {s["seed"]: s["map_val_history"] for s in per_seed},
          "chains": [c for s in per_seed for c in s["chains"]],
          "paired_ensemble_minus_map": paired(rows, args.temperatures, args.members),
          "rows": rows}
    c2["plots"] = plot(rows, args.temperatures, results)
    merged = json.loads(results.read_text()) if results.is_file() else {}
    merged["c2"] = c2  # other experiments' keys stay
    results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results, json.dumps(merged, indent=2) + "\n")
    print(f"wrote key c2 of {results}")
    for p in c2["paired_ensemble_minus_map"]:
        nll = p["nll"]
        ci = "" if nll["ci95"] is None else f" (95% CI {nll['ci95'][0]:+.4f} .. {nll['ci95'][1]:+.4f})"
        print(f"T={p['sgld_temperature']:g} {p['domain']}: NLL ensemble(S={p['S']}) - MAP = {nll['mean']:+.4f}{ci}")


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)  # --data and --tokenizer given: nothing else creates it
    data, tok = prepare(args)
    if args.only_seed is not None:
        run_seed(args, args.only_seed, data, tok)
        return 0
    if args.parallel > 1:
        forwarded = list(sys.argv[1:] if argv is None else argv)
        pending = list(args.seeds)
        running = []
        while pending or running:
            while pending and len(running) < args.parallel:
                seed = pending.pop(0)
                log = open(Path(args.work) / f"seed{seed}.log", "w")
                running.append((seed, log, subprocess.Popen([sys.executable, __file__, *forwarded, "--only-seed",
                                                             str(seed)], stdout=log, stderr=subprocess.STDOUT)))
            seed, log, proc = running.pop(0)
            code = proc.wait()
            log.close()
            if code != 0:
                raise SystemExit(f"seed {seed} failed: see {args.work}/seed{seed}.log")
        per_seed = [json.loads((Path(args.work) / f"seed{s}" / "rows.json").read_text()) for s in args.seeds]
    else:
        per_seed = [run_seed(args, seed, data, tok) for seed in args.seeds]
    aggregate(args, per_seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
