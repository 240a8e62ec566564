"""MoDoMoDo at small scale (the data-mixing spec's B.9 experiment): pilot RLVR runs over task mixtures, a
Scheffé surrogate of their Out-Score, and multi-seed confirmation of its best mixtures against uniform.

  1. data: `leanserve data build --task-kinds add,sort,reverse,count --answer-tags --max-digits 3` (the
     out-of-distribution tasks are never built, so never trained: not in pretraining, SFT or RL) and its BPE
     tokenizer. Sums of 2-3 digits: with 2-5 the SFT policy solved 0.2% of them (results/modomodo_eval.json,
     commit 5fc4f2d), which gives GRPO no signal
  2. policy: `leanserve train lm` (chat-tiny, ~5.3M params): 1,500 pretraining steps on the task text, then
     500 chat steps on the tagged answers (the SFT warm-up; 600 + 400 in that first run). Its pass rates per task are recorded (`base`); GRPO
     needs them strictly between 0 and 1 (the spec aims at 10-60%; `warnings` names tasks outside that)
  3. pilots (seed 0): the 2m+1 seed mixtures (each task alone, each left out, uniform) and Dirichlet(1)
     mixtures, then the heuristics computed from their scores (Norm, A_bal, A_in, A_out, Coli):
     m = 4 -> 9 + 7 + 5 = 21 `leanserve train rlvr` runs (GRPO, group 8, 8 prompts a step, a fixed 300 steps,
     KL 0.04 to the SFT policy, LR 1e-4: the top of the spec's range, as a tiny policy moves slowly)
  4. fit: `leanserve mixture fit` on the pilots' Out-Scores (Scheffé quadratic and linear, LOO R²), the
     top 3 of the quadratic in the trust region (L1 0.4 around the pilots)
  5. confirm: the top 3, uniform and the best observed pilot, seeds 0-2 (a seed-0 run already done as a
     pilot is reused); paired differences of Out-Score against uniform per seed with a 95% t-interval.
     Claims: quadratic LOO R² > linear; candidate_1 (the best *predicted*) beats uniform with an interval
     excluding 0; it beats the best observed pilot on mean Out-Score
Scores: greedy replies to fixed task sets, format-gated accuracy in [0, 1] (sort: positional partial credit;
data/rewards.py). In-tasks: the build's test split of add, sort, reverse, count (held out by prompt). Out-tasks
(generated here, --eval-items each), one step past training: subtraction of 2-3 digits, and inputs just longer
than trained: 4-digit addition, 11-12 letter reversal, sorting 9 numbers, counting in 21-25 letters (the first
run asked 6 digits, 11-14 letters, 9-10 numbers, 21-30 letters: three of its five tasks scored 0 for every
policy). In-/Out-Score: size-weighted means.

Writes benchmarks/results/modomodo_eval.json: settings, base scores, pilots [{name, kind, mixture, seed,
in_score, out_score, by_task}], fits (loo_r2 per surrogate), candidates, confirm [{name, mixture, seed,
in_score, out_score}], paired deltas vs uniform and the claims; and modomodo_eval.png (LOO-predicted vs
observed Out-Score of the pilots for both surrogates, and predicted vs mean observed of the confirmed).

Runs are tiny and host-bound, so they run side by side: --parallel worker processes on one GPU, each with
one CPU thread, each importing torch once. Finished runs (their scores.json) are skipped, so an interrupted
sweep continues where it stopped when run again with the same --work.

    python benchmarks/modomodo_experiment.py --work build/modomodo              # GPU (one H100)
    python benchmarks/modomodo_experiment.py --smoke --work /tmp/mdmd --out /tmp/mdmd/eval.json   # CPU, < 1 min

GPU time (measured, H100, --steps 200): data build, tokenizer and SFT ~1.5 min; the 16 first pilots side by side
192 s (167 s of training a run, then greedy scoring), the 5 heuristic pilots 70 s, the 10 new confirmation runs
118 s: 7 minutes in all (results/modomodo_eval.json). The default 300 steps adds about half of the RL time.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # two-sided 95% Student t by degrees of freedom


@dataclass(frozen=True)
class Scale:
    in_tasks: tuple[str, ...]
    build: tuple[str, ...]          # extra `data build` options
    vocab_size: int
    sft: tuple[str, ...]            # `train lm` options
    rl: tuple[str, ...]             # `train rlvr` options (besides mixture, seed, paths)
    dirichlet: int                  # Dirichlet(1) pilots
    heuristics: tuple[str, ...]
    top_k: int
    seeds: int                      # confirmation seeds
    eval_items: int                 # items per out-task (in-tasks: the build's test split, at most this many)
    max_new_tokens: int
    parallel: int
    device: str
    fit_samples: int


FULL = Scale(
    in_tasks=("add", "sort", "reverse", "count"),
    build=("--max-docs", "40", "--num-tasks", "20000,400,2000", "--max-digits", "3"),
    vocab_size=2048,
    sft=("--preset", "chat-tiny", "--seq-len", "128", "--batch-size", "64", "--pretrain-steps", "1500",
         "--chat-steps", "500", "--mix", "tasks=1", "--eval-every", "200", "--save-every", "10000"),
    rl=("--steps", "300", "--prompts", "8", "--group-size", "8", "--lr", "1e-4", "--beta", "0.04",
        "--max-new-tokens", "40", "--eval-every", "100", "--eval-prompts", "32", "--save-every", "100"),
    dirichlet=7, heuristics=("norm", "a_bal", "a_in", "a_out", "coli"), top_k=3, seeds=3, eval_items=500,
    max_new_tokens=48, parallel=16, device="cuda", fit_samples=100_000)
SMOKE = Scale(
    in_tasks=("add", "reverse"),
    build=("--max-docs", "2", "--num-tasks", "200,8,16"),
    vocab_size=400,
    sft=("--preset", "tiny", "--seq-len", "64", "--batch-size", "8", "--pretrain-steps", "2", "--chat-steps", "4",
         "--mix", "tasks=1", "--eval-every", "1000", "--eval-batches", "1"),
    rl=("--steps", "2", "--prompts", "2", "--group-size", "2", "--max-new-tokens", "8", "--eval-every", "100",
        "--eval-prompts", "2"),
    dirichlet=0, heuristics=("norm", "a_bal"), top_k=1, seeds=2, eval_items=4, max_new_tokens=8, parallel=2,
    device="cpu", fit_samples=2000)


def out_tasks(n: int, seed: int = 7) -> dict[str, list]:
    """The out-of-distribution eval sets: kinds never trained, and longer inputs than training's."""
    from leanserve.data.tasks import generate_task

    # one step past training: new operation at the trained sizes, or inputs just longer than trained
    specs = {"sub": ("sub", {"max_digits": 3}), "add_4_digits": ("add", {"digits": 4}),
             "reverse_long": ("reverse", {"items": "letters", "length": None}),
             "sort_long": ("sort", {"items": "numbers", "length": None}),
             "count_long": ("count", {"items": "letters", "length": None})}
    lengths = {"reverse_long": (11, 12), "sort_long": (9, 9), "count_long": (21, 25)}
    sets = {}
    for name, (kind, params) in specs.items():
        rng = random.Random(f"{seed}/{name}")
        items = []
        for _ in range(n):
            p = dict(params)
            if name in lengths:
                p["length"] = rng.randint(*lengths[name])
            items.append(generate_task(kind, rng, **p))
        sets[name] = items
    return sets


