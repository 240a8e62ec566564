"""GPU: decode tok/s of an SGLD-style ensemble served as one model (models/ensemble.py) next to one of
its members at equal batch, Llama-3-8B shape, random bf16 weights, leanserve's engine with CUDA graphs.

    python benchmarks/bench_bayes_gpu.py [--members 4] [--batches 1 32] [--prompt-len 128] [--max-tokens 128]
    python benchmarks/bench_bayes_gpu.py --smoke --out-dir DIR    # the same path on CPU at toy sizes (tests)

Rows: one_member (the base directory), token_mean (S members, scope full: every step runs all S and
samples from the mixture) and sequence_sample (one drawn member per sequence). No weight file is
written: both directories hold config.json + tokenizer (+ leanserve.json), and --load-format dummy
fills the base and the members with random weights (speed does not depend on their values).

Decode reads every weight it uses once per step plus each sequence's KV cache, so the bandwidth
bound at batch b is b tokens per (weight bytes read + KV bytes read) / copy bandwidth. token_mean
reads S x the weights and S x the KV of one member: ideal ratio to one member 1/S. sequence_sample's
captured decode step runs every member's GEMM on every row (see models/ensemble.py), so its bound
counts all S members' weights, with one member's KV.
"""
from __future__ import annotations

import argparse
import gc
import random
import shutil
import time
from pathlib import Path

import torch
from bench_decode_gpu import LLAMA3_8B, model_dir
from common import RESULTS, copy_bandwidth_gbs, free_device_memory, peak_memory_gib, write_result
from engine_timing import time_engine

from leanserve.models.ensemble_dir import METHOD, member_param_names
from leanserve.models.model_dir import ModelInfo, save_model_info
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine

TOY = dict(LLAMA3_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=512)


