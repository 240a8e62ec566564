"""Aioli vs stratified data mixing at small scale, paired by seed (the data-mixing spec's A.7 experiment).

Settings (groups of a `leanserve data build`): code+docs and code+arith (m = 2), code+docs+kv (m = 3)
and all five (m = 5), where code = the stdlib sources, docs = their docstrings and pydoc topics,
arith = tasks:add+sub, kv = tasks:retrieval (key-value lookup), sort = tasks:sort. Arms, every one
a `leanserve train lm` run of the same tiny Llama (6 layers, d 384, 6 heads, ctx 256, ~14M params
with the 8k BPE; AdamW 1e-3, 5% warm-up + cosine; batch 32 x 256; 4000 steps = 33M tokens):
  stratified     uniform mixture
  aioli          --mixture aioli: R = 200 (20 rounds), k = 4 (2 for m = 5), lp_steps 4, f 0.6, eta 0.2
  aioli_static   the same, A estimated once after 200 stratified steps, then p fixed
  best_static    best of 10 Dirichlet(1.5) static mixtures, picked on val at seed 0 (its 10 runs are
                 the extra cost), rerun at the other seeds: a reference upper bound, not a method
  aioli_diagonal optional (--arms): the no-transfer ablation
Seeds 0..4 for m <= 3, 0..2 for m = 5; seed fixes the init and the data order of every arm.

Metric: mean over groups of per-group test perplexity (test split, fixed windows; val for picking
the static mixture), and the paired difference arm - stratified per seed with a 95% t-interval.
Writes benchmarks/results/aioli_eval.json: rows {setting, arm, seed, test_ppl_mean, test_ppl_by_group,
...} and per setting the paired deltas; each Aioli run keeps its p^t plot (mixture.png) in its run dir.

Runs are tiny, so they run side by side on one GPU: --parallel worker processes (each imports torch
once and trains run after run). Every run checkpoints every 500 steps and the script skips finished
runs and resumes interrupted ones, so it can be time-boxed (--budget-min) and simply run again.

    python benchmarks/aioli_experiment.py --work build/aioli --budget-min 9     # GPU; repeat until complete
    python benchmarks/aioli_experiment.py --work build/aioli --plan             # the run list and its FLOPs
    python benchmarks/aioli_experiment.py --scale cpu --arms stratified aioli --parallel 2 --work build/aioli-cpu
    python benchmarks/aioli_experiment.py --smoke --work /tmp/aioli-smoke --out /tmp/aioli-smoke/eval.json  # CPU

Cost (--plan): 108 runs, 3.5B tokens, ~305 PFLOP of training. On a 2-thread CPU this model trains at
~750 tokens/s, so the sweep is GPU-only. Measured on one H100 (--steps 2000, 8 processes, while 10
MoDoMoDo processes shared the GPU: a confounded rate): 535k tokens/s together, 46 TFLOP/s, ~5% of the bf16 peak,
which would make --steps 2000 take ~55 minutes; alone it should be faster (the first wave's ETA says). A run's
eval.json is all the report needs: `tar czf runs.tgz build/aioli/runs/*/*/*/eval.json` keeps finished
runs across machines (unpacked into a new --work, they are skipped).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import queue
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SETTINGS = {  # name -> --groups
    "code+docs": "code,docs",
    "code+arith": "code,arith=tasks:add+sub",
    "code+docs+kv": "code,docs,kv=tasks:retrieval",
    "all5": "code,docs,arith=tasks:add+sub,kv=tasks:retrieval,sort=tasks:sort",
}
ARMS = ("stratified", "aioli", "aioli_static", "best_static", "aioli_diagonal")
# two-sided 95% Student t quantiles by degrees of freedom (seeds - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}


@dataclass(frozen=True)
class Scale:
    model: tuple[str, ...]       # train lm shape flags
    seq_len: int
    batch_size: int
    steps: int
    round_steps: int
    sweeps: dict[int, int]       # k by number of groups
    lp_steps: int
    seeds: dict[int, int]        # seeds by number of groups
    num_static: int              # Dirichlet mixtures in the best-static sweep
    save_every: int
    eval_windows: int            # val/test windows per group for the reported metrics
    build: tuple[str, ...]       # `data build` options
    vocab_size: int


FULL = Scale(
    model=("--preset", "tiny", "--hidden-size", "384", "--layers", "6", "--heads", "6", "--kv-heads", "6",
           "--intermediate-size", "1024", "--max-len", "256"),
    seq_len=256, batch_size=32, steps=4000, round_steps=200, sweeps={2: 4, 3: 4, 5: 2}, lp_steps=4,
    seeds={2: 5, 3: 5, 5: 3}, num_static=10, save_every=500, eval_windows=128,
    build=("--num-tasks", "20000,3000,3000"), vocab_size=8192)
# The same experiment at a size two CPU threads finish in 48 minutes (--scale cpu, arms stratified and aioli,
# measured on a 2-core Xeon VM): a ~1M-parameter model, 600 steps of 16 x 128 tokens (1.2M tokens a run), 6 Aioli
# rounds of 100 steps with 2 LearnParams sweeps (1 for m = 5) so that each round still trains mostly on its mixture.
CPU = Scale(
    model=("--preset", "tiny", "--hidden-size", "128", "--layers", "4", "--heads", "4", "--kv-heads", "4",
           "--intermediate-size", "384", "--max-len", "128"),
    seq_len=128, batch_size=16, steps=600, round_steps=100, sweeps={2: 2, 3: 2, 5: 1}, lp_steps=4,
    seeds={2: 5, 3: 5, 5: 3}, num_static=10, save_every=200, eval_windows=64,
    build=FULL.build, vocab_size=2048)
SMOKE = Scale(
    model=("--preset", "tiny"), seq_len=64, batch_size=8, steps=24, round_steps=12, sweeps={2: 1, 3: 1, 5: 1},
    lp_steps=2, seeds={2: 2, 3: 2, 5: 2}, num_static=3, save_every=12, eval_windows=8,
    # 40 stdlib files: the first with code in all three splits
    build=("--max-docs", "40", "--num-tasks", "240,60,60", "--max-retrieval-lines", "8"), vocab_size=400)


@dataclass
class Job:
    setting: str
    arm: str
    seed: int
    mixture: list[str]           # the --mixture flags of the arm
    tag: str = ""                # the sweep index of a static_sweep run
    static_p: list[float] | None = None
    out: str = ""

    @property
    def key(self) -> str:
        return f"{self.setting}/{self.arm}{self.tag}/seed{self.seed}"


@dataclass
class Experiment:
    scale: Scale
    work: Path
    data: Path
    tokenizer: Path
    device: str
    settings: list[str]
    arms: list[str]
    eta: float
    ema: float | None

    def names(self, setting: str) -> list[str]:
        return [part.split("=")[0] for part in SETTINGS[setting].split(",")]

    def job(self, setting: str, arm: str, seed: int, mixture: list[str], tag: str = "",
            static_p: list[float] | None = None) -> Job:
        job = Job(setting, arm, seed, mixture, tag, static_p)
        job.out = str(self.work / "runs" / job.key)
        return job

    def static_flags(self, setting: str, p) -> list[str]:
        return ["--mixture", "static:" + ",".join(f"{n}={w:.6f}" for n, w in zip(self.names(setting), p))]

    def aioli_flags(self, setting: str) -> list[str]:
        s, m = self.scale, len(self.names(setting))
        flags = ["--mixture", "aioli", "--aioli-round-steps", str(s.round_steps), "--aioli-sweeps", str(s.sweeps[m]),
                 "--aioli-lp-steps", str(s.lp_steps), "--aioli-one-hot", "0.6", "--aioli-eta", str(self.eta)]
        return flags + (["--aioli-ema", str(self.ema)] if self.ema is not None else [])

    def sweep_mixtures(self, setting: str) -> list[list[float]]:
        """The static mixtures of the best-static reference: Dirichlet(1.5) draws, fixed per setting."""
        import numpy as np
        rng = np.random.default_rng(list(SETTINGS).index(setting) + 1000)
        return rng.dirichlet([1.5] * len(self.names(setting)), self.scale.num_static).tolist()

    def first_jobs(self) -> list[Job]:
        """Every run that needs no other run's result (all but best_static at seeds > 0); sweeps first,
        so that their winners can start early."""
        jobs = []
        for setting in self.settings:
            if "best_static" in self.arms:
                jobs += [self.job(setting, "static_sweep", 0, self.static_flags(setting, p), tag=f"-{i}", static_p=p)
                         for i, p in enumerate(self.sweep_mixtures(setting))]
        for setting in self.settings:
            m = len(self.names(setting))
            for seed in range(self.scale.seeds[m]):
                arms = {"stratified": ["--mixture", "stratified"], "aioli": self.aioli_flags(setting),
                        "aioli_static": self.aioli_flags(setting) + [
                            "--aioli-prior-steps", str(self.scale.round_steps), "--aioli-max-rounds", "1"],
                        "aioli_diagonal": self.aioli_flags(setting) + ["--aioli-diagonal"]}
                jobs += [self.job(setting, arm, seed, flags) for arm, flags in arms.items() if arm in self.arms]
        return jobs

    def best_static_jobs(self, setting: str, sweep: list[dict]) -> list[Job]:
        best = min(sweep, key=lambda r: r["val_ppl_mean"])
        m = len(self.names(setting))
        return [self.job(setting, "best_static", seed, self.static_flags(setting, best["static_p"]),
                         static_p=best["static_p"]) for seed in range(1, self.scale.seeds[m])]

    def train_argv(self, job: Job) -> list[str]:
        s = self.scale
        argv = ["train", "lm", "--data", str(self.data), "--tokenizer", str(self.tokenizer), "--out", job.out,
                *s.model, "--seq-len", str(s.seq_len), "--batch-size", str(s.batch_size), "--lr", "1e-3",
                "--warmup", "0.05", "--pretrain-steps", str(s.steps), "--chat-steps", "0",
                "--eval-every", str(s.steps), "--eval-batches", "1", "--save-every", str(s.save_every),
                "--seed", str(job.seed), "--device", self.device, "--groups", SETTINGS[job.setting],
                *job.mixture]
        return argv + (["--resume"] if (Path(job.out) / "checkpoint.pt").is_file() else [])


# --------------------------------------------------------------------------- one run (in a worker)

def evaluate(out: Path, groups: str, data: Path, seq_len: int, windows: int, device: str) -> dict:
    """Mean token loss per group on the val and test splits (the first `windows` windows of each)."""
    import torch
    from transformers import AutoModelForCausalLM

    from leanserve.data.build import load_manifest
    from leanserve.data.lm_data import batched, encode_documents, load_tokenizer, stream_windows
    from leanserve.data.mixture import parse_groups
    from leanserve.eval.token_loss import mean_losses
    from leanserve.runtime import DistInfo
    from leanserve.trainers.lm_mixture import PRETRAIN_DOMAINS
    from leanserve.trainers.loop import bf16_autocast

    tok, manifest = load_tokenizer(out), load_manifest(data)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device)
    result = {}
    for split in ("val", "test"):
        batches = {}
        for g in parse_groups(groups, PRETRAIN_DOMAINS):
            stream = encode_documents(tok, [row["text"] for row in g.rows(data, manifest, split)])
            batches[g.name] = batched(stream_windows(stream, seq_len, windows), 32, tok.pad_token_id)
        result[f"{split}_loss"] = mean_losses(model, batches, torch.device(device),
                                              bf16_autocast("auto", torch.device(device)), DistInfo())
    return result


def run_job(exp: Experiment, job: Job) -> dict:
    """Train (or resume) and evaluate one run; its eval.json is the record that it is done."""
    from leanserve.atomic import atomic_write_text
    from leanserve.cli import main

    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(out / "train.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = main(exp.train_argv(job))
    if code != 0:
        raise RuntimeError(f"train lm exited with {code}; see {out / 'train.log'}")
    seconds = time.perf_counter() - started
    info = json.loads((out / "leanserve.json").read_text())
    result = {**asdict(job), "train_seconds": round(seconds, 1),
              "final_p": info["settings"]["mix"], "aioli_rounds": len(info["metrics"]["mixture"].get("rounds", [])),
              **evaluate(out, SETTINGS[job.setting], exp.data, exp.scale.seq_len, exp.scale.eval_windows, exp.device)}
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1) + "\n")
    return result


def worker(exp: Experiment, jobs: mp.Queue, results: mp.Queue, threads: int):
    import torch
    torch.set_num_threads(threads)
    while (job := jobs.get()) is not None:
        try:
            results.put((job.key, run_job(exp, job), None))
        except (Exception, SystemExit):  # reported by the parent; the worker goes on with the next run
            results.put((job.key, None, traceback.format_exc()))


# --------------------------------------------------------------------------- the sweep

def done_result(job: Job) -> dict | None:
    path = Path(job.out) / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else None


def summarise(result: dict) -> dict:
    """A result's per-group perplexities and their means."""
    row = {k: result[k] for k in ("setting", "arm", "seed")}
    for split in ("val", "test"):
        loss = result[f"{split}_loss"]
        ppl = {g: math.exp(v) for g, v in loss.items()}
        row |= {f"{split}_ppl_mean": statistics.fmean(ppl.values()), f"{split}_ppl_by_group": ppl,
                f"{split}_ce_mean": statistics.fmean(loss.values())}
    return row | {"mixture": result["final_p"], "static_p": result["static_p"], "aioli_rounds": result["aioli_rounds"],
                  "train_seconds": result["train_seconds"], "tag": result["tag"]}


