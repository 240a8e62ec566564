"""Serving through HTTP: a real `leanserve serve` process driven by streaming clients, against the
memory-bandwidth bound; images through HTTP next to the same pipeline called directly.

    python benchmarks/bench_serve_gpu.py [--concurrency 1 16 64 256] [--rate 32] [--budget-s 900] [--profile]
    python benchmarks/bench_serve_gpu.py --cpu                    # zoo/chat-tiny on CPU vs transformers generate
    python benchmarks/bench_serve_gpu.py --smoke --out-dir DIR    # the GPU path on CPU at toy sizes (tests)

GPU: one server process holds bench_decode_gpu.py's Llama-3-8B shape with random bf16 weights
(`--load-format dummy`) and the zoo image models. Per concurrency c, c streams each send requests back
to back (a closed loop) to /v1/completions, stream=true, `prompt` = --prompt-len random token ids
(the tokenizer cannot shrink them), --max-tokens output tokens with ignore_eos. Every prompt is distinct,
so no prefix-cache hit: TTFT is a real prefill, queued behind whatever the engine is doing. One more run
sends requests at a fixed rate with exponential gaps (Poisson arrivals) and no concurrency cap.

- out_tok_s: completion tokens / wall clock from the first request sent to the last token (ramp-up and
  tail included, as a user sees it);
- TTFT: request sent -> first chunk carrying a token; ITL: gaps between the following chunks (the server
  sends one chunk per token); p50/p99 over all requests of the row;
- bound_tok_s: bench_decode_gpu.bound_tok_s at batch c, mean context prompt + max_tokens / 2: c tokens
  per (weight + KV bytes) / measured copy bandwidth. It counts decode only, so the prefills of a closed
  loop make it unreachable by their share;
- roofline_tok_s: the same loop with its prefills: a step runs c decode tokens and, on average,
  c * prompt_len / max_tokens prefill tokens (each stream's next prompt) through the weights, a GEMM
  taking the longer of reading them and its FLOPs (2 per matmul parameter per token at the measured
  bf16 GEMM peak), plus the decode KV reads; attention FLOPs (<1% at 400 tokens) are left out.
  frac_of_roofline = out_tok_s / roofline_tok_s;
- images: per (model, steps), direct = ImageModel.generate in this process at batch --image-clients
  (replaying CUDA graphs when --server-args has --image-cuda-graphs, as the server then does),
  HTTP = --image-clients closed-loop clients asking n=1 each, images finished in a window after a warm-up;
- --py-spy: the server process and its engine processes sampled by py-spy (on PATH; all threads, idle ones
  included; a child's threads are named `child PID: ...`) during each
  image row's window: raw stacks to OUT_DIR/pyspy_<model>_<steps>.txt and, in the row, each thread's
  most frequent innermost frames and its phases (pyspy_phases.py: where the time of a request outside
  the pipeline call goes);
- --profile: torch profiler tables of an in-process LLMEngine with the server's engine config under the
  same load (c sequences of --prompt-len tokens, all decoding), at c = 1 and 64, after the server is
  stopped: decode steps of the engine, not the HTTP front end.

Clients: one httpx.AsyncClient per stream; streams are spread over --client-procs processes so that
the clients' own CPU does not cap what is measured. Each row is written to the results JSON as soon as
it is done; --budget-s bounds the whole run (a phase that would start past it is skipped, a row
running into it stops sending and is marked truncated).

CPU (--cpu): zoo/chat-tiny served on CPU, 1 and 16 streams (--concurrency) of 128 prompt and 64 output
tokens, next to transformers `generate` on the same weights at the same batches (greedy, min = max new
tokens), both with --threads intra-op threads and --dtype (auto: each one's default, what a user gets:
transformers loads the checkpoint's stored dtype, leanserve applies runtime.resolve_dtype); --profile adds
the engine's decode-step profile as above. The issue's goal compares the most streams' HTTP tok/s with
`generate` at batch 1 and 16 (`goal_ratios`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # server_utils: the real-server harness the server tests use
from common import RESULTS, Deadline, write_result  # noqa: E402
from pyspy_phases import phases, split_stack  # noqa: E402
from server_utils import engine_pids, remote_server, scrape  # noqa: E402

IMAGE_ROWS = [("shapes-sid", 4), ("shapes-sid", 1), ("shapes-teacher", 25)]  # (zoo model, steps)
PROFILE_CONCURRENCY = (1, 64)
PROFILE_STEPS = 20
REQUEST_TIMEOUT_S = 600
PHASE_MIN_S = 30      # a phase that cannot get this much of the budget is skipped
PROFILE_MIN_S = 120   # the profile builds its own engine (CUDA graphs) before it measures
MONITOR_S = 10        # engine state is logged this often while a row runs


# ---------------------------------------------------------------- clients (also run in worker processes)

async def stream_completion(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: monotonic send, first-token and end stamps, gaps between token chunks."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.monotonic()
    stamps, tokens = [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"/v1/completions answered {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            # cheap checks: at 256 streams the clients parse tens of thousands of chunks a second
            if line.startswith('data: {"id"') and '"choices":[{' in line:
                stamps.append(time.monotonic())
            elif line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"error in the stream: {event['error']}")
                tokens = event["usage"]["completion_tokens"]
    if not stamps or tokens is None:
        raise RuntimeError(f"a stream ended without tokens or usage ({len(stamps)} token chunks)")
    return {"start": start, "first": stamps[0], "end": stamps[-1], "tokens": tokens,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])]}


async def generate_image(client: httpx.AsyncClient, model: str, prompt: str, size: int, steps: int) -> dict:
    start = time.monotonic()
    r = await client.post("/v1/images/generations", json={
        "model": model, "prompt": prompt, "n": 1, "size": f"{size}x{size}", "num_inference_steps": steps})
    if r.status_code != 200:
        raise RuntimeError(f"/v1/images/generations answered {r.status_code}: {r.text[:500]}")
    return {"start": start, "end": time.monotonic()}


async def _drive(spec: dict) -> list[dict]:
    rng = random.Random(spec["seed"])
    lo, hi = spec.get("token_range", (0, 1))
    budget = iter(range(spec["requests"]))  # shared by this process's streams: each takes the next request

    def prompt(i: int) -> list[int]:
        if spec.get("prompt_pool"):  # given prompts, one per request (no two requests share a prefix)
            return spec["prompt_pool"][i]
        return [rng.randrange(lo, hi) for _ in range(spec["prompt_len"])]

    async def one(client: httpx.AsyncClient, i: int) -> dict:
        if spec["kind"] == "image":
            return await generate_image(client, spec["model"], f"shape {spec['seed']}-{i}", spec["size"],
                                        spec["steps"])
        return await stream_completion(client, spec["model"], prompt(i), spec["max_tokens"])

    async def closed_loop_stream() -> list[dict]:
        out = []
        async with httpx.AsyncClient(base_url=spec["url"], timeout=REQUEST_TIMEOUT_S) as client:
            for i in budget:
                if time.monotonic() > spec["stop_at"]:
                    break
                out.append(await one(client, i))
        return out

    async def poisson_request(delay: float, i: int) -> dict:
        await asyncio.sleep(delay)
        async with httpx.AsyncClient(base_url=spec["url"], timeout=REQUEST_TIMEOUT_S) as client:
            return await one(client, i)

    if spec.get("rate"):
        delays, t = [], 0.0
        for _ in range(spec["requests"]):
            t += rng.expovariate(spec["rate"])
            delays.append(t)
        return list(await asyncio.gather(*(poisson_request(d, i) for i, d in enumerate(delays))))
    streams = await asyncio.gather(*(closed_loop_stream() for _ in range(spec["streams"])))
    return [r for s in streams for r in s]


def drive(spec: dict) -> list[dict]:
    """Run one process's share of a load (closed loop of `streams`, or Poisson at `rate`)."""
    return asyncio.run(_drive(spec))


