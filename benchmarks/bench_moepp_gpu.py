"""GPU: one MoE++ layer (router + ZC update + FFN experts + combine), the fused Triton kernel
(kernels/moepp.py) against the eager per-expert loop (kernels/moepp_reference.py) and against plain
MoE run by the same kernel, so "MoE++ speedup" is not mixed with kernel quality.

(a) the paper's 7B layer on random weights (spec section 10): D 1536, I 4096, 16 FFN + 4 ZC experts
    (2 const, 1 copy, 1 zero), top-2, bf16, gating residual on. Random routers route near-uniformly,
    so routing is forced: each slot is an FFN slot with probability p (a uniform expert, distinct
    within a token), else a ZC slot; p in {0, 0.25, 0.5, 0.75, 1}, T in {1, 8, 64, 2048, 8192,
    32768}. Plain MoE = 16 FFN experts, top-2, no gating residual (p = 1). Each time is the median
    of >= 50 calls (CUDA events, L2 flushed and the device idle before each call, so launch gaps
    count). A fused arm's layer_ms is its CUDA-graph replay (GPU time, as decode is served;
    launch_ms: the same call launched from Python, ~0.4 ms of launches and allocations at any T);
    the eager loop syncs the host once per expert and runs as launched.
    Per row: roofline_ms = max(expert bytes touched / copy bandwidth, FFN FLOPs / bf16 matmul peak)
    (both measured here), with E*(1 - (1 - p/E)^(T*k)) experts touched for uniform routing; ideal =
    MoE's roofline / the row's; GB/s of expert weights actually touched (decode T) against the copy
    bandwidth. Per T, a fit time = a + b*p of the fused MoE++ arm: a / (a + b) is the share of the
    p = 1 time that ZC routing cannot remove (routing, alignment, launches, combine).
(b) --routers DIR (optional): model directories of trained MoE++ / MoE models (leanserve_moepp
    checkpoints, e.g. the small-scale experiment's arms). Each model runs one prefill over Python
    stdlib source text; every layer's MoE input and the previous layer's router logits are captured,
    and each layer is timed on the rows of T tokens with its trained router's real top-k (no forcing).
    Rows give the measured FFN-slot share, the mean per-layer time, the speedup over the MoE arm (a
    directory without ZC experts) and the ideal 1 / share.

    python benchmarks/bench_moepp_gpu.py [--routers DIR] [--sweep]   # about 3 minutes on an H200
    python benchmarks/bench_moepp_gpu.py --smoke --out-dir /tmp/x    # CPU, toy sizes (Triton interpreter)
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from common import RESULTS, Deadline, copy_bandwidth_gbs, free_device_memory, matmul_peak_tflops, write_result


@dataclass(frozen=True)
class Shape:
    dim: int
    inter: int
    n_ffn: int
    n_const: int
    n_copy: int
    n_zero: int
    top_k: int

    @property
    def expert_bytes(self) -> int:  # bf16 w13 + w2
        return 3 * self.dim * self.inter * 2

    @property
    def slot_flops(self) -> int:
        return 2 * 3 * self.dim * self.inter


FULL = Shape(dim=1536, inter=4096, n_ffn=16, n_const=2, n_copy=1, n_zero=1, top_k=2)
SMOKE = Shape(dim=64, inter=64, n_ffn=8, n_const=2, n_copy=1, n_zero=1, top_k=2)
TOKENS = [1, 8, 64, 2048, 8192, 32768]
P_VALUES = [0.0, 0.25, 0.5, 0.75, 1.0]
DECODE_MAX_T = 64
FLUSH_BYTES = 256 << 20  # > L2: each timed call reads its weights from HBM


def layouts(shape: Shape):
    from leanserve.kernels.moepp_reference import MoEPPLayout
    return (MoEPPLayout(shape.n_ffn, shape.n_const, shape.n_copy, shape.n_zero, shape.top_k),
            MoEPPLayout(shape.n_ffn, 0, 0, 0, shape.top_k))


def random_layer(layout, shape: Shape, gating_residual: bool, dtype, device, gen) -> dict:
    n, e, c = layout.n_experts, layout.n_ffn, layout.n_const

    def rnd(*s, std, dt=dtype):
        return (torch.randn(*s, generator=gen, device=device) * std).to(dt)
    return dict(router_w=rnd(n, shape.dim, std=0.02, dt=torch.float32),
                gate_map=rnd(n, n, std=0.3, dt=torch.float32) if gating_residual else None,
                w13=rnd(e, 2 * shape.inter, shape.dim, std=shape.dim ** -0.5),
                w2=rnd(e, shape.dim, shape.inter, std=shape.inter ** -0.5),
                const_gate=rnd(2 * c, shape.dim, std=0.02) if c else None,
                const_v=rnd(c, shape.dim, std=1.0) if c else None)


def forced_ids(num_tokens: int, p: float, layout, gen, device) -> torch.Tensor:
    """[T, k]: each slot an FFN expert with probability p, else a ZC expert; distinct within a token."""
    k = layout.top_k
    ffn = torch.rand(num_tokens, layout.n_ffn, generator=gen, device=device).argsort(dim=1)[:, :k]
    if layout.n_zc == 0:
        return ffn
    zc = layout.n_ffn + torch.rand(num_tokens, layout.n_zc, generator=gen, device=device).argsort(dim=1)[:, :k]
    return torch.where(torch.rand(num_tokens, k, generator=gen, device=device) < p, ffn, zc)


def touched_experts(num_tokens: int, p: float, shape: Shape) -> float:
    return shape.n_ffn * (1 - (1 - p / shape.n_ffn) ** (num_tokens * shape.top_k))


class Timer:
    def __init__(self, device, runs: int, warmup: int):
        self.device, self.runs, self.warmup = device, runs, warmup
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device) if self.cuda else None

    def median_ms(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.runs):
            if self.cuda:
                self.flush.zero_()
                torch.cuda.synchronize(self.device)
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def graph_ms(self, fn) -> float | None:
        """The median replay time of fn captured in a CUDA graph (None on CPU)."""
        if not self.cuda:
            return None
        fn()
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = self.median_ms(graph.replay)
        del graph
        return ms


def fused_fn(x, w, prev, layout, ids, tiles=None):
    from leanserve.kernels.moepp import moepp_forward
    return lambda: moepp_forward(x, w["router_w"], w["const_gate"], prev, w["gate_map"] if prev is not None else None,
                                 w["w13"], w["w2"], w["const_v"], layout, forced_ids=ids, tiles=tiles)


def eager_fn(x, w, prev, layout, ids):
    from leanserve.kernels.moepp_reference import force_routing, moepp_forward_reference, route

    def run():
        routing = route(x, w["router_w"], layout, prev, w["gate_map"] if prev is not None else None)
        if ids is not None:
            routing = force_routing(routing, ids, layout)
        return moepp_forward_reference(x, routing, w["w13"], w["w2"], w["const_gate"], w["const_v"], layout)
    return run


def check_correctness(shape: Shape, dtype, device) -> float:
    """Fused vs eager at T = 64, p = 0.5: the relative error (must be <= 1e-2)."""
    layout, _ = layouts(shape)
    gen = torch.Generator(device=device).manual_seed(0)
    w = random_layer(layout, shape, True, dtype, device, gen)
    x = torch.randn(64, shape.dim, generator=gen, device=device).to(dtype)
    prev = torch.randn(64, layout.n_experts, generator=gen, device=device)
    ids = forced_ids(64, 0.5, layout, gen, device)
    y = fused_fn(x, w, prev, layout, ids)()[0].float()
    ref = eager_fn(x.float(), {k: v.float() if v is not None else None for k, v in w.items()}, prev, layout, ids)()
    err = float((y - ref).norm() / ref.norm())
    if err > 1e-2:
        raise SystemExit(f"fused kernel disagrees with the eager reference: relative error {err:.2e}")
    return err


def bench_forced(shape: Shape, tokens: list[int], p_values: list[float], timer: Timer, dtype, device,
                 copy_gbs: float, peak_tflops: float, deadline: Deadline) -> dict:
    moepp_layout, moe_layout = layouts(shape)
    gen = torch.Generator(device=device).manual_seed(0)
    weights = {"moepp": random_layer(moepp_layout, shape, True, dtype, device, gen),
               "moe": random_layer(moe_layout, shape, False, dtype, device, gen)}
    rows, fits = [], {}

    def roofline_ms(num_tokens, p):
        bytes_ = touched_experts(num_tokens, p, shape) * shape.expert_bytes
        flops = num_tokens * shape.top_k * p * shape.slot_flops
        return max(bytes_ / (copy_gbs * 1e9), flops / (peak_tflops * 1e12)) * 1e3

    for num_tokens in tokens:
        if deadline.left() < 0:
            print(f"time limit: T >= {num_tokens} skipped", flush=True)
            break
        x = torch.randn(num_tokens, shape.dim, generator=gen, device=device).to(dtype)
        prev = torch.randn(num_tokens, moepp_layout.n_experts, generator=gen, device=device)
        arms = [("moe", moe_layout, None, 1.0)] + [("moepp", moepp_layout, prev, p) for p in p_values]
        base = {}
        for name, layout, prev_logits, p in arms:
            ids = forced_ids(num_tokens, p, layout, gen, device)
            distinct = int(torch.unique(ids[ids < layout.n_ffn]).numel())
            w = weights[name]
            # fused: the graph replay (GPU time, as served); launch_ms adds the Python launches of an eager call.
            # eager: its host syncs (one per expert) keep it out of graphs
            launch_ms = timer.median_ms(fused_fn(x, w, prev_logits, layout, ids))
            graph_ms = timer.graph_ms(fused_fn(x, w, prev_logits, layout, ids))
            fused = {"layer_ms": graph_ms if graph_ms is not None else launch_ms, "launch_ms": launch_ms}
            eager = {"layer_ms": timer.median_ms(eager_fn(x, w, prev_logits, layout, ids)), "launch_ms": None}
            for impl, times in (("fused", fused), ("eager", eager)):
                arm = f"{name}_{impl}"
                if name == "moe":
                    base[impl] = times["layer_ms"]
                roof = roofline_ms(num_tokens, p)
                row = {"arm": arm, "tokens": num_tokens, "tau_or_p": p, **times,
                       "speedup_vs_moe": base[impl] / times["layer_ms"],
                       "ideal": roofline_ms(num_tokens, 1.0) / roof if roof > 0 else None,
                       "roofline_ms": roof, "frac_roofline": roof / times["layer_ms"],
                       "distinct_experts": distinct, "expected_experts": touched_experts(num_tokens, p, shape)}
                if num_tokens <= DECODE_MAX_T:
                    gbs = distinct * shape.expert_bytes / (times["layer_ms"] * 1e-3) / 1e9
                    row |= {"gbs": gbs, "frac_copy": gbs / copy_gbs}
                rows.append(row)
                print(f"{arm:12s} T={num_tokens:<6} p={p:<5} {times['layer_ms']:9.3f} ms"
                      + (f"  (launched {times['launch_ms']:7.3f} ms)" if times["launch_ms"] is not None else " " * 24)
                      + f"  x{row['speedup_vs_moe']:.2f} vs moe (roofline x{row['ideal'] or float('inf'):.2f})"
                      + f"  {row['distinct_experts']:2d} experts", flush=True)
        fused_rows = [r for r in rows if r["arm"] == "moepp_fused" and r["tokens"] == num_tokens]
        a, b = linear_fit([r["tau_or_p"] for r in fused_rows], [r["layer_ms"] for r in fused_rows])
        fits[str(num_tokens)] = {"a_ms": a, "b_ms": b, "fixed_share": a / (a + b) if a + b > 0 else None}
        del x, prev
        free_device_memory(device)
    return {"shape": asdict(shape), "p_values": p_values, "rows": rows, "fit_a_plus_b_p": fits}


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def sweep_tiles(shape: Shape, timer: Timer, dtype, device) -> list[dict]:
    """Tile candidates at p = 1 (each candidate's GEMM1 and GEMM2 tiles alike)."""
    import triton

    from leanserve.kernels.moepp import GemmTiles, MoETiles, default_tiles
    layout, _ = layouts(shape)
    gen = torch.Generator(device=device).manual_seed(1)
    w = random_layer(layout, shape, True, dtype, device, gen)
    small = [GemmTiles(bn, bk, 1, warps, stages) for bn, bk, warps, stages in
             ((16, 128, 4, 4), (32, 64, 4, 3), (32, 128, 4, 4), (64, 128, 4, 4), (128, 64, 4, 3))]
    big = [(bm, GemmTiles(bn, bk, g, warps, stages)) for bm, bn, bk, g, warps, stages in
           ((64, 64, 32, 8, 4, 3), (64, 128, 64, 8, 8, 3), (64, 256, 64, 8, 8, 3), (128, 64, 32, 8, 4, 3),
            (128, 128, 64, 8, 8, 3), (128, 128, 32, 8, 8, 4), (128, 128, 64, 16, 8, 3))]
    out = []
    for num_tokens in (1, 8, 64, 2048, 32768):
        x = torch.randn(num_tokens, shape.dim, generator=gen, device=device).to(dtype)
        prev = torch.randn(num_tokens, layout.n_experts, generator=gen, device=device)
        ids = forced_ids(num_tokens, 1.0, layout, gen, device)
        default = default_tiles(num_tokens * layout.top_k, layout.n_ffn)
        cands = ([MoETiles(16, t, t) for t in small] if num_tokens <= DECODE_MAX_T else
                 [MoETiles(bm, t, t) for bm, t in big])
        for tiles in [default, *cands]:
            try:
                ms = timer.median_ms(fused_fn(x, w, prev, layout, ids, tiles))
            except triton.runtime.errors.OutOfResources as e:  # too much shared memory for this GPU
                ms = None
                print(f"sweep T={num_tokens:<6} {tiles}  {e}", flush=True)
            out.append({"tokens": num_tokens, "tiles": asdict(tiles), "default": tiles == default, "ms": ms})
            if ms is not None:
                print(f"sweep T={num_tokens:<6} {tiles}  {ms:.3f} ms", flush=True)
    return out


# ---- (b) trained routers --------------------------------------------------------------------------------

def model_dirs(root: Path) -> list[Path]:
    if (root / "config.json").is_file():
        return [root]
    dirs = sorted(p for p in root.iterdir() if (p / "config.json").is_file())
    if not dirs:
        raise SystemExit(f"--routers {root}: no model directory (config.json) in it")
    return dirs


def capture_layer_inputs(model_dir: Path, num_tokens: int, seq_len: int, dtype, device):
    """One prefill of num_tokens stdlib-source tokens (sequences of seq_len): every layer's MoE input x
    and the previous layer's logits, as the layers received them."""
    from transformers import AutoTokenizer

    from leanserve.data.corpus import stdlib_files
    from leanserve.models.attention.metadata import AttentionMetadata
    from leanserve.models.loader import load_model

    model, config = load_model(str(model_dir), device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids: list[int] = []
    for f in stdlib_files():
        ids += tokenizer(f.text)["input_ids"]
        if len(ids) >= num_tokens:
            break
    ids = ids[:num_tokens]
    block = 16
    spec = model.kv_cache_spec(block, dtype)
    lens = [min(seq_len, num_tokens - s) for s in range(0, num_tokens, seq_len)]
    per_seq = spec.blocks_for(seq_len)
    kv_caches = spec.allocate(per_seq * len(lens), device)
    positions = [p for n in lens for p in range(n)]
    slots = [(i * per_seq + p // block) * block + p % block for i, n in enumerate(lens) for p in range(n)]
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(lens))]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device), max_query_len=max(lens),
        max_seq_len=max(lens), block_size=block, query_start_loc_cpu=qsl, seq_lens_cpu=lens)
    captured = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args: captured.append(args))
             for layer in model.model.layers]
    with torch.inference_mode():
        model(torch.tensor(ids, device=device), torch.tensor(positions, device=device), kv_caches, meta)
    for h in hooks:
        h.remove()
    return model, config, captured


