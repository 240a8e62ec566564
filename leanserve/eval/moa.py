"""`leanserve eval moa`: long-context retrieval accuracy by position bucket and length, and
response-masked perplexity, of a dense LLM against MoA plans of it at equal KV density.

Arms: dense (--model); for each density among the plans, the uniform sink + window (alpha 0,
beta = the density for every KV head: StreamingLLM's pattern with MoA's cache and kernels); each
plan directory's ablation ladder steps if `compress moa --ablation-plans` wrote them (per-layer,
per-head: compressors/moa_ablation.py); and each MoA plan (--plans).

How attention is restricted: every arm runs in the engine `leanserve serve` runs (LLMEngine), which
loads the directory as the server does: the dense arm through the dense paged cache, every other arm
through the plan's sink + ring pages and the MoA prefill and decode kernels (their PyTorch
references on CPU). The uniform and ladder plans are served from a plan directory with its `plan`
setting pointing at their file (`serve --model-setting plan=FILE`), so all span arms share the
kernels and differ in their rules only.

Items (eval/moa_items.py; held-out stdlib modules), per seed and length L:
- retrieval: greedy decoding of at most --max-new-tokens (each request planned for prompt +
  max_tokens <= L tokens, its spans sized for that), exact match (data/tasks.check); per position
  bucket of the needed context and overall;
- perplexity: cross-entropy of the ground-truth responses' tokens only, from one prefill of prompt +
  response through the served attention (ModelRunner.sequence_logprobs), averaged per task kind then
  over kinds; ppl = exp of that; ppl_by_kind: exp of each kind's mean alone (which task a rise
  comes from).
Each row gives the mean and the population std over seeds.

Output: JSON `rows: [{method, density, length, retrieval_acc, ppl, ...}]` with provenance, the
settings, the arms and the goals computed from the rows; a PNG of accuracy against length per arm.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from leanserve.data.long_context import DEPTH_KINDS, Corpus
from leanserve.data.tasks import check
from leanserve.errors import UserError
from leanserve.eval import moa_items
from leanserve.models.model_dir import load_model_info, weights_sha256
from leanserve.models.moa_plan import PLAN_FILE, MoAPlan, load_plan, save_plan

DEFAULT_OUT = "benchmarks/results/moa_eval.json"
GOAL_RETRIEVAL_GAP, GOAL_VS_UNIFORM, GOAL_PPL_RISE = 0.05, 1.5, 0.02  # the goals


@dataclass
class Arm:
    method: str             # dense | uniform | per-layer | per-head | moa
    density: float          # the KV density it is planned for (dense: 1)
    model_dir: Path
    plan: MoAPlan | None = None
    plan_file: Path | None = None  # served through the `plan` setting; None: the directory's own
    source: str | None = None      # the plan directory it comes from

    def describe(self) -> dict:
        return {"method": self.method, "density": self.density, "plan": self.source,
                "plan_file": None if self.plan_file is None else str(self.plan_file),
                "rules": None if self.plan is None else sorted({(a, b) for la, lb in zip(self.plan.alphas, self.plan.betas)
                                                                for a, b in zip(la, lb)})}

    def served_density(self, length: int) -> float:
        return 1.0 if self.plan is None else self.plan.density(length)


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="the dense LLM directory the plans were made from")
    p.add_argument("--plans", nargs="+", required=True, help="MoA model directories (`leanserve compress moa` output)")
    p.add_argument("--lengths", nargs="+", type=int,
                   help="item lengths in tokens, prompt + --max-new-tokens (default: the plans' profile and extend "
                        "lengths)")
    p.add_argument("--buckets", type=int, default=10, help="position buckets of the needed context over the prompt")
    p.add_argument("--items-per-bucket", type=int, default=10, help="retrieval items per bucket, length and seed")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="item sampling seeds")
    p.add_argument("--kinds", nargs="+", default=["retrieval"], choices=DEPTH_KINDS, help="retrieval task kinds")
    p.add_argument("--ppl-items", type=int, default=8, help="perplexity items per length and seed (kinds in turn)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="the longest answer decoded or scored")
    p.add_argument("--batch-size", type=int, default=16, help="the engine's max_num_seqs")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.8,
                   help="the engine's share of the GPU (the scoring prefill needs some room beside it)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"the results JSON (default {DEFAULT_OUT})")
    p.add_argument("--plot", help="the accuracy-against-length PNG (default: beside --out, .png)")


# --------------------------------------------------------------------------- arms

def _moa_dir(path: Path, dense_sha: str, hf_config) -> tuple[MoAPlan, dict]:
    info = load_model_info(path)
    if info is None or info.method != "moa":
        raise UserError(f"--plans {path}: not a MoA model directory (leanserve.json method 'moa', as "
                        "`leanserve compress moa` writes)")
    if ((info.base or {}).get("sha256") or weights_sha256(path)) != dense_sha:
        raise UserError(f"--plans {path}: made from other weights than --model's (config and safetensors hashes differ)")
    return load_plan(path / info.settings.get("plan", PLAN_FILE), hf_config), info.settings


def uniform_plan(plan: MoAPlan) -> MoAPlan:
    """Alpha 0, beta = the plan's density for every unit: its uniform sink + window."""
    units, layers = len(plan.alphas[0]), len(plan.alphas)
    uniform = dataclasses.replace(plan, alphas=[[0.0] * units for _ in range(layers)],
                                  betas=[[float(plan.density_target)] * units for _ in range(layers)],
                                  rule_cap_per_layer=1, objectives={}, validation_ce=None, calibration={},
                                  density_at={})
    uniform.density_at = {str(n): uniform.density(n) for n in sorted({*uniform.lengths(), uniform.validation_length})}
    return uniform


