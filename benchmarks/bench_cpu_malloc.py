"""The CPU engine with glibc malloc's defaults vs freed memory kept (runtime.keep_freed_host_memory,
which ModelRunner calls on CPU), interleaved pairs of fresh processes so that a noisy machine hits
both arms alike.

    python benchmarks/bench_cpu_malloc.py [--pairs 3] [--batch 64] [--prompt-len 128] [--max-tokens 64]

Each process: zoo/chat-tiny in an in-process LLMEngine, one intra-op thread, one warm-up call, then
`generate` of --batch random-id prompts (greedy, ignore_eos) timed end to end (prefill included).
Writes results/cpu_malloc-<cpu>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import write_result

ROOT = Path(__file__).resolve().parents[1]

ONE_RUN = """
import json, random, sys, time
import torch
torch.set_num_threads(1)
import leanserve.server.engine.model_runner as model_runner
if sys.argv[1] == "default":  # the control: glibc's own thresholds
    model_runner.keep_freed_host_memory = lambda: False
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.sampling_params import SamplingParams
batch, prompt_len, max_tokens = map(int, sys.argv[2:5])
engine = LLMEngine(EngineConfig(model=sys.argv[5], device="cpu", dtype="float32",
                                max_model_len=prompt_len + max_tokens))
rng = random.Random(0)
prompts = [[rng.randrange(10, 2000) for _ in range(prompt_len)] for _ in range(batch)]
params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
engine.generate(prompts[:4], [params] * len(prompts[:4]))  # warm-up
start = time.perf_counter()
engine.generate(prompts, [params] * batch)
print(json.dumps(batch * max_tokens / (time.perf_counter() - start)))
"""


def run(mode: str, args) -> float:
    out = subprocess.run([sys.executable, "-c", ONE_RUN, mode, str(args.batch), str(args.prompt_len),
                          str(args.max_tokens), str(ROOT / "zoo" / "chat-tiny")],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise SystemExit(f"the {mode} arm failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    tok_s = {"default": [], "kept": []}
    for i in range(args.pairs):
        for mode in tok_s:
            tok_s[mode].append(run(mode, args))
            print(f"pair {i}: {mode} {tok_s[mode][-1]:.0f} tok/s", flush=True)
    results = {"model": "zoo/chat-tiny (float32 on CPU, 1 thread)", "batch": args.batch,
               "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "tok_s": tok_s,
               "mean_tok_s": {m: statistics.mean(v) for m, v in tok_s.items()},
               "kept_over_default_per_pair": [k / d for k, d in zip(tok_s["kept"], tok_s["default"])]}
    print(json.dumps(results["mean_tok_s"]), results["kept_over_default_per_pair"])
    path = write_result("cpu_malloc", results, **({"out_dir": args.out_dir} if args.out_dir else {}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