def run_all(exp: Experiment, parallel: int, threads: int, budget_s: float) -> tuple[dict[str, dict], list[str], bool]:
    """Every run, `parallel` at a time; stops (killing the workers; their runs resume next time) once
    budget_s is spent. Returns the results by key, the failures, and whether all runs finished."""
    deadline = time.perf_counter() + budget_s
    results: dict[str, dict] = {}
    failures: list[str] = []
    pending = exp.first_jobs()
    sweeps_left = {s: exp.scale.num_static for s in exp.settings if "best_static" in exp.arms}
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    jobs, done = ctx.Queue(), ctx.Queue()
    workers = [ctx.Process(target=worker, args=(exp, jobs, done, threads), daemon=True) for _ in range(parallel)]
    outstanding, trained, total = 0, 0, len(pending) + sum(exp.scale.seeds[len(exp.names(s))] - 1 for s in sweeps_left)
    started = time.perf_counter()

    def finished(key: str, result: dict):
        results[key] = result
        setting = result["setting"]
        if result["arm"] == "static_sweep":
            sweeps_left[setting] -= 1
            if sweeps_left[setting] == 0:
                sweep = [summarise(r) for r in results.values()
                         if r["setting"] == setting and r["arm"] == "static_sweep"]
                pending.extend(exp.best_static_jobs(setting, sweep))

    for w in workers:
        w.start()
    try:
        while pending or outstanding:
            while pending:
                job = pending.pop(0)
                result = done_result(job)
                if result is not None:
                    finished(job.key, result)
                else:
                    jobs.put(job)
                    outstanding += 1
            if not outstanding:
                break
            if time.perf_counter() > deadline:
                print(f"budget spent: {len(results)} of {total} runs done; run the same command again to continue")
                return results, failures, False
            try:
                key, result, error = done.get(timeout=max(1.0, min(30.0, deadline - time.perf_counter())))
            except queue.Empty:
                continue
            outstanding -= 1
            if error is not None:
                failures.append(key)
                print(f"FAILED {key}:\n{error}")
                continue
            finished(key, result)
            trained += 1
            elapsed = time.perf_counter() - started
            eta = elapsed / trained * (total - len(results))  # rough until the first wave of runs is done
            print(f"[{len(results)}/{total}] {key}: test ppl mean {summarise(result)['test_ppl_mean']:.3f} "
                  f"({result['train_seconds']:.0f} s; {elapsed / 60:.1f} min elapsed, ~{eta / 60:.1f} min to go)",
                  flush=True)
        for _ in workers:
            jobs.put(None)
        for w in workers:
            w.join()
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()  # out of budget, mid-run: its last checkpoint is resumed next time
                w.join()
    return results, failures, not failures


