"""`leanserve compress moa`: give every KV head of an LLM its own attention span (MoA: sink + a band
of alpha + beta * N recent tokens) at a target KV density, and write a model directory that serves it.

Calibration items (moa_calibration: long-dependency prompts, the dense model's own responses) ->
influence profiling at each profile length (moa_profile) -> multi-objective plan optimisation
(moa_rules tables, moa_milp) -> validation of the Pareto plans at an unseen length (moa_validate)
-> OUT: the input's files unchanged, `moa_plan.json` (models/moa_plan.py) and `leanserve.json`
(method "moa"). With --ablation-plans, also the middle steps of MoA's ablation ladder from the same
profiles (moa_ablation), in OUT/moa_ablation/, for `leanserve eval moa`.

Resumable: the items and every profiled item's influence live in OUT/moa_work/ (each file written
atomically) until the model directory is written; --resume continues at the first missing item.
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from leanserve.atomic import atomic_write_text, fsync_tree
from leanserve.compressors import moa_calibration as calib
from leanserve.compressors.moa_ablation import FOLDER as ABLATION_FOLDER
from leanserve.compressors.moa_ablation import ladder_rules
from leanserve.compressors.moa_milp import Problem, pareto_plans
from leanserve.compressors.moa_profile import prepare_for_profiling, profile_items
from leanserve.compressors.moa_rules import (
    default_extend_length,
    default_validation_length,
    loss_table,
    rule_grid,
    slots_table,
)
from leanserve.compressors.moa_validate import validation_ce
from leanserve.data.long_context import LONG_KINDS, Corpus
from leanserve.errors import UserError
from leanserve.models.model_dir import ModelInfo, check_complete, load_model_info, make_recipe, save_model_info, \
    weights_sha256
from leanserve.models.moa_plan import PLAN_FILE, MoAPlan, save_plan
from leanserve.models.registry import get_model_class
from leanserve.runtime import resolve_device, resolve_dtype
from leanserve.trainers.checkpoint import check_out_dir, check_resume_args
from leanserve.trainers.progress import ProgressFile

WORK = "moa_work"
STATE = f"{WORK}/state.json"  # the options of the run, for --resume
RESUME_FREE = ("resume", "stop_at", "out", "ablation_plans")  # the last: extra plans from the same profiles


def _lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(part) for part in text.split(",")})
    except ValueError:
        lengths = []
    if not lengths or lengths[0] <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive token counts, got {text!r}")
    return lengths


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="dense LLM directory (transformers layout, safetensors)")
    p.add_argument("--out", required=True, help="model directory to write (the input's files + moa_plan.json)")
    p.add_argument("--density", type=float, default=0.5, help="KV density budget at every constrained length")
    p.add_argument("--profile-lengths", type=_lengths,
                   help="lengths to profile and optimise at (default: 1/8, 1/4, 1/2 of max_position_embeddings)")
    p.add_argument("--extend-length", type=int, help="a further length the density is held at (default 2x the "
                                                     "longest profile length)")
    p.add_argument("--validation-length", type=int, help="the unseen length plans are chosen at (default 1.5x "
                                                         "the longest profile length)")
    p.add_argument("--block-size", type=int, default=64, help="sink, page and profiling block, in tokens")
    p.add_argument("--items", type=int, default=50, help="calibration items per profile length")
    p.add_argument("--validation-items", type=int, help="held-out items at the validation length (default --items)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest response the dense model writes")
    p.add_argument("--targets", default="model", choices=calib.TARGETS,
                   help="responses: the dense model's own (MoA) or the tasks' answers (ablation)")
    g = p.add_argument_group("plan optimisation")
    g.add_argument("--rule-cap", type=int, default=2, help="distinct rules per layer (0: no cap)")
    g.add_argument("--density-lower", type=float, default=0.9, help="densities stay above this share of the budget")
    g.add_argument("--group-reduce", default="sum", choices=["sum", "max"],
                   help="a KV head's influence from its query heads' (sum: first-order losses add)")
    g.add_argument("--scan-intervals", type=int, default=4, help="steps per objective range of the Pareto scan")
    g.add_argument("--time-limit", type=float, default=60.0, help="seconds per MILP solve")
    g.add_argument("--mip-gap", type=float, default=1e-4, help="relative optimality gap of each solve")
    g.add_argument("--ablation-plans", action="store_true",
                   help=f"also write the ablation ladder's per-layer and per-head plans (alpha-0 rules, the longest "
                        f"profile length alone) to OUT/{ABLATION_FOLDER}/, for `leanserve eval moa`")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="item sampling")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--resume", action="store_true", help=f"continue from OUT/{WORK}")
    g.add_argument("--stop-at", type=int, help="stop after this many profiled items (resume later)")


def _hf_config(model_dir: Path):
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model {model_dir}: no config.json (expected a transformers model directory)")
    check_complete(model_dir)
    info = load_model_info(model_dir)
    if info is not None and (info.kind != "llm" or info.method != "dense"):
        raise UserError(f"--model {model_dir} is a {info.kind} model with method {info.method!r}; "
                        "MoA compresses a dense LLM")
    config = AutoConfig.from_pretrained(model_dir)
    get_model_class(config.model_type)  # an architecture leanserve serves
    return config


def _check_args(args, config) -> None:
    max_len = config.max_position_embeddings
    args.profile_lengths = args.profile_lengths or [max_len // 8, max_len // 4, max_len // 2]
    args.extend_length = args.extend_length or default_extend_length(args.profile_lengths)
    args.validation_length = args.validation_length or default_validation_length(args.profile_lengths)
    args.validation_items = args.validation_items or args.items
    B = args.block_size
    if B < 16 or B & (B - 1):
        raise UserError(f"--block-size must be a power of two >= 16, got {B}")
    if args.profile_lengths[0] < 4 * B:
        raise UserError(f"--profile-lengths: the shortest, {args.profile_lengths[0]}, must be at least 4 blocks "
                        f"({4 * B} tokens at --block-size {B})")
    if args.extend_length < args.profile_lengths[-1]:
        raise UserError("--extend-length must be at least the longest profile length")
    longest = max(args.profile_lengths[-1], args.validation_length)
    if longest > max_len:
        raise UserError(f"items of {longest} tokens exceed the model's max_position_embeddings {max_len}")
    if not 0 < args.density <= 1 or not 0 <= args.density_lower <= 1:
        raise UserError("--density must be in (0, 1] and --density-lower in [0, 1]")
    for name in ("items", "validation_items", "max_new_tokens", "scan_intervals"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.rule_cap < 0 or args.time_limit <= 0 or args.mip_gap < 0:
        raise UserError("--rule-cap must be >= 0, --time-limit > 0 and --mip-gap >= 0")
    if args.stop_at is not None and args.stop_at < 1:
        raise UserError("--stop-at must be >= 1")
    if Path(args.out).resolve() == Path(args.model).resolve():
        raise UserError("--out must differ from --model")


def _load_model(model_dir: Path, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True).to(device)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def _items(work: Path, name: str, build) -> list[calib.Item]:
    path = work / f"{name}.jsonl"
    if not path.is_file():
        calib.save_items(path, build())
    return calib.load_items(path)


class _Stopped(Exception):
    pass


def run(args):
    model_dir, out = Path(args.model), Path(args.out)
    config = _hf_config(model_dir)
    _check_args(args, config)
    check_out_dir(out, STATE, args.resume, finished="leanserve.json")
    work = out / WORK
    if args.resume:
        check_resume_args(json.loads((out / STATE).read_text()), args, RESUME_FREE)
    else:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / STATE, json.dumps(vars(args)))
    total = len(args.profile_lengths) * args.items  # at most: items the model cannot answer are dropped
    done = len(list(work.glob("influence/*/*.safetensors")))
    progress = ProgressFile(out, "item", total, done, checkpoint_step=done)
    progress.update(done, checkpointed=True)  # resumable from here: the items and profiles are kept in WORK
    device = resolve_device(args.device)
    model, tokenizer = _load_model(model_dir, device, resolve_dtype(args.dtype, device))

    n_min = args.profile_lengths[0]
    corpus = functools.cache(lambda: Corpus.load(held_out=False))  # read only when items are built
    items = {length: _items(work, f"calibration_{length}", lambda length=length: calib.build_items(
        model, tokenizer, corpus(), length, n_min, args.items, max_new_tokens=args.max_new_tokens,
        targets=args.targets, seed=args.seed, name="calibration")) for length in args.profile_lengths}
    held_out = _items(work, "validation", lambda: calib.build_items(
        model, tokenizer, Corpus.load(held_out=True), args.validation_length, n_min, args.validation_items,
        max_new_tokens=args.max_new_tokens, targets=args.targets, seed=args.seed, name="validation"))
    progress.total = sum(map(len, items.values()))

    try:
        hists, seconds = _profile(args, model, items, work, progress)
    except _Stopped:
        print(f"stopped after {progress.checkpoint_step} of {progress.total} items; continue with --resume")
        return 0
    rules = rule_grid(args.profile_lengths, args.extend_length)
    candidates = _optimise(args, config, rules, hists)
    plan, metrics = _select(args, config, model, held_out, rules, candidates)
    ladder = _ladder(args, config, model, held_out, rules, hists) if args.ablation_plans else {}
    if ladder:
        metrics["ablation"] = {step: {"validation_ce": p.validation_ce, "objectives": p.objectives,
                                      "density_at": p.density_at} for step, p in ladder.items()}
    metrics.update(profile_seconds_per_item=float(np.mean(seconds)) if seconds else None, device=str(device),
                   items={str(length): len(v) for length, v in items.items()}, validation_items=len(held_out))
    _write(args, plan, metrics, ladder)
    shutil.rmtree(work)  # the model directory is the artifact now
    progress.update(progress.total, done=True)
    print(f"wrote {out}: {len(candidates)} Pareto plans, chosen validation CE {plan.validation_ce:.4f} "
          f"(dense {metrics['validation_ce']['dense']:.4f}, uniform window {metrics['validation_ce']['uniform']:.4f});"
          f" density " + ", ".join(f"{v:.3f} at {n}" for n, v in plan.density_at.items()))
    return 0


def _profile(args, model, items: dict, work: Path, progress: ProgressFile) -> tuple[dict, list[float]]:
    """(profile length -> [(hist, n)] of its items, seconds of each item profiled in this session)."""
    bar = tqdm(total=progress.total, initial=progress.checkpoint_step, desc="compress moa: profiling", unit=" item")
    seconds, last = [], [time.perf_counter()]

    def on_item(resumed: bool):
        now = time.perf_counter()
        if not resumed:
            seconds.append(now - last[0])
            bar.update(1)
            progress.update(bar.n, {"s_per_item": round(seconds[-1], 3)}, checkpointed=True)
            if args.stop_at is not None and bar.n >= args.stop_at and bar.n < bar.total:
                raise _Stopped
        last[0] = now

    prepare_for_profiling(model)
    try:
        return {length: profile_items(model, length_items, work / "influence" / str(length), args.block_size, on_item)
                for length, length_items in items.items()}, seconds
    finally:
        bar.close()


def _optimise(args, config, rules: list, hists: dict) -> list:
    num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    constrained = sorted({*args.profile_lengths, args.extend_length})
    problem = Problem(
        losses={length: loss_table(h, rules, args.block_size, num_kv, args.group_reduce)
                for length, h in hists.items()},
        slots={n: slots_table(rules, n, args.block_size) for n in constrained},
        layer_of=np.repeat(np.arange(config.num_hidden_layers), num_kv), density={n: args.density for n in constrained},
        lower_ratio=args.density_lower, cap=args.rule_cap or None)
    k = len(args.profile_lengths)
    with tqdm(total=k + k * args.scan_intervals ** (k - 1), desc="compress moa: plans", unit=" MILP") as bar:
        return pareto_plans(problem, intervals=args.scan_intervals, time_limit=args.time_limit, gap=args.mip_gap,
                            on_solve=lambda: bar.update(1))


def _num_kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _plan(args, config, chosen: list[list[tuple[float, float]]], objectives: dict, ce: float, num_held_out: int,
          rule_cap: int | None) -> MoAPlan:
    """A plan file of the run's model and lengths with these rules ([layer][unit])."""
    plan = MoAPlan(
        model={"name": Path(args.model).name, "num_layers": config.num_hidden_layers,
               "num_q_heads": config.num_attention_heads, "num_kv_heads": _num_kv_heads(config),
               "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads},
        alphas=[[float(a) for a, _ in layer] for layer in chosen],
        betas=[[float(b) for _, b in layer] for layer in chosen],
        profile_lengths=args.profile_lengths, extend_length=args.extend_length,
        validation_length=args.validation_length, density_target=args.density, block_size=args.block_size,
        rule_cap_per_layer=rule_cap, objectives={str(length): v for length, v in objectives.items()},
        validation_ce=ce,
        calibration={"source": f"stdlib long-context tasks ({', '.join(LONG_KINDS)})", "targets": args.targets,
                     "n_items": args.items, "validation_items": num_held_out})
    plan.density_at = {str(n): plan.density(n) for n in sorted({*plan.lengths(), plan.validation_length})}
    return plan


def _select(args, config, model, held_out: list, rules: list, candidates: list) -> tuple[MoAPlan, dict]:
    """The candidate with the lowest validation CE as a MoAPlan; and the validation metrics (dense, the
    uniform window at the same density, every candidate)."""
    num_layers, num_kv = config.num_hidden_layers, _num_kv_heads(config)

    def per_layer(choice):
        return [[rules[r] for r in choice[layer * num_kv:(layer + 1) * num_kv]] for layer in range(num_layers)]

    B = args.block_size
    dense, dense_kinds = validation_ce(model, held_out, None, B)
    uniform, uniform_kinds = validation_ce(model, held_out, [[(0, args.density)] * num_kv] * num_layers, B)
    scored = [validation_ce(model, held_out, per_layer(c.choice), B)
              for c in tqdm(candidates, desc="compress moa: validation", unit=" plan")]
    best = int(np.argmin([ce for ce, _ in scored]))
    plan = _plan(args, config, per_layer(candidates[best].choice), candidates[best].objectives, scored[best][0],
                 len(held_out), args.rule_cap or None)
    metrics = {
        "validation_ce": {"dense": dense, "uniform": uniform, "moa": scored[best][0]},
        "validation_ce_per_kind": {"dense": dense_kinds, "uniform": uniform_kinds, "moa": scored[best][1]},
        "pareto": [{"objectives": {str(k): v for k, v in c.objectives.items()}, "validation_ce": ce,
                    "solved_to_optimality": c.optimal} for c, (ce, _) in zip(candidates, scored)],
    }
    return plan, metrics


def _ladder(args, config, model, held_out: list, rules: list, hists: dict) -> dict[str, MoAPlan]:
    """The ablation ladder's per-layer and per-head plans (moa_ablation), each with its validation CE."""
    constrained = sorted({*args.profile_lengths, args.extend_length})
    steps = ladder_rules(hists, rules, num_layers=config.num_hidden_layers, num_kv_heads=_num_kv_heads(config),
                         block_size=args.block_size, density={n: args.density for n in constrained},
                         lower_ratio=args.density_lower, cap=args.rule_cap or None, group_reduce=args.group_reduce,
                         time_limit=args.time_limit, gap=args.mip_gap)
    longest = max(args.profile_lengths)
    return {name: _plan(args, config, step.rules, {longest: step.dropped},
                        validation_ce(model, held_out, step.rules, args.block_size)[0], len(held_out), step.cap)
            for name, step in steps.items()}


def _write(args, plan: MoAPlan, metrics: dict, ladder: dict[str, MoAPlan]) -> None:
    """OUT: the input's files unchanged (weights, config, tokenizer), the plan (and the ladder's) and
    leanserve.json."""
    model_dir, out = Path(args.model), Path(args.out)
    shutil.copytree(model_dir, out, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("leanserve.json", PLAN_FILE, WORK, "progress.json", ABLATION_FOLDER))
    save_plan(out / PLAN_FILE, plan)
    ladder_files = {step: f"{ABLATION_FOLDER}/{step}.json" for step in ladder}
    for step, step_plan in ladder.items():
        (out / ABLATION_FOLDER).mkdir(exist_ok=True)
        save_plan(out / ladder_files[step], step_plan)
    recipe_args = argparse.Namespace(**{**vars(args), "profile_lengths": ",".join(map(str, args.profile_lengths))})
    save_model_info(out, ModelInfo(
        kind="llm", method="moa",
        settings={"plan": PLAN_FILE, "unit": plan.unit, "block_size": plan.block_size,
                  "density_target": plan.density_target, "density_at": plan.density_at,
                  "rule_cap_per_layer": plan.rule_cap_per_layer, "validation_ce": plan.validation_ce,
                  **({"ablation_plans": ladder_files} if ladder_files else {})},
        base={"path": str(model_dir), "sha256": weights_sha256(model_dir)},
        recipe=make_recipe("leanserve compress moa", recipe_args, args.seed, skip=("resume", "stop_at")),
        data={"description": f"long-context tasks ({', '.join(LONG_KINDS)}) over this Python's standard library: "
                             "calibration from the train modules of `leanserve data build`, validation from its "
                             "val and test modules"},
        metrics=metrics))
    fsync_tree(out)