def build_arms(dense_dir: Path, plan_dirs: list[Path], work: Path) -> list[Arm]:
    """dense; then per plan directory: the uniform arm at its density (once per density), its ladder
    steps, the plan. Uniform plan files are written to `work`."""
    from transformers import AutoConfig

    info = load_model_info(dense_dir)
    if info is not None and info.method != "dense":
        raise UserError(f"--model {dense_dir}: a {info.method!r} model; the dense arm needs the dense model")
    hf_config, dense_sha = AutoConfig.from_pretrained(dense_dir), weights_sha256(dense_dir)
    arms, densities = [Arm("dense", 1.0, dense_dir)], set()
    for path in plan_dirs:
        plan, settings = _moa_dir(path, dense_sha, hf_config)
        density = float(plan.density_target)
        if density not in densities:
            densities.add(density)
            file = save_plan(work / f"uniform-{density:g}.json", uniform_plan(plan))
            arms.append(Arm("uniform", density, path, load_plan(file, hf_config), file.resolve(), path.name))
        for step, rel in settings.get("ablation_plans", {}).items():
            step_plan = load_plan(path / rel, hf_config)
            arms.append(Arm(step, float(step_plan.density_target), path, step_plan, (path / rel).resolve(), path.name))
        arms.append(Arm("moa", density, path, plan, None, path.name))
    return arms


# --------------------------------------------------------------------------- running an arm

def run_arm(arm: Arm, probes: list[moa_items.Probe], scored: list[moa_items.Scored], *, max_model_len: int,
            max_new_tokens: int, batch_size: int, device: str, dtype: str, gpu_memory_utilization: float
            ) -> tuple[list[bool], list[float]]:
    """(each probe answered exactly, each scored item's mean response CE) through the served model."""
    from leanserve.server.engine.config import EngineConfig
    from leanserve.server.engine.llm_engine import LLMEngine
    from leanserve.server.engine.sampling_params import SamplingParams

    config = EngineConfig(model=str(arm.model_dir), device=device, dtype=dtype, max_model_len=max_model_len,
                          max_num_seqs=batch_size, enable_prefix_caching=False,
                          gpu_memory_utilization=gpu_memory_utilization,
                          model_settings=None if arm.plan_file is None else {"plan": str(arm.plan_file)})
    engine = LLMEngine(config)
    try:
        results = engine.generate([p.prompt_ids for p in probes], SamplingParams(temperature=0, max_tokens=max_new_tokens))
        correct = [check(p.task, r.text) for p, r in zip(probes, results)]
        ce = [-float(engine.model_runner.sequence_logprobs(s.ids, s.response_start).mean()) for s in scored]
    finally:
        engine.close()
    return correct, ce


def _free_device_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- rows and goals