def ensemble_dir(base: Path, num_members: int) -> Path:
    """base's config and tokenizer + leanserve.json naming S full-scope members (no members file:
    the engine's dummy load format makes them random)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = base.with_name(base.name + "-ensemble")
    shutil.copytree(base, d)
    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        names = [n for n, _ in AutoModelForCausalLM.from_config(config).named_parameters()]
    settings = {"num_members": num_members, "scope": "full", "ensemble_mode": "token_mean",
                "member_params": member_param_names(names, "full", config.num_hidden_layers,
                                                    config.tie_word_embeddings)}
    save_model_info(d, ModelInfo(kind="llm", method=METHOD, settings=settings))
    return d


def measure(path: Path, model_settings: dict | None, args, device: torch.device, bw: float | None,
            prompts: dict[int, list[list[int]]]) -> dict:
    """Decode rates of one engine at each batch, its memory, and the bandwidth bound of each row
    (every weight of the engine read once per step: true of all three rows' captured steps)."""
    blocks_per_seq = -(-args.max_model_len // args.block_size)
    t = time.perf_counter()
    engine = LLMEngine(EngineConfig(
        model=str(path), load_format="dummy", device=device.type, dtype="float32" if args.smoke else "bfloat16",
        max_num_seqs=max(args.batches), max_model_len=args.max_model_len, block_size=args.block_size,
        max_num_batched_tokens=max(args.batches) * args.prompt_len, model_settings=model_settings,
        num_kv_blocks=max(args.batches) * blocks_per_seq))  # every batch's sequences fit, in every mode
    mr = engine.model_runner
    out = {"engine_init_s": time.perf_counter() - t,
           "weight_bytes": sum(p.numel() * p.element_size() for p in mr.model.parameters()),
           "kv_bytes_per_token": mr.kv_spec.bytes_per_block / mr.kv_spec.block_size,
           "kv_cache_bytes": mr.kv_spec.bytes_per_block * engine.block_manager.num_blocks,
           "cuda_graphs": mr.graph_runner is not None}
    time_engine(engine, prompts[args.batches[0]], 4)  # warm-up
    free_device_memory(device)  # the peak below is serving's, not loading's
    ctx = args.prompt_len + args.max_tokens / 2  # mean context over the decode
    for b in args.batches:
        r = time_engine(engine, prompts[b], args.max_tokens)
        if bw is not None:
            step_bytes = out["weight_bytes"] + b * ctx * out["kv_bytes_per_token"]
            r["bound_tok_s"] = b / (step_bytes / (bw * 1e9))
            r["frac_of_bound"] = r["decode_tok_s"] / r["bound_tok_s"]
        out[f"batch_{b}"] = r
    out["peak_memory_gib"] = peak_memory_gib(device)
    del engine, mr
    gc.collect()
    free_device_memory(device)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--smoke", action="store_true", help="CPU, toy shapes, short runs: checks the script, not speed")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    if args.smoke:
        args.batches, args.prompt_len, args.max_tokens, args.max_model_len = [1, 4], 16, 8, 64
        torch.set_num_threads(1)
    device = torch.device("cpu" if args.smoke else "cuda")
    bw = None if args.smoke else copy_bandwidth_gbs()
    config = TOY if args.smoke else LLAMA3_8B
    base = model_dir(config)
    ens = ensemble_dir(base, args.members)
    rng = random.Random(0)
    vocab = min(config["vocab_size"], 128000)
    prompts = {b: [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(b)] for b in args.batches}

    S = args.members
    rows = {"one_member": measure(base, None, args, device, bw, prompts),
            "token_mean": measure(ens, None, args, device, bw, prompts),
            "sequence_sample": measure(ens, {"ensemble_mode": "sequence_sample"}, args, device, bw, prompts)}
    shutil.rmtree(base)
    shutil.rmtree(ens)
    one = rows["one_member"]
    for name in ("token_mean", "sequence_sample"):
        for b in args.batches:
            r = rows[name][f"batch_{b}"]
            r["over_one_member"] = r["decode_tok_s"] / one[f"batch_{b}"]["decode_tok_s"]
            if bw is not None:
                r["bound_over_one_member"] = r["bound_tok_s"] / one[f"batch_{b}"]["bound_tok_s"]
    results = {"model": "toy Llama shape (smoke)" if args.smoke else "Llama-3-8B shape, random bf16 weights",
               "members": S, "scope": "full", "ideal_token_mean_ratio": 1 / S, "copy_bandwidth_gbs": bw,
               "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "rows": rows,
               "notes": "greedy decode, all batch prompts admitted at once; decode_tok_s counts the full-batch "
                        "steps, from every sequence having its first token to the first finish; bound_tok_s: weights "
                        "read per step (token_mean and sequence_sample's captured step read all S members) + KV "
                        "at the mean context, over the measured copy bandwidth; peak_memory_gib: torch's peak while "
                        "serving (weights + KV + activations + graphs' pool)"}
    out = write_result("bayes_gpu_smoke" if args.smoke else "bayes_gpu", results, args.out_dir)
    print(f"S = {S}; ideal token_mean / one member = {1 / S:.3f}" + (f"; copy bandwidth {bw:.0f} GB/s" if bw else ""))
    print(f"{'row':>16} {'batch':>6} {'tok/s':>9} {'x one':>6} {'bound':>9} {'frac':>5} {'peak GiB':>9}")
    for name, row in rows.items():
        for b in args.batches:
            r = row[f"batch_{b}"]
            bound = f"{r['bound_tok_s']:>9.1f} {r['frac_of_bound']:>5.2f}" if bw else f"{'-':>9} {'-':>5}"
            peak = f"{row['peak_memory_gib']:>9.1f}" if row["peak_memory_gib"] is not None else f"{'-':>9}"
            print(f"{name:>16} {b:>6} {r['decode_tok_s']:>9.1f} {r.get('over_one_member', 1.0):>6.3f} {bound} {peak}")
    print(out)


if __name__ == "__main__":
    main()