def in_tasks(data: Path, kinds: tuple[str, ...], n: int) -> dict[str, list]:
    from leanserve.data.build import load_manifest
    from leanserve.data.lm_data import read_split
    from leanserve.data.tasks import Task

    rows = read_split(data, load_manifest(data), "tasks", "test")
    return {k: [Task.from_row(r) for r in rows if r["kind"] == k][:n] for k in kinds}


def score(model_dir: Path, data: Path, scale: Scale) -> dict:
    """Format-gated greedy accuracy per task; In-/Out-Score as size-weighted means."""
    import torch
    from transformers import AutoModelForCausalLM

    from leanserve.data.lm_data import load_tokenizer
    from leanserve.data.rewards import reward
    from leanserve.eval.lm import greedy_answers
    from leanserve.trainers.loop import bf16_autocast

    device = torch.device(scale.device)
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    result = {}
    for part, sets in (("in", in_tasks(data, scale.in_tasks, scale.eval_items)), ("out", out_tasks(scale.eval_items))):
        by_task, sizes = {}, {}
        for name, tasks in sets.items():
            with bf16_autocast("auto", device)():
                replies = greedy_answers(model, tok, [t.prompt for t in tasks], batch_size=256,
                                         max_new_tokens=scale.max_new_tokens, device=device)
            by_task[name] = statistics.fmean(reward(t, r).accuracy for t, r in zip(tasks, replies))
            sizes[name] = len(tasks)
        result[f"{part}_score"] = sum(by_task[k] * sizes[k] for k in by_task) / sum(sizes.values())
        result[f"{part}_by_task"] = by_task
    return result