def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def arm_rows(arm: Arm, probes: list[moa_items.Probe], correct: list[bool], scored: list[moa_items.Scored],
             ce: list[float], *, lengths: list[int], seeds: list[int], buckets: int) -> list[dict]:
    """One row per length: accuracy (overall and per bucket) and perplexity, mean and std over seeds."""
    rows = []
    for length in lengths:
        acc, by_bucket, ppl, kind_ppl = [], [], [], {}
        for seed in seeds:
            mine = [(p, c) for p, c in zip(probes, correct) if (p.seed, p.length) == (seed, length)]
            acc.append(float(np.mean([c for _, c in mine])))
            by_bucket.append([float(np.mean([c for p, c in mine if p.bucket == b])) for b in range(buckets)])
            per_kind: dict[str, list[float]] = {}
            for s, value in zip(scored, ce):
                if (s.seed, s.length) == (seed, length):
                    per_kind.setdefault(s.kind, []).append(value)
            ppl.append(math.exp(np.mean([np.mean(v) for v in per_kind.values()])))
            for kind, v in per_kind.items():  # which task a perplexity rise comes from
                kind_ppl.setdefault(kind, []).append(math.exp(np.mean(v)))
        (acc_mean, acc_std), (ppl_mean, ppl_std) = _mean_std(acc), _mean_std(ppl)
        bucket_mean, bucket_std = np.mean(by_bucket, axis=0), np.std(by_bucket, axis=0)
        rows.append({"method": arm.method, "density": arm.density, "length": length,
                     "retrieval_acc": acc_mean, "ppl": ppl_mean, "retrieval_acc_std": acc_std, "ppl_std": ppl_std,
                     "retrieval_acc_by_bucket": bucket_mean.tolist(), "retrieval_acc_by_bucket_std": bucket_std.tolist(),
                     "retrieval_acc_per_seed": acc, "ppl_per_seed": ppl,
                     "ppl_by_kind": {kind: float(np.mean(v)) for kind, v in sorted(kind_ppl.items())},
                     "served_density": arm.served_density(length), "plan": arm.source})
    return rows


def goals(rows: list[dict], arms: list[Arm]) -> list[dict]:
    """The issue's goals for every MoA plan, against dense and the uniform window of its density:
    retrieval within 0.05 of dense at every length up to 2x its longest profile length, >= 1.5x the
    uniform window's at the longest length evaluated, perplexity within 2% of dense everywhere."""
    def table(method: str, density: float | None = None, source: str | None = None) -> dict[int, dict]:
        return {r["length"]: r for r in rows if r["method"] == method
                and (density is None or r["density"] == density) and (source is None or r["plan"] == source)}

    dense, out = table("dense"), []
    for arm in (a for a in arms if a.method == "moa"):
        moa, uniform = table("moa", arm.density, arm.source), table("uniform", arm.density)
        reach = [n for n in sorted(moa) if n <= 2 * max(arm.plan.profile_lengths)]
        gap = max((dense[n]["retrieval_acc"] - moa[n]["retrieval_acc"] for n in reach), default=None)
        longest = max(moa)
        mine, theirs = moa[longest]["retrieval_acc"], uniform[longest]["retrieval_acc"]
        ratio = mine / theirs if theirs > 0 else None
        rise = max(moa[n]["ppl"] / dense[n]["ppl"] - 1 for n in moa)
        out.append({
            "plan": arm.source, "density": arm.density,
            "retrieval_gap_to_dense": gap, "lengths_checked": reach,
            "retrieval_gap_ok": gap is not None and gap <= GOAL_RETRIEVAL_GAP,
            "longest_length": longest, "retrieval_vs_uniform": ratio,
            "retrieval_vs_uniform_ok": mine > 0 and (ratio is None or ratio >= GOAL_VS_UNIFORM),
            "ppl_rise_vs_dense": rise, "ppl_ok": rise <= GOAL_PPL_RISE,
        })
    return out


def _label(arm_row: dict, several_plans: bool) -> str:
    if arm_row["method"] == "dense":
        return "dense"
    suffix = f" ({arm_row['plan']})" if several_plans and arm_row["method"] != "uniform" else ""
    return f"{arm_row['method']} δ={arm_row['density']:g}{suffix}"