class Load:
    """Splits a load over client processes (spawned: the parent may hold a CUDA context)."""

    def __init__(self, procs: int):
        self.procs = procs
        self.pool = ProcessPoolExecutor(procs, mp_context=get_context("spawn")) if procs > 1 else None
        if self.pool is not None:  # start every worker now: spawning and imports take seconds
            list(self.pool.map(time.sleep, [0.5] * procs))

    def run(self, spec: dict, streams: int) -> list[dict]:
        """`streams` closed-loop streams (or, with spec["rate"], Poisson arrivals) over up to `procs`
        processes, each with its share of streams, requests and rate."""
        n = max(1, min(self.procs, streams))
        specs = [{**spec, "seed": spec["seed"] * 1000 + k, "streams": len(range(k, streams, n)),
                  "requests": len(range(k, spec["requests"], n)),
                  **({"prompt_pool": spec["prompt_pool"][k::n]} if spec.get("prompt_pool") else {}),
                  **({"rate": spec["rate"] / n} if spec.get("rate") else {})} for k in range(n)]
        if n == 1:
            return drive(specs[0])
        return [r for part in self.pool.map(drive, specs) for r in part]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


# ---------------------------------------------------------------- summaries

def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def text_summary(records: list[dict]) -> dict:
    wall = max(r["end"] for r in records) - min(r["start"] for r in records)
    ttft = [r["first"] - r["start"] for r in records]
    itl = [g for r in records for g in r["itl"]]
    return {"requests": len(records), "output_tokens": sum(r["tokens"] for r in records), "wall_s": wall,
            "out_tok_s": sum(r["tokens"] for r in records) / wall,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "itl_p50_ms": 1e3 * pct(itl, 50) if itl else None, "itl_p99_ms": 1e3 * pct(itl, 99) if itl else None,
            # one stream's rate once its first token is out (median request): the decode speed a
            # user sees, free of the prefills a closed loop interleaves
            "stream_decode_tok_s": pct([(r["tokens"] - 1) / (r["end"] - r["first"]) for r in records
                                        if r["end"] > r["first"]], 50),
            # time-averaged number of requests in flight (the Poisson run's effective concurrency)
            "mean_in_flight": sum(r["end"] - r["start"] for r in records) / wall}


