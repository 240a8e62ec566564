"""GPU: MoA serving vs dense paged leanserve on a Llama-3-8B-shaped model with random bf16 weights
(spec §12). Plans are synthetic: the MoA optimiser (HiGHS MILP, KV-head units, rule cap 2) run on
random influence tables, since random weights have no attention structure to profile.

    python benchmarks/bench_moa_gpu.py [--contexts 4096 8192 16384 32768] [--density 0.5] [--decode-steps 256]
                                       [--budget-s 1500]
    python benchmarks/bench_moa_gpu.py --smoke     # CPU, tiny model: the same code paths

Arms, per context (prompt length; every request generates --decode-steps tokens), all in one run:
  dense        leanserve dense paged attention, the largest batch the KV memory holds (B1)
  uniform      sink + window at the plan's density through the MoA kernels, at dense's batch (B2)
  moa          the MoA plan at dense's batch (B3)
  moa_max      the MoA plan at the largest batch the same KV memory holds (B4)
  hf_generate  transformers generate with its dynamic cache at dense's batch (B0; first context only)
Each row: tok/s (decode), batch, peak memory, KV GB per request; on GPU also attention µs per
layer-step (the decode kernels alone over the arm's real layout) and the KV GB/s they reach, vs
the measured copy bandwidth. Goals (issue 15): moa_max >= 1.8x dense decode tok/s at 16k with
density 0.5, and >= 1.4x less KV memory per request.
Results: benchmarks/results/moa_gpu-<gpu>.json, {"rows": [{arm, context, batch, tok_s, peak_mem_gb, ...}],
"summary", "skipped", "complete"}, rewritten after every row. --budget-s bounds the whole run: an arm
that would start with less than --arm-min-s of it left is skipped (and named in "skipped"), so a
time-capped job ends with every finished row on disk.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_decode_gpu import LLAMA3_8B, hf_generate, model_dir
from common import Deadline, copy_bandwidth_gbs, free_device_memory, peak_memory_gib, time_calls, write_result
from engine_timing import profile_steps, time_engine

from leanserve.compressors.moa_milp import Problem, solve
from leanserve.compressors.moa_rules import default_extend_length, default_validation_length, rule_grid, slots_table
from leanserve.models.model_dir import ModelInfo, save_model_info
from leanserve.models.moa_plan import PLAN_FILE, MoAPlan, save_plan
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine

TINY = dict(LLAMA3_8B, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, torch_dtype="float32")


def synthetic_plan(config: dict, density: float, profile_lengths: list[int], block: int, seed: int = 0) -> MoAPlan:
    """The optimiser on random influence: unit u loses w_u * (share of context dropped)^p_u under a
    rule, so units differ in how much a short span costs them."""
    layers, kv_heads = config["num_hidden_layers"], config["num_key_value_heads"]
    extend = default_extend_length(profile_lengths)
    rules = rule_grid(profile_lengths, extend)
    rng = np.random.default_rng(seed)
    weight, power = rng.lognormal(0, 1, (layers * kv_heads, 1)), rng.uniform(0.3, 3, (layers * kv_heads, 1))
    lengths = sorted({*profile_lengths, extend})
    slots = {n: slots_table(rules, n, block) for n in lengths}
    losses = {n: weight * (1 - slots[n][None, :] / n) ** power for n in profile_lengths}
    problem = Problem(losses=losses, slots=slots, layer_of=np.repeat(np.arange(layers), kv_heads),
                      density={n: density for n in lengths})
    best = solve(problem, max(profile_lengths), time_limit=60)
    if best is None:
        raise RuntimeError(f"no synthetic plan at density {density}")
    chosen = [rules[r] for r in best.choice]
    return plan_of(config, [[float(a) for a, _ in chosen[i * kv_heads:(i + 1) * kv_heads]] for i in range(layers)],
                   [[float(b) for _, b in chosen[i * kv_heads:(i + 1) * kv_heads]] for i in range(layers)],
                   density, profile_lengths, block, rule_cap=2)


def plan_of(config: dict, alphas, betas, density: float, profile_lengths: list[int], block: int,
            rule_cap: int | None) -> MoAPlan:
    plan = MoAPlan(model={"name": "llama3-8b-shape", "num_layers": config["num_hidden_layers"],
                          "num_q_heads": config["num_attention_heads"], "num_kv_heads": config["num_key_value_heads"],
                          "head_dim": config["hidden_size"] // config["num_attention_heads"]},
                   alphas=alphas, betas=betas, profile_lengths=profile_lengths,
                   extend_length=default_extend_length(profile_lengths),
                   validation_length=default_validation_length(profile_lengths), density_target=density,
                   block_size=block, rule_cap_per_layer=rule_cap)
    plan.density_at = {str(n): plan.density(n) for n in plan.lengths()}
    return plan


def uniform_plan(config: dict, density: float, profile_lengths: list[int], block: int) -> MoAPlan:
    """Sink + window at the same density for every unit: (alpha 0, beta density), StreamingLLM-like."""
    shape = (config["num_hidden_layers"], config["num_key_value_heads"])
    return plan_of(config, np.zeros(shape).tolist(), np.full(shape, density).tolist(), density, profile_lengths, block, 1)


def moa_dir(base: Path, plan: MoAPlan) -> Path:
    d = Path(tempfile.mkdtemp(prefix="moa-shape-"))
    for f in base.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    save_plan(d / PLAN_FILE, plan)
    save_model_info(d, ModelInfo(kind="llm", method="moa", settings={"plan": PLAN_FILE}))
    return d


def attention_us(engine: LLMEngine, batch: int, n: int, device: str, scattered: bool = False
                 ) -> tuple[float, float] | None:
    """(µs per layer-step, KV GB/s) of the arm's decode attention kernel alone: all layers over a cache
    as the engine lays it out for `batch` requests of n tokens (CUDA only). Pages are consecutive, or
    with `scattered` a random draw from the whole pool, as a long-running server's free list hands them
    out (the reads then spread over the pool's tens of GB: page-table reach, not bandwidth, may bound them)."""
    if device != "cuda":
        return None
    mr = engine.model_runner
    spec, model = mr.kv_spec, mr.model
    blocks = spec.blocks_for(n)
    pool_k, pool_v = mr.kv_caches[0]
    if blocks * batch > pool_k.shape[0] - 1:
        return None
    order = torch.randperm if scattered else torch.arange
    tables = order(pool_k.shape[0] - 1, device=device)[:blocks * batch].int().view(batch, blocks)
    heads, hd = model.config.num_attention_heads, spec.head_dim
    q = torch.randn(batch, heads, hd, dtype=pool_k.dtype, device=device)
    lens = torch.full((batch,), n, dtype=torch.int32, device=device)
    if hasattr(spec, "plan_block_size"):  # MoA: every layer's units at their own valid lengths
        from leanserve.kernels.moa_decode import moa_decode_attention
        from leanserve.models.moa_plan import kv_slots_tensor
        cap = kv_slots_tensor(spec.alphas, spec.betas, torch.tensor(n), spec.plan_block_size)  # [L, U]
        pages = -(-cap // spec.block_size)
        offsets = (pages.flatten().cumsum(0) - pages.flatten()).view_as(cap).int().to(device)
        valid = cap.clamp_max(n).int().to(device)
        bound = int(valid.max())
        calls = [lambda i=i: moa_decode_attention(q, pool_k, pool_v, tables, offsets[i].expand(batch, -1),
                                                  valid[i].expand(batch, -1), hd ** -0.5, bound)
                 for i in range(spec.num_layers)]
        kv_bytes = int(valid.sum()) * batch * 2 * hd * pool_k.element_size()
    else:
        from leanserve.kernels.paged_attention import paged_decode_attention
        calls = [lambda i=i: paged_decode_attention(q, *mr.kv_caches[i], tables, lens, hd ** -0.5, n)
                 for i in range(spec.num_layers)]
        kv_bytes = batch * n * spec.num_layers * 2 * spec.num_kv_heads * hd * pool_k.element_size()
    seconds = float(np.median(time_calls(lambda: [c() for c in calls], device, 20, warmup=3)))
    return seconds / spec.num_layers * 1e6, kv_bytes / seconds / 1e9


ARMS = ("dense", "uniform", "moa", "moa_max", "hf_generate")


def prefill_steps(batch: int, context: int, budget: int) -> int:
    """At most the engine steps until `batch` prompts of `context` tokens are prefilled at `budget`
    tokens a step, of which the decodes of the requests already started take up to one each."""
    return -(-batch * context // max(1, budget - batch))


def planned_len(args, context: int) -> int:
    """Prompt + max_tokens of every request at `context` (run_arm's docstring says why)."""
    budget = max(args.prefill_tokens, context)
    return context + args.decode_steps + args.profile_steps + prefill_steps(args.max_batch, context, budget)


def run_arm(path: Path, arm: str, context: int, batch: int | None, args, device: str) -> dict:
    """One engine for one arm at one context; batch None = the largest the KV memory holds. Every
    request gets room to decode --decode-steps tokens at the full batch after the last prompt's prefill: the
    first requests decode (and would finish) while the later prompts prefill, one step per `budget`
    prompt tokens, so max_tokens adds the prefill steps of the largest batch (--max-batch) and the
    profiled steps; every arm of a context plans the same length, so all decode at the same context."""
    cap = batch or args.max_batch
    n = planned_len(args, context)
    config = EngineConfig(model=str(path), load_format="dummy", device=device, dtype=args.dtype, max_model_len=n,
                          max_num_seqs=cap, max_num_batched_tokens=max(args.prefill_tokens, context),
                          gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_gib=args.cpu_kv_cache_gib,
                          block_size=args.block_size, enable_prefix_caching=False)
    free_device_memory(device)
    engine = LLMEngine(config)
    spec, bm = engine.model_runner.kv_spec, engine.core.block_manager
    per_request = spec.blocks_for(n)
    fits = bm.num_blocks // per_request
    batch = min(cap, fits) if batch is None else batch
    if batch > fits:
        raise RuntimeError(f"{arm}: batch {batch} does not fit {bm.num_blocks} blocks ({per_request} per request)")
    rng = random.Random(context)
    prompts = [[rng.randrange(3, TOKENS) for _ in range(context)] for _ in range(batch)]
    profile = {}
    hook = (lambda e: profile.update(profile_steps(e, args.profile_steps))) if args.profile_steps else None
    timing = time_engine(engine, prompts, n - context, on_decode=hook)
    row = {"arm": arm, "context": context, "batch": batch, "tok_s": timing["decode_tok_s"],
           "decode_steps": timing["decode_steps"],
           "prefill_s": timing["prefill_s"], "peak_mem_gb": peak_memory_gib(device),
           "kv_gb_per_request": per_request * spec.bytes_per_block / 1e9, "kv_blocks_total": bm.num_blocks}
    attn = attention_us(engine, batch, n, device)
    if attn is not None:
        row["attention_us_per_layer_step"], row["attention_kv_gbs"] = attn
        row["attention_us_per_layer_step_scattered"], _ = attention_us(engine, batch, n, device, scattered=True)
    if profile:
        row["profile"] = profile
    del engine
    free_device_memory(device)
    print(json.dumps(row))
    return row


TOKENS = 512  # prompt token ids below the smallest vocabulary here


def hf_row(base: Path, context: int, batch: int, steps: int, device: str) -> dict:
    rng = random.Random(context)
    prompts = [[rng.randrange(3, TOKENS) for _ in range(context)] for _ in range(batch)]
    free_device_memory(device)
    hf = hf_generate(base, prompts, steps)
    return {"arm": "hf_generate", "context": context, "batch": batch, "tok_s": hf["decode_tok_s"],
            "peak_mem_gb": peak_memory_gib(device)}


def summarize(rows: list[dict]) -> dict:
    """Per context, the ratios whose arms have run."""
    summary = {}
    for context in dict.fromkeys(r["context"] for r in rows):
        by_arm = {r["arm"]: r for r in rows if r["context"] == context}
        ratios = {"moa_max_over_dense_tok_s": ("moa_max", "dense", "tok_s"),
                  "moa_over_dense_tok_s_same_batch": ("moa", "dense", "tok_s"),
                  "moa_over_uniform_tok_s": ("moa", "uniform", "tok_s"),
                  "kv_per_request_dense_over_moa": ("dense", "moa", "kv_gb_per_request")}
        summary[str(context)] = {name: by_arm[a][key] / by_arm[b][key] for name, (a, b, key) in ratios.items()
                                 if a in by_arm and b in by_arm}
    return summary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--decode-steps", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=256, help="cap of the memory-fitting batches")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--prefill-tokens", type=int, default=16384, help="token budget of an engine step")
    ap.add_argument("--block-size", type=int, default=64,
                    help="the plan's block (sink) size and the engine's block = MoA page size (spec §9.4: 64)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers generate row")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="wall-clock budget of the whole run")
    ap.add_argument("--arm-min-s", type=float, default=90,
                    help="an arm that would start with less of the budget left is skipped")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="CUDA: profile this many decode steps of each arm (not timed) into its row")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, contexts 64 and 128, 8 steps")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS,
                    help="the arms to run (uniform and moa need dense: it sets their batch)")
    args = ap.parse_args()
    deadline = Deadline(args.budget_s)  # the plans' MILP counts too
    logging.basicConfig(level=logging.WARNING)
    config, device = LLAMA3_8B, "cuda"
    args.dtype, args.cpu_kv_cache_gib = "bfloat16", 1.0
    if args.smoke:
        config, device = TINY, "cpu"
        args.contexts, args.decode_steps, args.max_batch, args.prefill_tokens = [64, 128], 8, 8, 256
        args.block_size, args.dtype, args.cpu_kv_cache_gib = 16, "float32", 2 * 2 * 2 * 16 * 16 * 4 * 24 / 2**30
    longest = max(planned_len(args, c) for c in args.contexts)
    config = dict(config, max_position_embeddings=max(config["max_position_embeddings"], longest))
    base = model_dir(config)
    # the optimiser's lengths, as MoA profiles at N1, 2N1, 4N1: from half the shortest context, but
    # long enough that the 2-block minimum span stays within the density budget at N1
    n1 = max(int(4 * args.block_size / args.density), min(args.contexts) // 2)
    profile = [n1, 2 * n1, 4 * n1]
    plans = {"moa": synthetic_plan(config, args.density, profile, args.block_size),
             "uniform": uniform_plan(config, args.density, profile, args.block_size)}
    dirs = {name: moa_dir(base, plan) for name, plan in plans.items()}
    bw = copy_bandwidth_gbs() if device == "cuda" else None
    rows = []
    results = {"model": "tiny (smoke)" if args.smoke else "Llama-3-8B shape, random bf16 weights",
               "density": args.density, "plan_density_at": plans["moa"].density_at, "copy_bandwidth_gbs": bw,
               "decode_steps": args.decode_steps, "rows": rows, "summary": {}, "skipped": [], "complete": False,
               "goals": "moa_max >= 1.8x dense decode tok/s at 16k (density 0.5); >= 1.4x less KV per request"}

    def save() -> Path:
        return write_result("moa_gpu_smoke" if args.smoke else "moa_gpu", results,
                            **({"out_dir": args.out_dir} if args.out_dir else {}))

    def arm(name: str, context: int, measure) -> dict | None:
        """One row, unless the budget is nearly spent; the JSON is rewritten either way."""
        if name not in args.arms:
            return None
        if deadline.left() < args.arm_min_s:
            results["skipped"].append(f"{name} at {context}")
            print(f"{name} at {context}: skipped, {deadline.left():.0f} s of the budget left", flush=True)
            row = None
        else:
            row = measure()
            rows.append(row)
            results["summary"] = summarize(rows)
        save()
        return row

    for context in args.contexts:
        dense = arm("dense", context, lambda: run_arm(base, "dense", context, None, args, device))
        for name in ("uniform", "moa"):  # at dense's batch
            if dense is None:
                results["skipped"].append(f"{name} at {context} (no dense batch)")
                continue
            arm(name, context, lambda name=name: run_arm(dirs[name], name, context, dense["batch"],
                                                         args, device))
        arm("moa_max", context, lambda: run_arm(dirs["moa"], "moa_max", context, None, args, device))
        if dense is not None and context == args.contexts[0] and not args.no_hf and device == "cuda":
            arm("hf_generate", context, lambda: hf_row(base, context, dense["batch"], args.decode_steps, device))
    results["complete"] = not results["skipped"]
    out = save()
    print(json.dumps(results["summary"], indent=2))
    print(out)


if __name__ == "__main__":
    main()