def paired(rows: list[dict], arm: str, metric: str) -> dict | None:
    """arm - stratified per seed, with the mean and its 95% t-interval."""
    base = {r["seed"]: r[metric] for r in rows if r["arm"] == "stratified"}
    deltas = {r["seed"]: r[metric] - base[r["seed"]] for r in rows if r["arm"] == arm and r["seed"] in base}
    if not deltas:
        return None
    values = [deltas[s] for s in sorted(deltas)]
    mean = statistics.fmean(values)
    n = len(values)
    if n < 2:
        return {"n": n, "mean": mean, "ci95": None, "deltas": values, "worse": sum(v > 0 for v in values)}
    t = T975.get(n - 1) or T975[max(k for k in T975 if k <= n - 1)]
    half = t * statistics.stdev(values) / math.sqrt(n)
    return {"n": n, "mean": mean, "ci95": [mean - half, mean + half], "deltas": values,
            "worse": sum(v > 0 for v in values)}


def report(exp: Experiment, results: dict[str, dict], failures: list[str], complete: bool) -> dict:
    rows = [summarise(r) for r in results.values()]
    for r in list(rows):  # the sweep's winner is the best_static run at seed 0
        if r["arm"] == "static_sweep" and r["seed"] == 0:
            sweep = [x for x in rows if x["setting"] == r["setting"] and x["arm"] == "static_sweep"]
            if len(sweep) == exp.scale.num_static and r is min(sweep, key=lambda x: x["val_ppl_mean"]):
                rows.append({**r, "arm": "best_static", "tag": ""})
    rows.sort(key=lambda r: (exp.settings.index(r["setting"]), ARMS.index(r["arm"]) if r["arm"] in ARMS else 99,
                             r["tag"], r["seed"]))
    per_setting = {}
    for setting in exp.settings:
        mine = [r for r in rows if r["setting"] == setting]
        per_setting[setting] = {
            arm: {metric: paired(mine, arm, metric) for metric in ("test_ppl_mean", "test_ce_mean")}
            for arm in exp.arms if arm != "stratified"}
        per_setting[setting]["stratified_test_ppl_mean"] = statistics.fmean(
            [r["test_ppl_mean"] for r in mine if r["arm"] == "stratified"] or [math.nan])
    aioli = [per_setting[s].get("aioli", {}).get("test_ppl_mean") for s in exp.settings]
    aioli = [a for a in aioli if a]
    summary = {"aioli_mean_delta_below_0": f"{sum(a['mean'] < 0 for a in aioli)}/{len(aioli)} settings",
               "aioli_ci_below_0": f"{sum(bool(a['ci95']) and a['ci95'][1] < 0 for a in aioli)}/{len(aioli)} settings",
               "aioli_seeds_worse_than_stratified": sum(a["worse"] for a in aioli)}
    manifest = json.loads((exp.data / "manifest.json").read_text())
    return {"experiment": "Aioli vs stratified (data-mixing spec A.7)", "complete": complete, "failed_runs": failures,
            "metric": "mean over groups of per-group test perplexity; paired delta = arm - stratified per seed, "
                      "95% t-interval",
            "config": {**asdict(exp.scale), "settings": {s: SETTINGS[s] for s in exp.settings}, "arms": exp.arms,
                       "eta": exp.eta, "ema": exp.ema, "one_hot": 0.6, "device": exp.device},
            "data_sha256": manifest["sha256"], "python": manifest.get("python"),
            "summary": summary, "paired": per_setting, "rows": rows}


