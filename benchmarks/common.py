"""Shared by benchmark scripts: hardware naming and the results JSON format."""
from __future__ import annotations

import datetime
import json
import subprocess
import time
from pathlib import Path

from leanserve.eval.report import hardware
from leanserve.models.model_dir import git_commit

RESULTS = Path(__file__).parent / "results"


def hardware_slug(name: str | None = None) -> str:
    """The hardware name (this machine's by default) as results files carry it: nvidia-h200, cpu-amd-epyc-..."""
    return "".join(c if c.isalnum() else "-" for c in (name or hardware()).lower()).strip("-")[:40]


def write_result(bench: str, results: dict, out_dir: str | Path = RESULTS, filename: str | None = None,
                 measured_on: str | None = None) -> Path:
    """Write {bench, hardware, git_commit, date, results} to OUT/<bench>-<hardware>.json (or OUT/filename).
    `measured_on`: the hardware of a measurement analysed here (its samples came from another machine)."""
    payload = {"bench": bench, "hardware": measured_on or hardware(), "git_commit": git_commit() or "unknown",
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "results": results}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (filename or f"{bench}-{hardware_slug(measured_on)}.json")
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def run_processes(jobs: list[tuple[str, list[str]]], parallel: int, log_dir: Path, env: dict | None = None,
                  cwd: Path | None = None, allow_failure: bool = False) -> list[str]:
    """Run each (name, argv) as a child process, `parallel` at a time, its output in log_dir/<name>.log.
    Many tiny training runs share one GPU this way (each is host-bound alone). A failure raises
    SystemExit (the others are killed) unless allow_failure; returns the names of the failed jobs."""
    log_dir.mkdir(parents=True, exist_ok=True)
    started, pending, active, failed = time.perf_counter(), list(jobs), [], []
    try:
        while pending or active:
            while pending and len(active) < parallel:
                name, argv = pending.pop(0)
                log = open(log_dir / f"{name}.log", "w")
                active.append((name, log, subprocess.Popen(argv, cwd=cwd, env=env, stdout=log,
                                                           stderr=subprocess.STDOUT)))
            time.sleep(0.5)
            for job in [j for j in active if j[2].poll() is not None]:
                active.remove(job)
                name, log, proc = job
                log.close()
                if proc.returncode and not allow_failure:
                    raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log.name}")
                if proc.returncode:
                    failed.append(name)
                print(f"{'failed' if proc.returncode else 'done'} {name} ({time.perf_counter() - started:.0f} s)",
                      flush=True)
    finally:
        for _, log, proc in active:
            proc.kill()
            log.close()
    return failed


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    import torch
    import triton.testing
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def matmul_peak_tflops(size: int = 8192) -> float:
    """Measured bf16 GEMM throughput (a size^3 matmul), in TFLOP/s: the compute roof that bounds are
    taken against, as copy_bandwidth_gbs is the memory one."""
    import torch
    import triton.testing
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")
    return 2 * size**3 / (ms * 1e-3) / 1e12


def time_calls(fn, device, runs: int, *, warmup: int = 1, budget_s: float = float("inf")) -> list[float]:
    """Seconds per call of fn(), warm-up calls excluded. On GPU, CUDA events around each call with the
    device idle before it (so host gaps inside the call count, as they do for a user); on CPU,
    perf_counter. Stops after `runs` timed calls or once `budget_s` of wall clock is spent on them,
    whichever comes first, but always times at least one."""
    import time

    import torch
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < runs and (not times or time.perf_counter() - started < budget_s):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times


def free_device_memory(device) -> None:
    """Drop cached blocks and the peak counter between configurations (after `del` of their tensors)."""
    import gc

    import torch
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> float | None:
    import torch
    return torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else None


class Deadline:
    """The wall-clock budget of a whole script (lent GPU jobs are time-capped): phases ask how much is
    left and shrink their own budgets instead of overrunning."""

    def __init__(self, seconds: float):
        import time
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        import time
        return self.end - time.perf_counter()