def fmt(row: dict) -> str:
    parts = [f"{row['out_tok_s']:.0f} tok/s"]
    if row.get("frac_of_bound") is not None:
        parts.append(f"{row['frac_of_bound']:.2f} of bound {row['bound_tok_s']:.0f}")
    if row.get("frac_of_roofline") is not None:
        parts.append(f"{row['frac_of_roofline']:.2f} of roofline {row['roofline_tok_s']:.0f}")
    parts.append(f"TTFT p50/p99 {row['ttft_p50_ms']:.1f}/{row['ttft_p99_ms']:.1f} ms")
    if row["itl_p50_ms"]:
        parts.append(f"ITL p50/p99 {row['itl_p50_ms']:.2f}/{row['itl_p99_ms']:.2f} ms")
    return ", ".join(parts)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Monitor:
    """Logs the engine's state from /metrics every MONITOR_S while a row runs, so a row that stalls (or
    thrashes through preemptions) shows it in the log, not only as a missing row. The first interval
    without a new token while requests are in flight makes the server's API and engine-core processes
    dump their stacks into the server log (SIGUSR1), which is then copied to the output directory."""

    def __init__(self, server, out_dir: str):
        self.server, self.out_dir, self.stop = server, Path(out_dir), threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.dumped = False

    def run(self) -> None:
        last = None
        while not self.stop.wait(MONITOR_S):
            try:
                m = scrape(self.server.url)
            except httpx.HTTPError as e:
                log(f"  monitor: /metrics failed: {e!r}")
                continue
            tokens = sum(v for (name, _), v in m.items() if name == "leanserve:generation_tokens_total")
            state = {k: sum(v for (name, _), v in m.items() if name == "leanserve:" + k)
                     for k in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                               "num_preemptions_total")}
            rate = "" if last is None else f", {(tokens - last) / MONITOR_S:.0f} tok/s"
            log("  monitor: " + ", ".join(f"{k} {v:g}" for k, v in state.items()) + rate)
            in_flight = state["num_requests_running"] + state["num_requests_waiting"]
            if tokens == last and in_flight and not self.dumped:
                self.dump_stacks()
            last = tokens

    def dump_stacks(self) -> None:
        self.dumped = True
        for pid in (self.server.proc.pid, *engine_pids(self.server.proc.pid)):
            os.kill(pid, signal.SIGUSR1)
        time.sleep(1)
        path = self.out_dir / f"server_stall_{time.strftime('%H%M%S')}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.server.log())
        log(f"  monitor: no token in {MONITOR_S} s with requests in flight: stacks dumped, server log in {path}")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


# ---------------------------------------------------------------- phases