# --------------------------------------------------------------------------- main

def prepare(work: Path, scale: Scale, data: str | None, tokenizer: str | None) -> tuple[Path, Path]:
    """The data build and tokenizer every run shares (built once into --work unless given)."""
    from leanserve.cli import main

    data_dir, tok_dir = Path(data or work / "data"), Path(tokenizer or work / "tok")
    if not (data_dir / "manifest.json").is_file():
        assert main(["data", "build", "--out", str(data_dir), *scale.build]) == 0
    if not (tok_dir / "tokenizer.json").is_file():
        assert main(["data", "tokenizer", "--data", str(data_dir), "--out", str(tok_dir),
                     "--vocab-size", str(scale.vocab_size)]) == 0
    return data_dir, tok_dir


def plan(exp: Experiment):
    """The runs, their tokens and training FLOPs (6 N per token plus causal attention)."""
    from leanserve.trainers.presets import PRESETS
    s = exp.scale
    n = sum(exp.scale.seeds[len(exp.names(x))] - 1 for x in exp.settings) if "best_static" in exp.arms else 0
    runs = len(exp.first_jobs()) + n
    shape = dict(zip(s.model[::2], s.model[1::2]))
    overrides = {"hidden_size": "--hidden-size", "num_layers": "--layers", "num_heads": "--heads",
                 "num_kv_heads": "--kv-heads", "intermediate_size": "--intermediate-size"}
    preset = replace(PRESETS[shape["--preset"]], **{k: int(shape[f]) for k, f in overrides.items() if f in shape})
    params = preset.num_params(s.vocab_size)
    flops_per_token = 6 * params + 6 * preset.num_layers * s.seq_len * preset.hidden_size
    tokens = runs * s.steps * s.batch_size * s.seq_len
    print(f"{runs} runs x {s.steps} steps x {s.batch_size} x {s.seq_len} tokens = {tokens / 1e9:.2f}B tokens; "
          f"{params / 1e6:.1f}M params, {flops_per_token / 1e6:.0f} MFLOP/token -> "
          f"{tokens * flops_per_token / 1e15:.0f} PFLOP of training")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="data, tokenizer and run directories (kept: rerun to continue)")
    ap.add_argument("--data", help="a built data directory (default: built into --work)")
    ap.add_argument("--tokenizer", help="a tokenizer directory (default: trained into --work)")
    ap.add_argument("--out", default=str(RESULTS / "aioli_eval.json"))
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--arms", nargs="+", default=["stratified", "aioli", "aioli_static", "best_static"], choices=ARMS)
    ap.add_argument("--eta", type=float, default=0.2, help="Aioli's EGD step size")
    ap.add_argument("--ema", type=float, help="Aioli's EMA gamma (default: off)")
    ap.add_argument("--scale", choices=["full", "cpu"], default="full",
                    help="full: the 14M model (GPU); cpu: a 1M model, 600 steps a run, on --device cpu")
    ap.add_argument("--steps", type=int, help="pretraining steps per run (default 4000; Aioli rounds scale along)")
    ap.add_argument("--parallel", type=int, help="runs side by side (worker processes; default 12, --smoke 2)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--budget-min", type=float, default=math.inf, help="stop (resumably) after this many minutes")
    ap.add_argument("--plan", action="store_true", help="print the runs and their cost, run nothing")
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes, 2 settings: the code paths in < 1 minute")
    args = ap.parse_args()

    scale = SMOKE if args.smoke else {"full": FULL, "cpu": CPU}[args.scale]
    if args.steps:
        rounds = scale.steps // scale.round_steps  # keep the number of rounds
        scale = Scale(**{**asdict(scale), "steps": args.steps, "round_steps": args.steps // rounds,
                         "save_every": min(scale.save_every, args.steps)})
    settings = ["code+arith", "code+docs+kv"] if args.smoke and args.settings == list(SETTINGS) else args.settings
    device = "cpu" if args.smoke or args.scale == "cpu" else args.device
    work = Path(args.work)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    exp = Experiment(scale, work, Path(args.data or work / "data"), Path(args.tokenizer or work / "tok"), device,
                     settings, args.arms, args.eta, args.ema)
    if args.plan:
        return plan(exp)
    exp.data, exp.tokenizer = prepare(work, scale, args.data, args.tokenizer)
    parallel = args.parallel or (2 if args.smoke else 12)
    threads = 1 if device == "cuda" else max(1, (os.cpu_count() or 1) // parallel)
    results, failures, complete = run_all(exp, parallel, threads, 60 * args.budget_min)
    from leanserve.eval.report import emit_json, hardware
    result = report(exp, results, failures, complete)
    emit_json({**result, "hardware": hardware(device)}, args.out)
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