def plot(result: dict, path: str | Path) -> None:
    from leanserve.eval.plots import Series, line_plot

    several = len({r["plan"] for r in result["rows"] if r["plan"]}) > 1
    series: dict[str, list[dict]] = {}
    for row in result["rows"]:
        series.setdefault(_label(row, several), []).append(row)
    line_plot([Series(label, [r["length"] for r in rs], [r["retrieval_acc"] for r in rs],
                      yerr=[r["retrieval_acc_std"] for r in rs]) for label, rs in series.items()],
              path, title=f"Retrieval accuracy ({len(result['settings']['seeds'])} seeds)",
              xlabel="length (tokens: prompt + max new tokens)", ylabel="exact-match accuracy", log_x=True)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | density | plan | length | retrieval acc | ppl |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['density']:g} | {r['plan'] or '-'} | {r['length']} | "
              f"{r['retrieval_acc']:.3f} ± {r['retrieval_acc_std']:.3f} | {r['ppl']:.3f} ± {r['ppl_std']:.3f} |"
              for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command

def _check_args(args) -> None:
    for name in ("buckets", "items_per_bucket", "ppl_items", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.lengths is not None and min(args.lengths) <= args.max_new_tokens:
        raise UserError("every --lengths must exceed --max-new-tokens (a length holds prompt + answer)")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise UserError("--gpu-memory-utilization must be in (0, 1]")


def run(args):
    from transformers import AutoConfig, AutoTokenizer

    from leanserve.eval.report import emit_json, hardware
    from leanserve.runtime import resolve_device
    from leanserve.server.engine.core import eos_token_ids

    _check_args(args)
    dense_dir, plan_dirs = Path(args.model), [Path(p) for p in args.plans]
    for path in (dense_dir, *plan_dirs):
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: no config.json (expected a transformers model directory)")
    with tempfile.TemporaryDirectory(prefix="eval-moa-") as work:
        arms = build_arms(dense_dir, plan_dirs, Path(work))
        plans = [a.plan for a in arms if a.method == "moa"]
        lengths = sorted(set(args.lengths or [n for p in plans for n in p.lengths()]))
        hf_config = AutoConfig.from_pretrained(dense_dir)
        if lengths[-1] > hf_config.max_position_embeddings:
            raise UserError(f"--lengths up to {lengths[-1]} exceed the model's max_position_embeddings "
                            f"{hf_config.max_position_embeddings}")
        tokenizer = AutoTokenizer.from_pretrained(dense_dir)
        corpus = Corpus.load(held_out=True)
        probes = moa_items.probes(tokenizer, corpus, lengths=lengths, seeds=args.seeds, buckets=args.buckets,
                                  per_bucket=args.items_per_bucket, kinds=args.kinds, max_new_tokens=args.max_new_tokens)
        end_of_turn = (eos_token_ids(str(dense_dir), hf_config, tokenizer) or [None])[0]
        scored = moa_items.scored(tokenizer, corpus, lengths=lengths, seeds=args.seeds, count=args.ppl_items,
                                  max_new_tokens=args.max_new_tokens, end_of_turn=end_of_turn)
        rows = []
        for arm in tqdm(arms, desc="eval moa", unit=" arm"):
            correct, ce = run_arm(arm, probes, scored, max_model_len=lengths[-1], max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                                  gpu_memory_utilization=args.gpu_memory_utilization)
            _free_device_memory()
            rows += arm_rows(arm, probes, correct, scored, ce, lengths=lengths, seeds=args.seeds, buckets=args.buckets)
    settings = {"model": str(dense_dir), "plans": [str(p) for p in plan_dirs], "lengths": lengths,
                "buckets": args.buckets, "items_per_bucket": args.items_per_bucket, "seeds": args.seeds,
                "kinds": args.kinds, "ppl_items": args.ppl_items, "max_new_tokens": args.max_new_tokens,
                "dtype": args.dtype, "items": "held-out stdlib modules (val and test of `leanserve data build`)"}
    result = {"hardware": hardware(resolve_device(args.device)), "settings": settings,
              "arms": [a.describe() for a in arms], "rows": rows, "goals": goals(rows, arms)}
    emit_json(result, args.out)
    plot_path = args.plot or str(Path(args.out).with_suffix(".png"))
    plot(result, plot_path)
    print(f"wrote {plot_path}")
    print(markdown_table(rows))
    return 0
