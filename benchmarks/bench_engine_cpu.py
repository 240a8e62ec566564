"""CPU: engine output tokens/s with 1 vs 16 concurrent streams on the tiny chat model, next to
transformers `generate` on the same weights (fp32, the same prompts).

    python benchmarks/bench_engine_cpu.py [--model zoo/chat-tiny] [--threads N]

Continuous batching should turn idle per-step overhead into throughput: the 16-vs-1 ratio is
that claim, and leanserve / generate at each batch the claim against the library baseline.
"""
from __future__ import annotations

import argparse
import random

import torch
from common import write_result
from engine_timing import time_engine, time_generate

from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine

BATCHES = (1, 16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo/chat-tiny")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, help="torch threads for both; on a shared machine 1 is steadier "
                                                   "than contended ones (OpenMP spins)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(model=args.model, device="cpu", dtype="float32", max_num_seqs=16,
                                    max_model_len=512, enable_prefix_caching=False))
    rng, vocab_size = random.Random(0), engine.vocab_size
    prompt = lambda: [rng.randrange(100, vocab_size) for _ in range(args.prompt_len)]  # noqa: E731
    prompts = {b: [prompt() for _ in range(b)] for b in BATCHES}
    time_engine(engine, [prompt()], 8)  # warm-up
    rows = {f"streams_{b}": time_engine(engine, prompts[b], args.max_tokens) for b in BATCHES}
    del engine

    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    theirs = {f"streams_{b}": time_generate(model, prompts[b], args.max_tokens) for b in BATCHES}
    ratio = rows["streams_16"]["tok_s"] / rows["streams_1"]["tok_s"]
    vs_generate = {name: rows[name]["tok_s"] / theirs[name]["tok_s"] for name in rows}
    path = write_result("engine_cpu", {"model": args.model, "threads": torch.get_num_threads(), **rows, "ratio_16_vs_1": ratio,
                                       "transformers_generate": theirs, "vs_generate": vs_generate})
    for name, r in rows.items():
        print(f"{name:>10}: {r['tok_s']:8.1f} tok/s (decode {r['decode_tok_s']:8.1f} tok/s); generate "
              f"{theirs[name]['tok_s']:8.1f} tok/s: {vs_generate[name]:.2f}x")
    print(f"ratio 16 vs 1: {ratio:.2f}x -> {path}")


if __name__ == "__main__":
    main()
