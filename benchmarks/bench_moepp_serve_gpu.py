"""Serving through HTTP: a trained MoE++ model against the same-size plain MoE model, decode tok/s as a
streaming client sees it (issue 16's end-to-end number).

    python benchmarks/bench_moepp_serve_gpu.py --models moe=runs/moepp/runs/moe-seed0 \
        moepp=runs/moepp/runs/moepp-tau0.75-seed0 [--concurrency 1 16 64]
    python benchmarks/bench_moepp_serve_gpu.py --smoke --models moe=DIR moepp=DIR --out-dir DIR  # CPU

Each model in turn is served by its own `leanserve serve --model DIR` process (the fused Triton MoE++
layer and CUDA graphs on a GPU), then driven by bench_serve_gpu.py's closed-loop streaming clients. The
prompts are real text, not random ids: windows of --prompt-len tokens of Python stdlib source (tokenised
by the model's tokenizer), each request a different window so no prefix-cache hit. Routing depends on
the input, so random token ids would measure a share the model never sees. Rows per (arm, concurrency):
out_tok_s, TTFT and ITL percentiles (bench_serve_gpu.text_summary), and the speedup of each arm's
tok/s over the first --models entry at the same concurrency.

What to expect: a decode step reads every layer's touched expert weights once, so MoE++ can only win
where those bytes (or the expert GEMMs) dominate the step. For the small-scale experiment's models
(114M parameters, ~210 MB of bf16 expert weights) a step is launch- and host-bound, so a gain there
is an upper bound on nothing; the layer benchmark (bench_moepp_gpu.py) isolates the FFN.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench_serve_gpu import Bench, log, warm_up
from server_utils import remote_server

ROOT = Path(__file__).resolve().parents[1]


def real_text_prompts(model_dir: Path, count: int, length: int) -> list[list[int]]:
    """`count` distinct windows of `length` token ids of stdlib source, in file order."""
    from transformers import AutoTokenizer

    from leanserve.data.corpus import stdlib_files
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids: list[int] = []
    for f in stdlib_files():
        ids += tokenizer(f.text)["input_ids"]
        if len(ids) >= count * length:
            break
    if len(ids) < count * length:
        raise SystemExit(f"only {len(ids)} stdlib tokens for {count} prompts of {length}")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def parse_models(items: list[str]) -> dict[str, Path]:
    models = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not (Path(path) / "config.json").is_file():
            raise SystemExit(f"--models {item!r}: expected NAME=DIR with a model directory (config.json)")
        models[name] = Path(path)
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", required=True, help="NAME=DIR ...; the first is the baseline")
    ap.add_argument("--concurrency", type=int, nargs="+")
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--requests-per-stream", type=int, default=4)
    ap.add_argument("--min-requests", type=int)
    ap.add_argument("--client-procs", type=int)
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--server-args", default="", help="more `leanserve serve` flags, e.g. '--enforce-eager'")
    ap.add_argument("--budget-s", type=float, default=480, help="wall-clock budget of the whole run")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--smoke", action="store_true", help="CPU, toy counts (tests)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    gpu = {"concurrency": [1, 16, 64], "prompt_len": 256, "max_tokens": 128, "min_requests": 32, "client_procs": 4,
           "max_model_len": 512}
    smoke = {"concurrency": [1, 2], "prompt_len": 16, "max_tokens": 8, "min_requests": 2, "client_procs": 1,
             "max_model_len": 64}
    for name, value in (smoke if args.smoke else gpu).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.smoke:
        args.requests_per_stream = 1
    models = parse_models(args.models)

    # every row of an arm takes fresh windows (the server's prefix cache outlives a row)
    requests = sum(max(args.requests_per_stream * c, args.min_requests) for c in args.concurrency)
    prompts = real_text_prompts(next(iter(models.values())), requests, args.prompt_len)
    results = {"models": {n: str(p) for n, p in models.items()}, "prompt_len": args.prompt_len,
               "max_tokens": args.max_tokens, "prompts": "distinct windows of Python stdlib source", "rows": []}
    bench = Bench(args, "moepp_serve_smoke" if args.smoke else "moepp_serve_gpu", results)
    served_args = ["--max-num-seqs", str(max(args.concurrency)), "--max-model-len", str(args.max_model_len),
                   "--served-model-name", "llm", "--jobs-dir", "", *(["--device", "cpu"] if args.smoke else []),
                   *args.server_args.split()]
    try:
        for name, path in models.items():
            log(f"{name}: serving {path}")
            started = time.monotonic()
            with remote_server(path, *served_args, startup_timeout=args.startup_timeout) as server:
                log(f"{name}: up in {time.monotonic() - started:.0f} s")
                warm_up(server.url, "llm", (3, 100))
                before = len(results["rows"])
                bench.text_rows(server, "llm", (3, 100), lambda c: None, prompt_pool=prompts)
                for row in results["rows"][before:]:
                    row["arm"] = name
            bench.save()
    finally:
        bench.load.close()
    base = next(iter(models))
    by_c = {r["concurrency"]: r for r in results["rows"] if r["arm"] == base and "out_tok_s" in r}
    for row in results["rows"]:
        if "out_tok_s" in row and row["concurrency"] in by_c:
            row["speedup_vs_" + base] = row["out_tok_s"] / by_c[row["concurrency"]]["out_tok_s"]
    bench.save()
    for row in results["rows"]:
        log(f"{row['arm']:10s} c={row['concurrency']:4d} " + (f"{row['out_tok_s']:.0f} tok/s, "
            f"{row['speedup_vs_' + base]:.2f}x {base}" if "out_tok_s" in row else row.get("error", "")))
    log(f"wrote {bench.path}")


if __name__ == "__main__":
    sys.exit(main())
