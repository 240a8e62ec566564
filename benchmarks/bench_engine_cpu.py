"""CPU: engine output tokens/s with 1 vs 16 concurrent streams on the tiny chat model.

    python benchmarks/bench_engine_cpu.py [--model zoo/chat-tiny]

Continuous batching should turn idle per-step overhead into throughput: the ratio is the claim.
"""
from __future__ import annotations

import argparse
import random

from common import write_result
from engine_timing import time_engine

from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo/chat-tiny")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, device="cpu", max_num_seqs=16, max_model_len=512,
                                    enable_prefix_caching=False))
    rng = random.Random(0)
    prompt = lambda: [rng.randrange(100, engine.vocab_size) for _ in range(args.prompt_len)]  # noqa: E731
    time_engine(engine, [prompt()], 8)  # warm-up
    rows = {f"streams_{b}": time_engine(engine, [prompt() for _ in range(b)], args.max_tokens) for b in (1, 16)}
    ratio = rows["streams_16"]["tok_s"] / rows["streams_1"]["tok_s"]
    path = write_result("engine_cpu", {"model": args.model, **rows, "ratio_16_vs_1": ratio})
    for name, r in rows.items():
        print(f"{name:>10}: {r['tok_s']:8.1f} tok/s (decode {r['decode_tok_s']:8.1f} tok/s)")
    print(f"ratio 16 vs 1: {ratio:.2f}x -> {path}")


if __name__ == "__main__":
    main()
