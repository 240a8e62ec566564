"""GPU: decode tokens/s of a Llama-3-8B-shaped model with random bf16 weights, leanserve's
engine (CUDA graphs for decode, and eager with enforce_eager=True) next to transformers
`generate`, in one run, against the memory-bandwidth bound.

    python benchmarks/bench_decode_gpu.py [--batches 1 64] [--prompt-len 128] [--max-tokens 128]

Decode reads every weight once per step plus each sequence's KV cache, so the bound at batch b is
b tokens per (weight bytes + KV bytes) / copy bandwidth, with the copy bandwidth measured here.
Random weights: speed does not depend on their values; outputs are garbage, so ignore_eos.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import torch
from common import copy_bandwidth_gbs, write_result
from engine_timing import time_engine, time_generate

from leanserve.data.tokenizer import train_tokenizer
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine

LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 bos_token_id=0, eos_token_id=2, torch_dtype="bfloat16")


def model_dir(config: dict = LLAMA3_8B) -> Path:
    """config.json + a small local tokenizer (its ids are a subset of the 128k vocabulary)."""
    d = Path(tempfile.mkdtemp(prefix="llama3-8b-shape-"))
    (d / "config.json").write_text(json.dumps(config))
    train_tokenizer([json.__doc__ or "", random.__doc__ or "", time.__doc__ or ""] * 20, d, vocab_size=512)
    return d


def bound_tok_s(batch: int, ctx: float, weight_bytes: int, bw_gbs: float, c: dict = LLAMA3_8B) -> float:
    """Decode tokens/s if every step only read the weights and the batch's bf16 KV at bw_gbs (the
    bandwidth of all the cards that share the reads, for a tensor-parallel model)."""
    kv_bytes = batch * ctx * c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"]) * 2
    return batch / ((weight_bytes + kv_bytes) / (bw_gbs * 1e9))


def hf_generate(path: Path, prompts: list[list[int]], max_tokens: int) -> dict:
    from transformers import AutoConfig, LlamaForCausalLM
    config = AutoConfig.from_pretrained(path)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    return time_generate(model, prompts, max_tokens)  # the model is freed with this frame


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ttft-prompt-len", type=int, default=2048)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the engine logs its graph capture
    bw = copy_bandwidth_gbs()
    path = model_dir()
    rng = random.Random(0)
    prompts = {b: [[rng.randrange(3, 128000) for _ in range(args.prompt_len)] for _ in range(b)] for b in args.batches}

    long_prompt = [[rng.randrange(3, 128000) for _ in range(args.ttft_prompt_len)]]

    def run_engine(enforce_eager: bool) -> tuple[dict, int, float | None]:
        t = time.perf_counter()
        engine = LLMEngine(EngineConfig(model=str(path), load_format="dummy", dtype="bfloat16",
                                        max_num_seqs=max(args.batches), max_model_len=4096, max_num_batched_tokens=4096,
                                        gpu_memory_utilization=0.45, enforce_eager=enforce_eager))
        print(f"engine (enforce_eager={enforce_eager}) ready in {time.perf_counter() - t:.1f} s")
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.model_runner.model.parameters())
        time_engine(engine, prompts[args.batches[0]], 8)  # warm-up
        res = {}
        for b in args.batches:
            r = time_engine(engine, prompts[b], args.max_tokens)
            r["bound_tok_s"] = bound_tok_s(b, args.prompt_len + args.max_tokens / 2, weight_bytes, bw)
            r["frac_of_bound"] = r["decode_tok_s"] / r["bound_tok_s"]
            res[f"batch_{b}"] = r
        # prefill runs eagerly either way: TTFT from the default (graphs) engine only
        ttft = None if enforce_eager else min(time_engine(engine, long_prompt, 1)["prefill_s"] for _ in range(3))
        del engine
        gc.collect(); torch.cuda.empty_cache()
        return res, weight_bytes, ttft

    ours, weight_bytes, ttft = run_engine(enforce_eager=False)
    eager, _, _ = run_engine(enforce_eager=True)
    theirs = {f"batch_{b}": hf_generate(path, prompts[b], args.max_tokens) for b in args.batches}
    results = {"model": "Llama-3-8B shape, random bf16 weights", "copy_bandwidth_gbs": bw, "weight_bytes": weight_bytes,
               "leanserve": ours, "leanserve_eager": eager, "transformers_generate": theirs,
               f"ttft_s_prompt_{args.ttft_prompt_len}": ttft,
               "notes": "Triton decode attention and KV store; leanserve: CUDA graphs for decode steps, "
                        "leanserve_eager: the same engine with enforce_eager=True"}
    out = write_result("decode_gpu", results)
    print(f"copy bandwidth {bw:.0f} GB/s; weights {weight_bytes / 1e9:.2f} GB; TTFT({args.ttft_prompt_len}) {ttft * 1e3:.1f} ms")
    print(f"{'batch':>6} {'graphs tok/s':>13} {'eager tok/s':>12} {'graphs/eager':>13} {'bound':>8} {'frac':>6} "
          f"{'HF generate tok/s':>18}")
    for b in args.batches:
        o, e, t = ours[f"batch_{b}"], eager[f"batch_{b}"], theirs[f"batch_{b}"]
        print(f"{b:>6} {o['decode_tok_s']:>13.1f} {e['decode_tok_s']:>12.1f} {o['decode_tok_s'] / e['decode_tok_s']:>13.2f} "
              f"{o['bound_tok_s']:>8.1f} {o['frac_of_bound']:>6.2f} {t['decode_tok_s']:>18.1f}")
    print(out)


if __name__ == "__main__":
    main()