class Bench:
    def __init__(self, args, name: str, results: dict):
        self.args, self.name, self.results = args, name, results
        self.deadline = Deadline(args.budget_s)
        self.load = Load(args.client_procs)

    def save(self) -> None:
        self.path = write_result(self.name, self.results, self.args.out_dir)

    def phase_budget(self, what: str, need: float = PHASE_MIN_S) -> float | None:
        left = self.deadline.left()
        if left < need:
            log(f"{what}: skipped, {left:.0f} s of the budget left")
            self.results.setdefault("skipped", []).append(what)
            self.save()
            return None
        return left

    def text_rows(self, server, model: str, token_range: tuple[int, int], bound,
                  prompt_pool: list[list[int]] | None = None) -> None:
        """One row per concurrency against `server` (server_utils.RemoteServer); prompts are random ids in
        token_range, or the next unused entries of prompt_pool (it must hold every row's requests)."""
        a, url = self.args, server.url
        used = 0
        for c in a.concurrency:
            if (left := self.phase_budget(f"concurrency {c}")) is None:
                continue
            requests = max(a.requests_per_stream * c, a.min_requests)
            log(f"concurrency {c}: {requests} requests of {a.prompt_len} prompt + {a.max_tokens} output tokens")
            spec = {"kind": "text", "url": url, "model": model, "requests": requests, "seed": c,
                    "prompt_len": a.prompt_len, "max_tokens": a.max_tokens, "token_range": token_range,
                    "stop_at": time.monotonic() + left - PHASE_MIN_S}
            if prompt_pool is not None:
                if used + requests > len(prompt_pool):
                    raise ValueError(f"prompt_pool holds {len(prompt_pool)} prompts, the rows need more")
                spec["prompt_pool"], used = prompt_pool[used:used + requests], used + requests
            row = {"concurrency": c}
            try:
                with Monitor(server, self.args.out_dir):
                    records = self.load.run(spec, c)
                row |= text_summary(records)
                row["truncated"] = len(records) < requests
                bounds = bound(c) or {"bound_tok_s": None}
                row |= bounds
                for name, value in bounds.items():  # bound_tok_s -> frac_of_bound, roofline_tok_s -> ...
                    row["frac_of_" + name.removesuffix("_tok_s")] = value and row["out_tok_s"] / value
                log(f"concurrency {c}: {fmt(row)}")
            except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
                row["error"] = f"{type(e).__name__}: {e}"
                log(f"concurrency {c}: FAILED {row['error']}")
            self.results["rows"].append(row)
            self.save()

    def poisson_row(self, url: str, model: str, token_range: tuple[int, int]) -> None:
        a = self.args
        if (left := self.phase_budget("poisson")) is None:
            return
        log(f"poisson: {a.poisson_requests} requests at {a.rate} req/s")
        spec = {"kind": "text", "url": url, "model": model, "requests": a.poisson_requests, "seed": 7,
                "rate": a.rate, "prompt_len": a.prompt_len, "max_tokens": a.max_tokens,
                "token_range": token_range, "stop_at": time.monotonic() + left}
        row = {"request_rate": a.rate, "offered_tok_s": a.rate * a.max_tokens}
        try:
            row |= text_summary(self.load.run(spec, a.client_procs))
            log(f"poisson: {fmt(row)}, {row['mean_in_flight']:.1f} requests in flight on average")
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"
            log(f"poisson: FAILED {row['error']}")
        self.results["poisson"] = row
        self.save()

    def image_rows(self, server, device) -> None:
        import torch

        from leanserve.models.image_model import load_image_model
        from leanserve.runtime import resolve_dtype
        a = self.args
        url = server.url
        models = {}
        graphs = "--image-cuda-graphs" in shlex.split(a.server_args)
        for name, steps in a.image_rows:
            if (left := self.phase_budget(f"images {name} {steps} steps")) is None:
                continue
            row = {"model": name, "steps": steps, "concurrency": a.image_clients}
            try:
                if name not in models:
                    models[name] = load_image_model(ROOT / "zoo" / name, name, device, resolve_dtype("auto", device))
                    if graphs:  # the direct arm replays graphs too when the server does: a like-for-like ratio
                        models[name].enable_cuda_graphs(a.image_clients)
                model = models[name]
                row["cuda_graphs"] = graphs
                size = model.sizes.width
                row["size"] = size
                row |= direct_images(model, a.image_clients, steps, min(a.image_window_s, left / 4))
                spec = {"kind": "image", "url": url, "model": name, "size": size, "steps": steps, "seed": 11,
                        "requests": 10**9, "prompt_len": 0}
                before = image_counts(url, name)
                window = min(a.image_window_s, left / 4)
                spy = PySpy(server.proc.pid, a.image_warmup_s, window,
                            Path(a.out_dir) / f"pyspy_{name}_{steps}.txt") if a.py_spy else None
                row |= http_images(self.load, spec, a.image_clients, a.image_warmup_s, window)
                if spy is not None:
                    row["py_spy"] = spy.summary()
                    if "error" not in row["py_spy"]:
                        row["py_spy_phases"] = phases(spy.path.read_text().splitlines())
                images, calls = (after - b for after, b in zip(image_counts(url, name), before))
                # below the client count: loops ran part-full (clients that got their image between loops)
                row["http_images_per_call"] = images / calls if calls else None
                row["http_over_direct"] = row["http_img_s"] / row["direct_img_s"]
                log(f"images {name} {steps} steps at {a.image_clients}: HTTP {row['http_img_s']:.1f} img/s "
                    f"({images:g} images in {calls:g} pipeline calls), direct {row['direct_img_s']:.1f} "
                    f"img/s, ratio {row['http_over_direct']:.2f}")
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"
                log(f"images {name} {steps}: FAILED {row['error']}")
            self.results["images"].append(row)
            self.save()
        models.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()