# --------------------------------------------------------------------------- runs

@dataclass(frozen=True)
class Run:
    name: str          # pilot or candidate name
    kind: str          # seed | dirichlet | heuristic | candidate
    mixture: tuple[float, ...]
    seed: int

    @property
    def key(self) -> str:
        return f"{'-'.join(f'{w:.4f}' for w in self.mixture)}_s{self.seed}"


def rl_argv(run: Run, work: Path, scale: Scale) -> list[str]:
    groups = ",".join(f"{k}=tasks:{k}" for k in scale.in_tasks)
    mixture = "static:" + ",".join(f"{k}={w:.6f}" for k, w in zip(scale.in_tasks, run.mixture))
    return ["train", "rlvr", "--from", str(work / "sft"), "--data", str(work / "data"),
            "--out", str(work / "runs" / run.key), "--groups", groups, "--mixture", mixture, "--seed", str(run.seed),
            "--device", scale.device, *scale.rl]


def init_worker():
    import torch
    torch.set_num_threads(1)  # many small processes side by side, one core each


def do_run(run: Run, work: Path, scale: Scale) -> dict:
    """Train (or resume) one RLVR run and score it; scores.json marks it done."""
    import contextlib

    from leanserve.atomic import atomic_write_text
    from leanserve.cli import main

    out = work / "runs" / run.key
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(out / "train.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        argv = rl_argv(run, work, scale) + (["--resume"] if (out / "checkpoint.pt").is_file() else [])
        if not (out / "config.json").is_file() and main(argv) != 0:
            raise RuntimeError(f"train rlvr failed; see {out / 'train.log'}")
    train_s = time.perf_counter() - started
    result = {**score(out, work / "data", scale), "train_seconds": round(train_s, 1),
              "score_seconds": round(time.perf_counter() - started - train_s, 1)}
    atomic_write_text(out / "scores.json", json.dumps(result, indent=1) + "\n")
    return result


def run_wave(runs: list[Run], work: Path, scale: Scale, pool: ProcessPoolExecutor) -> dict[str, dict]:
    results, todo = {}, {}
    for run in {r.key: r for r in runs}.values():
        done = work / "runs" / run.key / "scores.json"
        if done.is_file():
            results[run.key] = json.loads(done.read_text())
        else:
            todo[run.key] = pool.submit(do_run, run, work, scale)
    started = time.perf_counter()
    for key, future in todo.items():
        results[key] = future.result()
    if todo:
        print(f"wave: {len(todo)} runs in {time.perf_counter() - started:.0f} s "
              f"(train {statistics.fmean(r['train_seconds'] for k, r in results.items() if k in todo):.0f} s a run)",
              flush=True)
    return results


def row(run: Run, result: dict, names: list[str]) -> dict:
    return {"name": run.name, "kind": run.kind, "mixture": dict(zip(names, run.mixture)), "seed": run.seed,
            "in_score": result["in_score"], "out_score": result["out_score"], "in_by_task": result["in_by_task"],
            "out_by_task": result["out_by_task"], "train_seconds": result["train_seconds"]}


# --------------------------------------------------------------------------- stages

def leanserve(*argv: str):
    """A leanserve command in this process (the workers import torch once each; so does the parent)."""
    from leanserve.cli import main

    if main(list(argv)) != 0:
        raise RuntimeError(f"leanserve {' '.join(argv[:2])} failed")


def prepare(work: Path, scale: Scale):
    if not (work / "data" / "manifest.json").is_file():
        leanserve("data", "build", "--out", str(work / "data"), "--task-kinds", ",".join(scale.in_tasks),
                  "--answer-tags", *scale.build)
    if not (work / "tok" / "tokenizer.json").is_file():
        leanserve("data", "tokenizer", "--data", str(work / "data"), "--out", str(work / "tok"),
                  "--vocab-size", str(scale.vocab_size))
    if not (work / "sft" / "leanserve.json").is_file():
        resume = ["--resume"] if (work / "sft" / "checkpoint.pt").is_file() else []
        leanserve("train", "lm", "--data", str(work / "data"), "--tokenizer", str(work / "tok"),
                  "--out", str(work / "sft"), "--device", scale.device, *scale.sft, *resume)


def heuristic_runs(pilots: list[tuple[Run, dict]], scale: Scale) -> list[Run]:
    from leanserve.eval import mixture_heuristics as heur

    m = len(scale.in_tasks)
    records = [heur.Record(r.mixture, res["in_score"], res["out_score"]) for r, res in pilots]
    loo = {r.name: res["out_score"] for r, res in pilots if r.name.startswith("exclude_")}
    makers = {"norm": lambda: heur.norm_mixture([loo[f"exclude_{i}"] for i in range(m)]),
              "a_bal": lambda: heur.alpha_mixture(records, 0.5), "a_in": lambda: heur.alpha_mixture(records, 1.0),
              "a_out": lambda: heur.alpha_mixture(records, 0.0), "coli": lambda: heur.coli_mixture(records)}
    runs = []
    for name in scale.heuristics:
        w, fallback = makers[name]()
        runs.append(Run(name + ("_uniform_fallback" if fallback else ""), "heuristic", tuple(w), 0))
    return runs


def paired(confirm: list[dict], name: str, baseline: str) -> dict:
    by_seed = {c["seed"]: c["out_score"] for c in confirm if c["name"] == baseline}
    deltas = [c["out_score"] - by_seed[c["seed"]] for c in confirm if c["name"] == name and c["seed"] in by_seed]
    mean = statistics.fmean(deltas)
    half = T975[len(deltas) - 1] * statistics.stdev(deltas) / len(deltas) ** 0.5 if len(deltas) > 1 else float("inf")
    return {"vs": baseline, "deltas": deltas, "mean": mean, "ci95": [mean - half, mean + half],
            "excludes_zero": mean - half > 0 or mean + half < 0}


def plot(report: dict, path: Path):
    from leanserve.eval.plots import Series, scatter_plot

    observed = [p["out_score"] for p in report["pilots"]]
    series = [Series(f"pilots, LOO {name} (R² {fit['loo_r2'] if fit['loo_r2'] is None else round(fit['loo_r2'], 3)})",
                     fit["loo_predictions"], observed) for name, fit in report["fits"].items()]
    means = {}
    for c in report["confirm"]:
        means.setdefault(c["name"], []).append(c["out_score"])
    predicted = {c["name"]: c["predicted"] for c in report["candidates"]}
    shown = [n for n in means if n in predicted]
    if shown:
        series.append(Series("confirmed candidates (mean of seeds ± sd)", [predicted[n] for n in shown],
                             [statistics.fmean(means[n]) for n in shown],
                             yerr=[statistics.stdev(means[n]) if len(means[n]) > 1 else 0 for n in shown],
                             point_labels=shown))
    scatter_plot(series, path, title="MoDoMoDo: predicted vs observed Out-Score", xlabel="predicted Out-Score",
                 ylabel="observed Out-Score")


def experiment(work: Path, scale: Scale, out: Path, smoke: bool):
    import torch

    from leanserve.cli import main
    from leanserve.eval.mixture_heuristics import seed_mixtures

    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, scale)
    names, m = list(scale.in_tasks), len(scale.in_tasks)
    base = score(work / "sft", work / "data", scale)
    warnings = [f"SFT pass rate of {k} is {v:.2f}, outside [0.1, 0.6]" for k, v in base["in_by_task"].items()
                if not 0.1 <= v <= 0.6]
    print(f"SFT policy: In {base['in_score']:.3f} Out {base['out_score']:.3f} {base['in_by_task']}", flush=True)

    seeds = [Run(n, "seed", tuple(w), 0) for n, w in seed_mixtures(m).items()]
    gen = torch.Generator().manual_seed(1234)
    dirichlet = [Run(f"dirichlet_{i}", "dirichlet", tuple(w.tolist()), 0)
                 for i, w in enumerate(_dirichlet(gen, scale.dirichlet, m))]
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(scale.parallel, mp_context=ctx, initializer=init_worker) as pool:
        first = seeds + dirichlet
        results = run_wave(first, work, scale, pool)
        pilots = [(r, results[r.key]) for r in first]
        heuristics = heuristic_runs(pilots, scale)
        results |= run_wave(heuristics, work, scale, pool)
        pilots += [(r, results[r.key]) for r in heuristics]

        pilot_rows = [row(r, res, names) for r, res in pilots]
        pilots_file = work / "pilots.json"
        pilots_file.write_text(json.dumps({"groups": names, "pilots": pilot_rows}, indent=1))
        assert main(["mixture", "fit", "--pilots", str(pilots_file), "--out", str(work / "fit.json"),
                     "--top-k", str(scale.top_k), "--samples", str(scale.fit_samples)]) == 0
        fit = json.loads((work / "fit.json").read_text())

        best_pilot = max(pilot_rows, key=lambda p: p["out_score"])
        arms = [(f"candidate_{i + 1}", "candidate", tuple(c["mixture"][n] for n in names))
                for i, c in enumerate(fit["candidates"])]
        arms += [("uniform", "seed", (1.0 / m,) * m),
                 (f"best_pilot:{best_pilot['name']}", "pilot", tuple(best_pilot["mixture"][n] for n in names))]
        confirm_runs = [Run(name, kind, w, s) for name, kind, w in arms for s in range(scale.seeds)]
        results |= run_wave(confirm_runs, work, scale, pool)
    confirm = [{"name": r.name, "mixture": dict(zip(names, r.mixture)), "seed": r.seed,
                "in_score": results[r.key]["in_score"], "out_score": results[r.key]["out_score"]}
               for r in confirm_runs]
    candidates = [{"name": f"candidate_{i + 1}", **c} for i, c in enumerate(fit["candidates"])]
    # the claim is about the best *predicted* mixture (candidate_1): picking the best of the candidates by
    # the confirmation seeds themselves would bias the interval that tests it; that pick is reported beside it
    best_name = "candidate_1"
    by_mean = max((c["name"] for c in candidates),
                  key=lambda n: statistics.fmean(x["out_score"] for x in confirm if x["name"] == n))
    best_pilot_arm = arms[-1][0]
    vs_uniform = {c["name"]: paired(confirm, c["name"], "uniform") for c in candidates}
    vs_pilot = paired(confirm, best_name, best_pilot_arm)
    fits = {k: {kk: v[kk] for kk in ("loo_r2", "r2", "lambda", "coefficients", "loo_predictions")}
            for k, v in fit["fits"].items()}
    r2 = {k: v["loo_r2"] for k, v in fits.items()}  # None where every pilot scored the same
    report = {
        "experiment": "MoDoMoDo B.9", "smoke": smoke, "settings": asdict(scale), "groups": names,
        "out_tasks": list(out_tasks(1)), "base": base, "warnings": warnings,
        "pilots": pilot_rows, "fits": fits, "candidates": candidates, "confirm": confirm,
        "paired_vs_uniform": vs_uniform, "best_candidate": best_name,
        "best_by_confirmed_mean": by_mean, "best_vs_best_pilot": vs_pilot,
        "claims": {
            "quadratic_loo_r2_above_linear": None not in r2.values() and r2["quadratic"] > r2["linear"],
            "best_beats_uniform_ci_excludes_0": vs_uniform[best_name]["mean"] > 0
            and vs_uniform[best_name]["excludes_zero"],
            "best_beats_best_pilot": vs_pilot["mean"] > 0},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    from leanserve.eval.report import emit_json, hardware
    emit_json({**report, "hardware": hardware(scale.device)}, out)
    plot(report, out.with_suffix(".png"))
    print(json.dumps({"fits": {k: v["loo_r2"] for k, v in fits.items()}, "claims": report["claims"],
                      "best": best_name, "vs_uniform": vs_uniform[best_name]}, indent=1))


def _dirichlet(gen, n: int, m: int) -> list:
    """n Dirichlet(1) mixtures from normalised Gamma draws of `gen` (seeded)."""
    import torch
    g = torch._standard_gamma(torch.ones(n, m, dtype=torch.float64), generator=gen)
    return list(g / g.sum(1, keepdim=True))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="working directory: data, policy, runs (finished runs are kept)")
    p.add_argument("--out", default=str(RESULTS / "modomodo_eval.json"))
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes: the code path in under a minute")
    p.add_argument("--parallel", type=int, help="runs side by side (default 16; smoke 2)")
    p.add_argument("--steps", type=int, help="RLVR steps per run (default 300)")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before the tokenizers fork into workers
    scale = SMOKE if args.smoke else FULL
    if args.parallel:
        scale = replace(scale, parallel=args.parallel)
    if args.steps:
        rl = list(scale.rl)
        rl[rl.index("--steps") + 1] = str(args.steps)
        scale = replace(scale, rl=tuple(rl))
    experiment(Path(args.work), scale, Path(args.out), args.smoke)


if __name__ == "__main__":
    main()
