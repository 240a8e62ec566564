"""float32 vs bf16 matmuls on this CPU at the tiny chat model's linear shapes, one intra-op thread: why
`--dtype auto` keeps a bf16 checkpoint in bf16 on a CPU with bf16 dot products (runtime.resolve_dtype).

    python benchmarks/bench_cpu_matmul.py [--rows 1 16 64 512]

x [rows, in] @ W[out, in]^T for zoo/chat-tiny's projections (hidden 256, MLP 768, fused q/k/v 512, the
8,192-token LM head); median of repeated calls. Writes results/cpu_matmul-<cpu>.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import write_result

from leanserve.runtime import cpu_computes_bf16

SHAPES = {"qkv": (256, 512), "o": (256, 256), "gate_up": (256, 1536), "down": (768, 256), "lm_head": (256, 8192)}


def gflops(rows: int, k: int, n: int, dtype: torch.dtype, repeats: int = 200) -> float:
    x, w = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    for _ in range(10):
        x @ w.t()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            x @ w.t()
        times.append((time.perf_counter() - start) / repeats)
    return 2 * rows * k * n / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 512])
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for r in args.rows:
        for name, (k, n) in SHAPES.items():
            f32, bf16 = gflops(r, k, n, torch.float32), gflops(r, k, n, torch.bfloat16)
            rows.append({"rows": r, "proj": name, "in": k, "out": n, "float32_gflops": f32, "bfloat16_gflops": bf16,
                         "bf16_over_float32": bf16 / f32})
            print(f"{r:4d} rows {name:8s} float32 {f32:6.1f}  bf16 {bf16:6.1f} GFLOP/s  ({bf16 / f32:.2f}x)")
    path = write_result("cpu_matmul", {"threads": 1, "cpu_computes_bf16": cpu_computes_bf16(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