class PySpy:
    """py-spy sampling a process's Python stacks, every thread, idle or not, for `seconds` after
    `delay_s` (a row's window after its warm-up)."""

    def __init__(self, pid: int, delay_s: float, seconds: float, path: Path, rate: int = 100):
        # on PATH, or beside this interpreter (a virtual environment run without activating it)
        exe = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if exe is None:
            raise RuntimeError("--py-spy: no py-spy on PATH or beside python (pip install py-spy)")
        self.path = path
        self.proc = subprocess.Popen(
            ["bash", "-c", f"sleep {delay_s}; exec {exe} record -p {pid} -d {max(1, int(seconds))} -r {rate} "
                           f"--threads --idle --nonblocking --subprocesses -f raw -o {path}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def summary(self, top: int = 8) -> dict:
        """Per thread: its samples and its `top` most frequent innermost frames, as shares of them."""
        _, err = self.proc.communicate(timeout=60)
        if self.proc.returncode != 0 or not self.path.exists():
            return {"error": err.strip()[-500:]}
        threads: dict[str, dict[str, int]] = {}
        for line in self.path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            thread, frames = split_stack(stack)
            if frames:
                leaves = threads.setdefault(thread, {})
                leaves[frames[-1]] = leaves.get(frames[-1], 0) + int(count)
        out = {}
        for thread, leaves in threads.items():
            total = sum(leaves.values())
            out[thread] = {"samples": total, "top": [[frame, round(n / total, 3)] for frame, n in
                                                     sorted(leaves.items(), key=lambda kv: -kv[1])[:top]]}
        return out


def direct_images(model, batch: int, steps: int, budget_s: float) -> dict:
    """img/s of ImageModel.generate at `batch` (no server, no HTTP), median call."""
    import torch
    from common import time_calls

    from leanserve.models.image_params import ImageParams
    p = ImageParams(model.sizes.width, model.sizes.height, steps, model.default_guidance)
    prompts = [f"shape {i}" for i in range(batch)]

    def call():
        model.generate(prompts, None, p, [torch.Generator("cpu").manual_seed(i) for i in range(batch)],
                       on_step=lambda: False)

    times = time_calls(call, model.device, runs=20, warmup=2, budget_s=budget_s)
    return {"direct_img_s": batch / statistics.median(times), "direct_calls": len(times)}


def http_images(load: Load, spec: dict, clients: int, warmup_s: float, window_s: float) -> dict:
    """Closed-loop clients of one image each; images finished inside the window after the warm-up."""
    begin = time.monotonic()
    window = (begin + warmup_s, begin + warmup_s + window_s)
    records = load.run({**spec, "stop_at": window[1]}, clients)
    done = sum(window[0] <= r["end"] <= window[1] for r in records)
    latency = [r["end"] - r["start"] for r in records if r["start"] >= window[0]]
    return {"http_img_s": done / window_s, "http_images_in_window": done,
            "http_latency_p50_ms": 1e3 * pct(latency, 50) if latency else None}


def image_counts(url: str, model: str) -> tuple[float, float]:
    """(images returned, pipeline calls) of `model` so far, from the server's /metrics."""
    samples = scrape(url)

    def total(name: str) -> float:
        return sum(v for (n, labels), v in samples.items() if n == name and ("model_name", model) in labels)
    return total("leanserve:images_generated_total"), total("leanserve:text_encode_seconds_count")


def roofline_tok_s(c: int, args, ctx: float, wbytes: int, matmul_params: int, bw_gbs: float, tflops: float) -> float:
    """Closed-loop output tok/s at concurrency c if every step were at the roof (module docstring)."""
    from bench_decode_gpu import LLAMA3_8B, bound_tok_s
    tokens = c * (1 + args.prompt_len / args.max_tokens)
    weights_s = max(wbytes / (bw_gbs * 1e9), tokens * 2 * matmul_params / (tflops * 1e12))
    kv_s = c / bound_tok_s(c, ctx, 0, bw_gbs, LLAMA3_8B)
    return c / (weights_s + kv_s)


def weight_bytes(model_dir: Path) -> int:
    """Parameter bytes of the model as the engine builds it (on the meta device: no memory)."""
    import torch
    from transformers import AutoConfig

    from leanserve.models.loader import build_model
    model = build_model(AutoConfig.from_pretrained(model_dir), "meta", torch.bfloat16)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def server_engine_options(server_args: str) -> dict:
    """The EngineConfig fields that --server-args sets, read as `leanserve serve` reads them."""
    from leanserve.server.serve import add_arguments, engine_options
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return engine_options(parser.parse_args(shlex.split(server_args)))


def profile_engine(model_dir: Path, args, device) -> dict:
    """Profiler tables of an in-process LLMEngine decoding c sequences (see the module docstring)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from leanserve.server.engine.config import EngineConfig
    from leanserve.server.engine.llm_engine import LLMEngine
    from leanserve.server.engine.sampling_params import SamplingParams
    cuda = device.type == "cuda"
    engine = LLMEngine(EngineConfig(**{**server_engine_options(args.server_args), "model": str(model_dir),
                                       "load_format": "dummy", "device": device.type,
                                       "max_num_seqs": max(args.profile_concurrency),
                                       "max_model_len": args.max_model_len,
                                       "gpu_memory_utilization": args.gpu_memory_utilization}))
    rng, vocab = random.Random(3), engine.vocab_size
    out = {"how": "in-process LLMEngine, same engine config as the server, decode steps only"}
    for c in args.profile_concurrency:
        params = SamplingParams(temperature=0, max_tokens=PROFILE_STEPS + 8, ignore_eos=True)
        for i in range(c):
            engine.add_request(f"profile-{c}-{i}", [rng.randrange(vocab) for _ in range(args.prompt_len)], params,
                               check_queue=False)
        started: set[str] = set()
        while len(started) < c:  # prefill until every sequence decodes
            started |= {o.request_id for o in engine.step()}
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(PROFILE_STEPS):
                engine.step()
            if cuda:
                torch.cuda.synchronize()
        step_ms = 1e3 * (time.perf_counter() - t) / PROFILE_STEPS
        while engine.has_unfinished():
            engine.step()
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=25)
        out[f"concurrency_{c}"] = {"step_ms_profiled": step_ms, "steps": PROFILE_STEPS, "table": table}
        log(f"profile at concurrency {c}: {step_ms:.2f} ms per decode step (under the profiler)\n{table}")
    return out


# ---------------------------------------------------------------- modes

def gpu_mode(args) -> None:
    import torch
    from bench_decode_gpu import LLAMA3_8B, bound_tok_s, model_dir
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        torch.set_num_threads(1)  # as the server's (tests/server_utils.py): the test machine is small
    # toy sizes on CPU for the smoke run: the 8B shape scaled down, the same code path
    config = dict(LLAMA3_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024) if smoke else LLAMA3_8B
    path = model_dir(config)
    wbytes = weight_bytes(path)
    bw = tflops = None
    if device.type == "cuda":
        from common import copy_bandwidth_gbs, matmul_peak_tflops
        bw, tflops = copy_bandwidth_gbs(), matmul_peak_tflops()
        torch.cuda.empty_cache()
    ctx = args.prompt_len + args.max_tokens / 2
    # every matmul but the input embedding's lookup
    matmul_params = wbytes // 2 - config["vocab_size"] * config["hidden_size"]

    def bound(c: int) -> dict | None:
        # the KV terms are the 8B shape's: no bound for the toy model
        if bw is None or config is not LLAMA3_8B:
            return None
        return {"bound_tok_s": bound_tok_s(c, ctx, wbytes, bw),
                "roofline_tok_s": roofline_tok_s(c, args, ctx, wbytes, matmul_params, bw, tflops)}
    results = {"model": "Llama-3-8B shape, random bf16 weights (--load-format dummy)" if not smoke else
               "toy Llama shape (smoke)", "weight_bytes": wbytes, "copy_bandwidth_gbs": bw,
               "matmul_peak_tflops": tflops,
               "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "server_args": args.server_args,
               "rows": [], "poisson": None,
               "images": [], "notes": "closed-loop streams per concurrency, distinct random token-id prompts; "
                                      "see benchmarks/bench_serve_gpu.py's docstring"}
    bench = Bench(args, "serve_gpu_smoke" if smoke else "serve_gpu", results)
    image_models = sorted({m for m, _ in args.image_rows}) if args.image_clients else []
    served = [a for m in image_models for a in ("--model", str(ROOT / "zoo" / m))]
    names = ["llm", *image_models]
    server_args = [*served, *[a for n in names for a in ("--served-model-name", n)], "--load-format", "dummy",
                   "--max-num-seqs", str(max(args.concurrency)), "--max-model-len", str(args.max_model_len),
                   "--max-queued-requests", str(max(4 * max(args.concurrency), args.poisson_requests)),
                   "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--jobs-dir", "",
                   *(["--device", "cpu"] if smoke else []), *shlex.split(args.server_args)]
    log(f"starting leanserve serve ({' '.join(server_args)})")
    try:
        with remote_server(path, *server_args, startup_timeout=args.startup_timeout) as server:
            blocks = [dict(labels)["num_gpu_blocks"] for (name, labels), _ in scrape(server.url).items()
                      if name == "leanserve:cache_config_info"]
            log(f"server up at {server.url}, KV cache blocks {blocks}")
            warm_up(server.url, "llm", (3, config["vocab_size"]))
            bench.text_rows(server, "llm", (3, config["vocab_size"]), bound)
            if args.poisson_requests:
                bench.poisson_row(server.url, "llm", (3, config["vocab_size"]))
            if image_models:
                bench.image_rows(server, device)
        if args.profile and bench.phase_budget("profile", need=PROFILE_MIN_S) is not None:
            results["profile"] = profile_engine(path, args, device)
            bench.save()
    finally:
        bench.load.close()
    log(f"wrote {bench.path}")


def warm_up(url: str, model: str, token_range: tuple[int, int]) -> None:
    """A few short requests: first-call costs (kernel compilation, allocator growth) stay out of the rows."""
    drive({"kind": "text", "url": url, "model": model, "requests": 8, "streams": 4, "seed": 99, "prompt_len": 32,
           "max_tokens": 8, "token_range": token_range, "stop_at": time.monotonic() + 600})


def hf_generate(model_dir: Path, prompts: list[list[int]], max_tokens: int, runs: int, dtype: str) -> dict:
    """transformers generate on the same weights: greedy, exactly max_tokens new tokens per prompt.
    dtype `auto` is transformers' default (the checkpoint's dtype)."""
    import torch
    from common import time_calls
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    model.eval()
    ids = torch.tensor(prompts)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens,
              min_new_tokens=max_tokens, eos_token_id=None, pad_token_id=0)
    times = time_calls(lambda: model.generate(ids, **kw), "cpu", runs=runs, warmup=1)
    return {"batch": len(prompts), "tok_s": len(prompts) * max_tokens / statistics.median(times), "runs": len(times),
            "dtype": str(model.dtype).removeprefix("torch.")}


def cpu_mode(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    from leanserve.models.loader import checkpoint_dtype
    from leanserve.runtime import resolve_dtype
    args.server_args = f"--dtype {args.dtype} {args.server_args}"  # the server's and the profiled engine's
    path = ROOT / "zoo" / "chat-tiny"
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    server_dtype = str(resolve_dtype(args.dtype, torch.device("cpu"), checkpoint=checkpoint_dtype(str(path))))
    results = {"model": "zoo/chat-tiny on CPU", "dtype": args.dtype,
               "server_dtype": server_dtype.removeprefix("torch."), "threads": args.threads,
               "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "server_args": args.server_args,
               "rows": [], "generate": [],
               "notes": "HTTP rows: closed-loop streams against `leanserve serve --device cpu`; generate: "
                        "transformers LlamaForCausalLM.generate on the same weights, all prompts as one batch"}
    bench = Bench(args, "serve_cpu_smoke" if args.smoke else "serve_cpu", results)
    rng = random.Random(5)
    for c in args.concurrency:
        prompts = [[rng.randrange(4, vocab) for _ in range(args.prompt_len)] for _ in range(c)]
        row = hf_generate(path, prompts, args.max_tokens, runs=1 if args.smoke else 3, dtype=args.dtype)
        log(f"transformers generate, batch {c}: {row['tok_s']:.1f} tok/s")
        results["generate"].append(row)
        bench.save()
    log("starting leanserve serve on CPU")
    try:
        with remote_server(path, "--served-model-name", "chat-tiny", "--device", "cpu", "--jobs-dir", "",
                           *shlex.split(args.server_args), env={"OMP_NUM_THREADS": str(args.threads)},
                           startup_timeout=args.startup_timeout) as server:
            warm_up(server.url, "chat-tiny", (4, vocab))
            bench.text_rows(server, "chat-tiny", (4, vocab), lambda c: None)
        if args.profile:  # where a CPU decode step's time goes (same weights' shapes, random values)
            results["profile"] = profile_engine(path, args, torch.device("cpu"))
            bench.save()
    finally:
        bench.load.close()
    generate = {g["batch"]: g["tok_s"] for g in results["generate"]}
    for row in results["rows"]:
        if "out_tok_s" in row and row["concurrency"] in generate:
            row["http_over_generate"] = row["out_tok_s"] / generate[row["concurrency"]]
            log(f"{row['concurrency']} streams: HTTP {row['out_tok_s']:.1f} tok/s = "
                f"{row['http_over_generate']:.2f}x generate")
    most = max((r for r in results["rows"] if "out_tok_s" in r), key=lambda r: r["concurrency"], default=None)
    if most is not None:
        results["goal_ratios"] = {f"http_{most['concurrency']}_over_generate_{b}": most["out_tok_s"] / generate[b]
                                  for b in (1, 16) if b in generate}
        log(f"goal ratios: {results['goal_ratios']}")
    bench.save()
    log(f"wrote {bench.path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="zoo/chat-tiny on CPU next to transformers generate")
    ap.add_argument("--smoke", action="store_true", help="toy sizes and counts, on CPU (tests)")
    ap.add_argument("--concurrency", type=int, nargs="+")
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--requests-per-stream", type=int, default=4, help="closed-loop requests per stream")
    ap.add_argument("--min-requests", type=int, help="at least this many requests per row")
    ap.add_argument("--rate", type=float, default=32.0, help="Poisson run: requests per second")
    ap.add_argument("--poisson-requests", type=int, help="requests of the Poisson run (0: no Poisson run)")
    ap.add_argument("--image-clients", type=int, help="image clients (0: no image models, no image rows)")
    ap.add_argument("--image-warmup-s", type=float)
    ap.add_argument("--image-window-s", type=float)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                    help="the LLM's share of GPU memory; the rest is for the image engines and this process")
    ap.add_argument("--server-args", default="", help="more `leanserve serve` flags, e.g. '--enforce-eager'")
    ap.add_argument("--client-procs", type=int, help="client processes the streams are spread over")
    ap.add_argument("--threads", type=int, default=1, help="--cpu: intra-op threads of the server and generate")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="--cpu: the dtype of the server and of generate (auto: each one's default for the "
                         "checkpoint; the JSON records what each ran)")
    ap.add_argument("--profile", action="store_true", help="torch profiler tables at concurrency 1 and 64")
    ap.add_argument("--py-spy", action="store_true", help="sample the server with py-spy during the image rows")
    ap.add_argument("--budget-s", type=float, default=900, help="wall-clock budget of the whole run")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    # per mode: (GPU, CPU); smoke shrinks either
    defaults = {"concurrency": ([1, 16, 64, 256], [1, 16]), "prompt_len": (400, 128), "max_tokens": (128, 64),
                "min_requests": (32, 8), "poisson_requests": (256, 0), "image_clients": (64, 0),
                "image_warmup_s": (5.0, 0), "image_window_s": (20.0, 0), "client_procs": (4, 1)}
    smoke = {"concurrency": [1, 4], "prompt_len": 16, "max_tokens": 8, "min_requests": 4, "poisson_requests": 6,
             "image_clients": 4, "image_warmup_s": 3.0, "image_window_s": 3.0, "client_procs": 2}
    for name, (gpu, cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke[name] if args.smoke else (cpu if args.cpu else gpu))
    args.image_rows = [("shapes-sid", 1)] if args.smoke else IMAGE_ROWS
    args.profile_concurrency = (1, 4) if args.smoke else PROFILE_CONCURRENCY
    if args.smoke:
        args.requests_per_stream = 1
    (cpu_mode if args.cpu else gpu_mode)(args)


if __name__ == "__main__":
    main()
