"""Paged decode attention on the GPU, Llama-3-8B attention shapes (32 query heads, 8 KV heads,
head_dim 128, bf16, 16-token blocks in shuffled non-contiguous block tables).

Side by side in one run: the Triton split-K kernel, torch SDPA on the same K/V laid out
contiguously ([B, Hkv, L, D], GQA via enable_gqa), and (small sizes) the engine's PyTorch paged
path (gather + SDPA). The kernel's bound is reading the cache once, so each row reports achieved
GB/s of KV bytes read (B * L * Hkv * D * 2 * 2 bytes) and its fraction of the measured device copy
bandwidth. A short sweep of the kernel's tuning knobs at three sizes is recorded too.

    python benchmarks/bench_paged_attention.py      (CUDA only; about a minute on an H100)
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import triton.testing
from common import (  # benchmarks/ is on sys.path when run as a script
    copy_bandwidth_gbs,
    write_result,
)

from leanserve.kernels.paged_attention import (
    BLOCK_N,
    num_kv_splits,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from leanserve.models.attention.metadata import AttentionMetadata
from leanserve.models.attention.paged import paged_decode_attention_torch

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
CONTEXTS = [1024, 4096, 16384, 32768]
BATCHES = [1, 8, 64]
TORCH_PAGED_MAX_TOKENS = 8 * 4096  # batch * context up to which the PyTorch paged path is timed
SWEEP_SIZES = [(1, 32768), (8, 4096), (64, 4096)]
SWEEP_CONFIGS = [dict(block_n=bn, num_warps=w, num_stages=s) for bn in (32, 64, 128) for w, s in ((4, 2), (4, 3), (8, 2))]
SCALE = HEAD_DIM ** -0.5


def make_inputs(batch: int, context: int) -> dict:
    """Contiguous K/V [B, Hkv, L, D] and the same values scattered into randomly permuted cache blocks."""
    blocks_per_seq = context // BLOCK_SIZE
    tables = torch.randperm(batch * blocks_per_seq, device="cuda").view(batch, blocks_per_seq)
    x = {"q": torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda"),
         "block_tables": tables.int(), "seq_lens": torch.full((batch,), context, dtype=torch.int32, device="cuda")}
    for name in ("k", "v"):
        dense = torch.randn(batch, NUM_KV_HEADS, context, HEAD_DIM, dtype=DTYPE, device="cuda")
        cache = torch.empty(batch * blocks_per_seq, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        cache[tables.flatten()] = (dense.view(batch, NUM_KV_HEADS, blocks_per_seq, BLOCK_SIZE, HEAD_DIM)
                                   .permute(0, 2, 3, 1, 4).reshape(-1, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM))
        x[name], x[f"{name}_cache"] = dense, cache
    return x


def triton_fn(x: dict, context: int, **knobs):
    out = torch.empty_like(x["q"])
    return lambda: paged_decode_attention(x["q"], x["k_cache"], x["v_cache"], x["block_tables"], x["seq_lens"],
                                          SCALE, context, out=out, **knobs)


def sdpa_fn(x: dict):
    q = x["q"].unsqueeze(2)  # [B, Hq, 1, D]
    return lambda: F.scaled_dot_product_attention(q, x["k"], x["v"], scale=SCALE, enable_gqa=True)


def torch_paged_fn(x: dict, context: int):
    batch = x["q"].shape[0]
    meta = AttentionMetadata(slot_mapping=torch.full((batch,), -1, device="cuda"),
                             query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
                             seq_lens=x["seq_lens"], block_tables=x["block_tables"], max_query_len=1,
                             max_seq_len=context, block_size=BLOCK_SIZE)
    return lambda: paged_decode_attention_torch(x["q"], x["k_cache"], x["v_cache"], meta, SCALE)


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def fits(batch: int, context: int) -> bool:
    kv_bytes = batch * context * NUM_KV_HEADS * HEAD_DIM * 2 * DTYPE.itemsize
    # paged + contiguous copies, one scatter temporary, the gather path's copies, slack
    need = 2 * kv_bytes + kv_bytes // 2 + (2 * kv_bytes if batch * context <= TORCH_PAGED_MAX_TOKENS else 0)
    return need + (2 << 30) < torch.cuda.mem_get_info()[0]


def check_correctness() -> None:
    torch.manual_seed(0)
    x = make_inputs(8, 1024)
    out = triton_fn(x, 1024)()
    ref = paged_decode_attention_ref(x["q"], x["k_cache"], x["v_cache"], x["block_tables"], x["seq_lens"], SCALE)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(sdpa_fn(x)().squeeze(2), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(torch_paged_fn(x, 1024)(), ref, rtol=1e-2, atol=1e-2)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_paged_attention needs a CUDA GPU")
    check_correctness()
    copy_gbs = copy_bandwidth_gbs()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows, sweep = [], []
    for context in CONTEXTS:
        for batch in BATCHES:
            row = {"batch": batch, "context": context}
            rows.append(row)
            if not fits(batch, context):
                row["skipped"] = "does not fit GPU memory"
                continue
            torch.manual_seed(0)
            x = make_inputs(batch, context)
            kv_bytes = batch * context * NUM_KV_HEADS * HEAD_DIM * 2 * DTYPE.itemsize
            row.update(kv_bytes=kv_bytes, splits=num_kv_splits(batch, NUM_KV_HEADS, context, num_sms))
            timed = {"triton": triton_fn(x, context), "sdpa": sdpa_fn(x)}
            if batch * context <= TORCH_PAGED_MAX_TOKENS:
                timed["torch_paged"] = torch_paged_fn(x, context)
            for name, fn in timed.items():
                try:
                    ms = bench_ms(fn)
                except torch.OutOfMemoryError:  # e.g. an SDPA backend that expands GQA heads
                    row[f"{name}_ms"] = None
                    torch.cuda.empty_cache()
                    continue
                gbs = kv_bytes / (ms * 1e-3) / 1e9
                row.update({f"{name}_ms": ms, f"{name}_gbs": gbs, f"{name}_frac_copy": gbs / copy_gbs})
            if row["sdpa_ms"] is not None:
                row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["triton_ms"]
            if (batch, context) in SWEEP_SIZES:
                for knobs in SWEEP_CONFIGS:
                    ms = bench_ms(triton_fn(x, context, **knobs))
                    sweep.append({"batch": batch, "context": context, **knobs, "ms": ms,
                                  "frac_copy": kv_bytes / (ms * 1e-3) / 1e9 / copy_gbs})
            del x, timed
            torch.cuda.empty_cache()

    config = {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM, "dtype": str(DTYPE),
              "block_size": BLOCK_SIZE, "block_n": BLOCK_N, "num_sms": num_sms, "torch": torch.__version__,
              "triton": triton.__version__}
    path = write_result("paged_attention", {"copy_bandwidth_gbs": copy_gbs, "config": config,
                                            "rows": rows, "tuning_sweep": sweep})

    print(f"\ntuning sweep (fraction of copy bandwidth; defaults block_n={BLOCK_N}, num_warps=4, num_stages=2)")
    for s in sweep:
        print(f"  B={s['batch']:<3} L={s['context']:<6} block_n={s['block_n']:<4} warps={s['num_warps']} "
              f"stages={s['num_stages']}  {s['ms']:8.3f} ms  {s['frac_copy']:5.2f}")
    print(f"\npaged decode attention, Llama-3-8B shapes, {config['dtype']}; copy bandwidth {copy_gbs:.0f} GB/s; {path}")
    print(f"{'B':>3} {'L':>6} {'KV MB':>7} {'splits':>6} {'triton ms':>10} {'GB/s':>6} {'%copy':>6} "
          f"{'sdpa ms':>9} {'%copy':>6} {'x sdpa':>7} {'torch paged ms':>15}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['batch']:>3} {r['context']:>6}  skipped: {r['skipped']}")
            continue
        paged = f"{r['torch_paged_ms']:.3f}" if r.get("torch_paged_ms") else "-"
        sdpa = (f"{r['sdpa_ms']:>9.3f} {100 * r['sdpa_frac_copy']:>5.0f}% {r['speedup_vs_sdpa']:>7.2f}"
                if r["sdpa_ms"] is not None else f"{'OOM':>9} {'-':>6} {'-':>7}")
        print(f"{r['batch']:>3} {r['context']:>6} {r['kv_bytes'] / 1e6:>7.0f} {r['splits']:>6} {r['triton_ms']:>10.3f} "
              f"{r['triton_gbs']:>6.0f} {100 * r['triton_frac_copy']:>5.0f}% {sdpa} {paged:>15}")


if __name__ == "__main__":
    main()
