"""Tensor-parallel serving through HTTP: a Llama-3-8B-shaped model at TP=1 and TP=2, and a
Llama-3-70B-shaped one (80 layers, hidden 8192, GQA 64/8) at TP=2 if it fits the cards, else TP=4,
each a real `leanserve serve --tensor-parallel-size N --load-format dummy` process driven by
bench_serve_gpu.py's streaming clients, against the memory-bandwidth bound of N cards.

    python benchmarks/bench_tp_gpu.py --shapes 8b [--concurrency 1 64 256]   # 2+ GPUs
    python benchmarks/bench_tp_gpu.py --shapes 70b                           # 2 GPUs of 141 GB, else 4
    python benchmarks/bench_tp_gpu.py --smoke --out-dir DIR     # CPU, 2 gloo ranks, toy shape (tests)

Per (shape, N) and concurrency c: c closed-loop streams of --prompt-len random-id prompts and
--max-tokens output tokens (ignore_eos), as bench_serve_gpu.py's rows (out_tok_s, TTFT, ITL).
- decode_tok_s = c x stream_decode_tok_s (a median request's tokens after its first / the time
  they took): the rate while all c streams decode, which is what the bound describes;
- bound_tok_s: bench_decode_gpu.bound_tok_s with N x the copy bandwidth measured on card 0: every
  card reads its 1/N of the weights (vocabulary included) and of the KV cache each step, all in
  parallel. It ignores the all-reduces (two per layer) that TP adds;
- goals (issue 21): 8B TP=2 decode_tok_s at c=1 >= 1.6x TP=1's; >= 0.75 of the 2-card bound at c=64.
The 70B fits at TP=2 if its per-card weights, the KV of max(c) sequences of prompt + max_tokens
tokens and ACTIVATION_MARGIN_GIB stay under --gpu-memory-utilization of a card.

Results: benchmarks/results/tp_gpu-<gpu>x<cards>.json, written after every row; a run of some shapes
keeps the file's runs of the others (one shape per command fits a 10-minute command limit), and the
goals are recomputed from whatever 8B runs the file then holds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_decode_gpu import LLAMA3_8B, bound_tok_s, model_dir
from bench_serve_gpu import Bench, log, warm_up, weight_bytes  # puts tests/ (server_utils) on sys.path
from common import RESULTS, hardware_slug, write_result
from server_utils import remote_server

LLAMA3_70B = dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8)
# the smoke run's toy shape: the 8B's proportions at a size a CPU serves in seconds (2 KV heads, so TP=2 splits it)
TOY = dict(LLAMA3_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=1024)
ACTIVATION_MARGIN_GIB = 6.0  # peak activations, CUDA graphs' pool, NCCL buffers, the CUDA context


class TPBench(Bench):
    """Bench whose text rows go to the run (shape, N) being measured; the file holds every run."""

    def __init__(self, args, filename: str, results: dict):
        super().__init__(args, "tp_gpu", results)
        self.all, self.filename = results, filename

    def start_run(self, run: dict) -> None:
        self.all["runs"].append(run)
        self.results = run  # where text_rows puts its rows

    def save(self) -> None:
        self.path = write_result("tp_gpu", self.all, self.args.out_dir, filename=self.filename)


def kv_bytes_per_token(c: dict) -> int:
    return c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"]) * 2


def fits(config: dict, wbytes: int, tp: int, card_bytes: int, args) -> bool:
    """Whether one card holds its 1/tp of the weights and of the KV the runs need (see the docstring)."""
    kv = max(args.concurrency) * (args.prompt_len + args.max_tokens) * kv_bytes_per_token(config)
    return (wbytes + kv) / tp + ACTIVATION_MARGIN_GIB * 2**30 <= args.gpu_memory_utilization * card_bytes


def run_shape(bench: TPBench, name: str, config: dict, path: Path, wbytes: int, tp: int, bw: float | None) -> dict:
    """Serve `config` (its model directory `path`, weights of wbytes) at tensor-parallel size `tp` and
    measure every concurrency (one run entry)."""
    a = bench.args
    ctx = a.prompt_len + a.max_tokens / 2
    bound = (lambda c: {"bound_tok_s": bound_tok_s(c, ctx, wbytes, tp * bw, config)}) if bw is not None else (lambda c: None)
    run = {"shape": name, "tensor_parallel_size": tp, "weight_bytes": wbytes, "rows": []}
    bench.start_run(run)
    server_args = ["--served-model-name", "llm", "--load-format", "dummy", "--tensor-parallel-size", str(tp),
                   "--max-num-seqs", str(max(a.concurrency)), "--max-model-len", str(a.max_model_len),
                   "--max-queued-requests", str(4 * max(a.concurrency)),
                   "--gpu-memory-utilization", str(a.gpu_memory_utilization), "--jobs-dir", "",
                   *(["--device", "cpu"] if a.smoke else [])]
    if bench.phase_budget(f"{name} TP={tp}") is None:
        return run
    log(f"{name} at TP={tp}: starting leanserve serve ({' '.join(server_args)})")
    token_range = (3, config["vocab_size"])
    try:
        with remote_server(path, *server_args, startup_timeout=a.startup_timeout) as server:
            warm_up(server.url, "llm", token_range)
            bench.text_rows(server, "llm", token_range, bound)
    except Exception as e:  # noqa: BLE001 - a run that cannot start must not lose the others
        run["error"] = f"{type(e).__name__}: {e}"
        log(f"{name} at TP={tp}: FAILED {run['error']}")
    for row in run["rows"]:
        if row.get("stream_decode_tok_s") is not None:
            row["decode_tok_s"] = row["concurrency"] * row["stream_decode_tok_s"]
            row["decode_frac_of_bound"] = row["bound_tok_s"] and row["decode_tok_s"] / row["bound_tok_s"]
    bench.save()
    return run


def goals(runs: list[dict]) -> dict:
    """Issue 21's targets for the 8B shape, from its TP=1 and TP=2 runs (None where a row is missing)."""
    def row(tp: int, c: int) -> dict:
        return next((r for run in runs if run["shape"] == "llama3-8b" and run["tensor_parallel_size"] == tp
                     for r in run["rows"] if r["concurrency"] == c and "decode_tok_s" in r), {})
    one, two, two64 = row(1, 1), row(2, 1), row(2, 64)
    speedup = two["decode_tok_s"] / one["decode_tok_s"] if one and two else None
    frac = two64.get("decode_frac_of_bound")
    return {"tp2_over_tp1_at_c1": speedup, "tp2_at_c1_goal": 1.6, "tp2_at_c1_met": speedup and speedup >= 1.6,
            "tp2_frac_of_bound_at_c64": frac, "tp2_at_c64_goal": 0.75, "tp2_at_c64_met": frac and frac >= 0.75}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, 2 gloo ranks, toy shape, toy counts (tests)")
    ap.add_argument("--concurrency", type=int, nargs="+")
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--requests-per-stream", type=int, default=2, help="closed-loop requests per stream")
    ap.add_argument("--min-requests", type=int, help="at least this many requests per row")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--client-procs", type=int, help="client processes the streams are spread over")
    ap.add_argument("--shapes", nargs="+", choices=["8b", "70b"], default=["8b", "70b"],
                    help="which shapes to run; runs of the other shapes already in the results file are kept, so "
                         "a time-capped lease can run one shape per command")
    ap.add_argument("--budget-s", type=float, default=540, help="wall-clock budget of this invocation")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    # decode-heavy requests: the bound counts decode only
    defaults = {"concurrency": ([1, 64, 256], [1, 4]), "prompt_len": (128, 16), "max_tokens": (256, 8),
                "min_requests": (16, 4), "client_procs": (4, 1)}
    for name, (gpu, smoke) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else gpu)
    if args.smoke:
        args.requests_per_stream = 1

    import torch
    bw, cards, card_bytes = None, 2, None
    if not args.smoke:
        from common import copy_bandwidth_gbs
        cards = torch.cuda.device_count()
        if cards < 2:
            sys.exit(f"bench_tp_gpu.py needs 2 or more GPUs; {cards} visible (use --smoke on CPU)")
        bw = copy_bandwidth_gbs()
        card_bytes = torch.cuda.mem_get_info()[1]
        torch.cuda.empty_cache()
    else:
        torch.set_num_threads(1)  # as the server's (tests/server_utils.py): the test machine is small
    results = {"model": "random bf16 weights (--load-format dummy)" if not args.smoke else "toy Llama shape (smoke)",
               "cards": cards, "copy_bandwidth_gbs_per_card": bw, "prompt_len": args.prompt_len,
               "max_tokens": args.max_tokens, "runs": [], "goals": None,
               "notes": "closed-loop streams per concurrency, distinct random token-id prompts; see "
                        "benchmarks/bench_tp_gpu.py's docstring for decode_tok_s and the N-card bound"}
    filename = f"tp_gpu{'_smoke' if args.smoke else ''}-{hardware_slug()}x{cards}.json"
    shapes = {"8b": "llama3-8b", "70b": "llama3-70b"}
    previous = Path(args.out_dir) / filename
    if previous.is_file() and not args.smoke:
        redone = {shapes[s] for s in args.shapes}
        results["runs"] = [r for r in json.loads(previous.read_text())["results"]["runs"] if r["shape"] not in redone]
    bench = TPBench(args, filename, results)
    try:
        if args.smoke:  # one server: the TP=2 path of every phase (TP=1 is the ordinary serve path)
            path = model_dir(TOY)
            run_shape(bench, "toy", TOY, path, weight_bytes(path), 2, None)
        if not args.smoke and "8b" in args.shapes:
            path = model_dir(LLAMA3_8B)
            for tp in (1, 2):
                run_shape(bench, "llama3-8b", LLAMA3_8B, path, weight_bytes(path), tp, bw)
        if not args.smoke and "70b" in args.shapes:
            path = model_dir(LLAMA3_70B)
            wbytes = weight_bytes(path)
            tp = next((n for n in (2, 4) if n <= cards and fits(LLAMA3_70B, wbytes, n, card_bytes, args)), None)
            if tp is None:
                results["llama3_70b_skipped"] = (f"{wbytes / 2**30:.0f} GiB of weights fit neither 2 nor 4 of "
                                                 f"these {cards} cards at the runs' KV")
            else:
                run_shape(bench, "llama3-70b", LLAMA3_70B, path, wbytes, tp, bw)
        if not args.smoke:
            results["goals"] = goals(results["runs"])
            log(f"goals: {results['goals']}")
        bench.save()
    finally:
        bench.load.close()
    log(f"wrote {bench.path}")


if __name__ == "__main__":
    main()