def bench_routers(root: Path, tokens: list[int], seq_len: int, timer: Timer, dtype, device) -> dict:
    from leanserve.kernels.moepp_reference import route
    arms = {}
    for model_dir in model_dirs(root):
        model, config, captured = capture_layer_inputs(model_dir, max(tokens), seq_len, dtype, device)
        layers = [layer.mlp for layer in model.model.layers]
        layout = layers[0].layout
        per_t = {}
        for num_tokens in tokens:
            rows = torch.linspace(0, max(tokens) - 1, num_tokens, device=device).long()  # spread over positions
            fused = eager = 0.0
            ffn_slots = 0
            for mlp, (x, prev) in zip(layers, captured):
                x = x[rows]
                prev = prev[rows] if prev is not None and mlp.gate_map is not None else None
                const_gate = mlp.const_gate.weight if mlp.const_gate is not None else None
                w = dict(router_w=mlp.router.weight, gate_map=mlp.gate_map.weight if prev is not None else None,
                         w13=mlp.w13, w2=mlp.w2, const_gate=const_gate, const_v=mlp.const_v)
                graph_ms = timer.graph_ms(fused_fn(x, w, prev, layout, None))
                fused += graph_ms if graph_ms is not None else timer.median_ms(fused_fn(x, w, prev, layout, None))
                eager += timer.median_ms(eager_fn(x, w, prev, layout, None))
                ffn_slots += int((route(x, w["router_w"], layout, prev, w["gate_map"]).ids < layout.n_ffn).sum())
            share = ffn_slots / (num_tokens * layout.top_k * len(layers))
            per_t[num_tokens] = {"fused_ms": fused / len(layers), "eager_ms": eager / len(layers), "ffn_share": share}
            print(f"{model_dir.name:20s} T={num_tokens:<6} share {share:.3f}  "
                  f"fused {fused / len(layers):8.3f} ms/layer  "
                  f"eager {eager / len(layers):8.3f} ms/layer", flush=True)
        arms[model_dir.name] = {"tau": getattr(config, "tau", None) if layout.n_zc else None,
                                "is_moe": layout.n_zc == 0, "layout": asdict(layout), "per_tokens": per_t}
        del model, captured, layers
        free_device_memory(device)
    base = next((a for a in arms.values() if a["is_moe"]), None)
    rows = []
    for name, arm in arms.items():
        for num_tokens, r in arm["per_tokens"].items():
            for impl in ("fused", "eager"):
                ms = r[f"{impl}_ms"]
                rows.append({"arm": f"{name}_{impl}", "tokens": num_tokens, "tau_or_p": arm["tau"], "layer_ms": ms,
                             "ffn_share": r["ffn_share"],
                             "speedup_vs_moe": base["per_tokens"][num_tokens][f"{impl}_ms"] / ms if base else None,
                             "ideal": 1 / r["ffn_share"] if r["ffn_share"] > 0 else None})
    models = {name: {k: v for k, v in arm.items() if k != "per_tokens"} for name, arm in arms.items()}
    return {"seq_len": seq_len, "models": models, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routers", type=Path, help="directory of trained leanserve_moepp model directories for (b)")
    ap.add_argument("--seq-len", type=int, default=512, help="(b): sequence length of the captured prefill")
    ap.add_argument("--sweep", action="store_true", help="also time tile candidates at p = 1")
    ap.add_argument("--runs", type=int, default=50, help="timed calls per measurement (median)")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds for (a); larger T are skipped past it")
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes (Triton interpreter): tests the code paths")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel module is imported (lazily)
        torch.set_num_threads(1)
        device, dtype, shape = torch.device("cpu"), torch.float32, SMOKE  # the interpreter's bf16 dot is wrong
        tokens, p_values, runs, warmup, seq_len = [1, 64], [0.0, 0.5, 1.0], 1, 0, 32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_moepp_gpu needs a CUDA GPU (or --smoke)")
        device, dtype, shape = torch.device("cuda"), torch.bfloat16, FULL
        tokens, p_values, runs, warmup, seq_len = TOKENS, P_VALUES, args.runs, 3, args.seq_len
    deadline = Deadline(args.time_limit)
    started = time.perf_counter()
    timer = Timer(device, runs, warmup)
    results = {"smoke": args.smoke, "dtype": str(dtype), "torch": torch.__version__,
               "check_rel_error": check_correctness(shape, dtype, device)}
    if device.type == "cuda":
        import triton
        results |= {"triton": triton.__version__, "copy_bandwidth_gbs": copy_bandwidth_gbs(),
                    "matmul_peak_tflops": matmul_peak_tflops(8192)}
    else:  # nominal H200 numbers: the smoke run only exercises the arithmetic
        results |= {"copy_bandwidth_gbs": 4300.0, "matmul_peak_tflops": 790.0}
    print(f"copy {results['copy_bandwidth_gbs']:.0f} GB/s, bf16 matmul {results['matmul_peak_tflops']:.0f} TFLOP/s, "
          f"fused vs eager rel. error {results['check_rel_error']:.1e}", flush=True)
    results["forced"] = bench_forced(shape, tokens, p_values, timer, dtype, device, results["copy_bandwidth_gbs"],
                                     results["matmul_peak_tflops"], deadline)
    if args.sweep:
        results["tile_sweep"] = sweep_tiles(shape, timer, dtype, device)
    if args.routers is not None:
        results["trained_routers"] = bench_routers(args.routers, tokens, seq_len, timer, dtype, device)
    results["wall_s"] = time.perf_counter() - started
    path = write_result("moepp_gpu_smoke" if args.smoke else "moepp_gpu", results, args.out_dir)
    fits = results["forced"]["fit_a_plus_b_p"]
    print("fused MoE++ time = a + b*p: " + ", ".join(f"T={t}: a {f['a_ms']:.3f} b {f['b_ms']:.3f} ms"
                                                      for t, f in fits.items()))
    print(f"total {results['wall_s']:.0f} s -> {path}")


if __name__ == "__main__":
    main()
