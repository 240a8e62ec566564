"""Varlen paged attention (kernels/paged_varlen_attention.py) on the GPU, Llama-3-8B attention shapes
(32 query heads, 8 KV heads, head_dim 128, bf16, 16-token blocks in shuffled block tables), against
its bound max(FLOPs / matmul peak, bytes / copy bandwidth), both measured here (see the kernel's
docstring for the formulas). Steps:
  prefill      one 2048-token prompt chunk, no cached prefix (also torch SDPA, causal, on the same
               K/V laid out contiguously, heads repeated: what a dense flash kernel takes)
  last_chunk   the last 2048-token chunk of an 8192-token prompt (6144 cached)
  mixed        one 2048-token chunk + 64 decode rows at 4096 context: the chunked-prefill step that
               used to loop over sequences in PyTorch (its time is also recorded, the stall a
               decoding stream saw)

    python benchmarks/bench_paged_varlen_gpu.py [--out-dir benchmarks/results]   (CUDA; under a minute)
    python benchmarks/bench_paged_varlen_gpu.py --smoke --out-dir /tmp/x          # CPU, toy sizes
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from common import RESULTS, copy_bandwidth_gbs, time_calls, write_result

FULL = dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16, chunk=2048,
            prefix=6144, decodes=64, decode_ctx=4096)
SMOKE = dict(num_heads=8, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32, chunk=48,
             prefix=40, decodes=3, decode_ctx=70)


def make_step(chunks: list[tuple[int, int]], c: dict, device) -> dict:
    """(cached prefix, new tokens) per sequence -> q, paged caches in shuffled blocks, metadata."""
    from leanserve.models.attention.metadata import AttentionMetadata
    bs = c["block_size"]
    seq_lens = [p + n for p, n in chunks]
    blocks = [-(-n // bs) for n in seq_lens]
    perm = torch.randperm(sum(blocks), device=device)
    tables = torch.full((len(chunks), max(blocks)), -1, dtype=torch.int32, device=device)
    used = 0
    for b, nb in enumerate(blocks):
        tables[b, :nb] = perm[used:used + nb].int()
        used += nb
    shape = (sum(blocks), bs, c["num_kv_heads"], c["head_dim"])
    qsl = [0]
    for _, n in chunks:
        qsl.append(qsl[-1] + n)
    ints = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    meta = AttentionMetadata(slot_mapping=torch.full((qsl[-1],), -1, device=device), query_start_loc=ints(qsl),
                             seq_lens=ints(seq_lens), block_tables=tables, max_query_len=max(n for _, n in chunks),
                             max_seq_len=max(seq_lens), block_size=bs, query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
    return {"q": torch.randn(qsl[-1], c["num_heads"], c["head_dim"], dtype=c["dtype"], device=device),
            "k_cache": torch.randn(shape, dtype=c["dtype"], device=device),
            "v_cache": torch.randn(shape, dtype=c["dtype"], device=device), "meta": meta, "chunks": chunks}


def flops_and_bytes(chunks: list[tuple[int, int]], c: dict) -> tuple[float, float]:
    hq, hkv, d, size = c["num_heads"], c["num_kv_heads"], c["head_dim"], c["dtype"].itemsize
    flops = sum(4 * hq * d * (n * p + n * (n + 1) / 2) for p, n in chunks)  # key count summed over queries
    nbytes = sum((2 * n * hq * d + 2 * (p + n) * hkv * d) * size for p, n in chunks)
    return flops, nbytes


def matmul_tflops(device) -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn_like(a)
    s = min(time_calls(lambda: a @ b, device, 20, warmup=5))
    return 2 * 8192**3 / s / 1e12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes (Triton interpreter): tests the code paths")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel module is imported (below)
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        raise SystemExit("bench_paged_varlen_gpu needs a CUDA GPU (or --smoke)")
    from leanserve.kernels.paged_varlen_attention import paged_varlen_attention, paged_varlen_attention_ref
    from leanserve.models.attention.paged import paged_attention_torch

    c = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke else "cuda")
    runs = 1 if args.smoke else 20
    peak = None if args.smoke else matmul_tflops(device)
    bandwidth = None if args.smoke else copy_bandwidth_gbs()
    n, scale = c["chunk"], c["head_dim"] ** -0.5
    steps = {"prefill": [(0, n)], "last_chunk": [(c["prefix"], n)],
             "mixed": [(0, n)] + [(c["decode_ctx"] - 1, 1)] * c["decodes"]}
    rows = {}
    for name, chunks in steps.items():
        torch.manual_seed(0)
        x = make_step(chunks, c, device)
        meta, out = x["meta"], torch.empty_like(x["q"])
        args_ = (x["q"], x["k_cache"], x["v_cache"], meta.query_start_loc, meta.seq_lens, meta.block_tables, scale)
        triton_fn = lambda: paged_varlen_attention(*args_, out=out)  # noqa: B023, E731
        triton_fn()
        ref = paged_varlen_attention_ref(*args_)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
        flops, nbytes = flops_and_bytes(chunks, c)
        row = {"chunks": f"{len(chunks)} seqs, {chunks[0][1]} new tokens after {chunks[0][0]}"
                         + (f" + {len(chunks) - 1} decodes at {chunks[1][0] + 1}" if len(chunks) > 1 else ""),
               "gflop": flops / 1e9, "mbytes": nbytes / 1e6,
               "triton_ms": 1e3 * min(time_calls(triton_fn, device, runs, warmup=0 if args.smoke else 3))}
        if peak is not None:
            row["bound_ms"] = 1e3 * max(flops / (peak * 1e12), nbytes / (bandwidth * 1e9))
            row["frac_of_bound"] = row["bound_ms"] / row["triton_ms"]
        torch_fn = lambda: paged_attention_torch(x["q"], x["k_cache"], x["v_cache"], meta, scale)  # noqa: B023, E731
        row["torch_paged_ms"] = 1e3 * min(time_calls(torch_fn, device, runs, warmup=0 if args.smoke else 3))
        if name == "prefill":  # the same K/V contiguous, heads repeated (so SDPA may pick flash): a dense kernel
            group = c["num_heads"] // c["num_kv_heads"]
            k, v = (cache[meta.block_tables[0].long()].flatten(0, 1)[:n].repeat_interleave(group, 1)
                    .transpose(0, 1).contiguous()[None] for cache in (x["k_cache"], x["v_cache"]))
            q = x["q"].transpose(0, 1).contiguous()[None]
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # noqa: B023, E731
            torch.testing.assert_close(sdpa()[0].transpose(0, 1), ref, rtol=2e-2, atol=2e-2)
            row["sdpa_contiguous_ms"] = 1e3 * min(time_calls(sdpa, device, runs, warmup=0 if args.smoke else 3))
        rows[name] = row
    config = {k: str(v) for k, v in c.items()}
    path = write_result("paged_varlen_smoke" if args.smoke else "paged_varlen",
                        {"config": config, "matmul_tflops": peak, "copy_bandwidth_gbs": bandwidth, "rows": rows},
                        args.out_dir)
    print(f"matmul peak {peak} TFLOP/s, copy bandwidth {bandwidth} GB/s -> {path}")
    for name, r in rows.items():
        print(f"{name:>11}: triton {r['triton_ms']:8.3f} ms, bound {r.get('bound_ms', float('nan')):8.3f} ms "
              f"({r.get('frac_of_bound', float('nan')):.2f}), torch paged {r['torch_paged_ms']:8.3f} ms  [{r['chunks']}]")


if __name__ == "__main__":
    main()
