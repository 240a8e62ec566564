"""Where the image server's threads spend an image row, from py-spy's raw stacks (`record -f raw --idle`).

    python benchmarks/pyspy_phases.py RAW.txt[.gz] ... --source ROW_JSON --out OUT.json

bench_serve_gpu.py --py-spy writes the raw stacks and calls `phases` itself; this command recomputes
the table from kept raw files. A thread's leaf frame alone cannot tell a wait for work from a wait for
the GPU, so each sample is put in a phase by its whole stack:

- leanserve-image-engine (the pipeline's worker): waiting for a request; waiting for clients whose
  answers are still in flight (the batch wait); tokenizing prompts (any tokenizer frame); the text encoder
  (eager; with the few lines of prompt handling around it); the
  denoising loop (graph replays, noise, scheduler steps, and the GPU syncs inside them); other;
- MainThread (the event loop; an image engine process's too): in the loop (idle, or in uvloop's C code) or in
  Python (HTTP, JSON, routes; in an image engine process, its messages);
- leanserve-offload_* (PNG + base64 of the answers): idle or busy.

Sampled with --subprocesses, the server's engine processes are in the stacks too: a thread of a child
process is named `child PID: thread (TID): NAME` (the image engines' workers and event loops run there).
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

IDLE_LEAVES = ("Condition.wait", "_worker (concurrent/futures/thread.py", "Runner.run")


def engine_phase(stack: str, leaf: str) -> str:
    if leaf.startswith("Condition.wait"):
        return "wait: clients in flight" if "_wait_for_returning_clients" in stack else "wait: no request"
    if "encode_prompt" in stack:
        return "prompts: tokenizer" if "tokeniz" in stack.lower() else "prompts: text encoder"
    if "ImageModel.generate" in stack:
        return "denoising loop"
    return "other"


def phase(thread: str, stack: str, leaf: str) -> str | None:
    """The sample's phase, or None for a thread this table leaves out (the LLM core's pipe, tqdm)."""
    if thread.endswith("leanserve-image-engine"):
        return engine_phase(stack, leaf)
    if thread.endswith("MainThread"):
        if thread.startswith("child ") and "run_image_engine" not in stack:
            return None  # an engine process's main thread that runs no event loop (the LLM core's busy loop)
        # idle: uvloop's run is one C call; the stdlib loop (the image engine's) waits in its selector
        return "in the loop" if leaf.startswith("Runner.run") or "(selectors.py" in leaf else "in Python"
    if "leanserve-offload" in thread:
        return "idle" if leaf.startswith(IDLE_LEAVES) else "busy"
    return None


PROCESS_FRAME = re.compile(r'process (\d+):".*?";')  # a command line may hold ';' (spawn's does)


def split_stack(stack: str) -> tuple[str, list[str]]:
    """(thread, its frames) of a raw stack. With --subprocesses py-spy puts the chain of `process PID:"cmd"`
    frames first: a child process's thread is then named `child PID: thread (TID): NAME`."""
    pids = []
    while (m := PROCESS_FRAME.match(stack)) is not None:
        pids.append(m.group(1))
        stack = stack[m.end():]
    thread, *frames = stack.split(";")
    return (f"child {pids[-1]}: {thread}" if len(pids) > 1 else thread), frames


def phases(lines) -> dict:
    """{thread: {"samples": n, "phases": {phase: share}}} over raw lines `frame;frame;... count`.
    An image engine thread that only ever waited (the pool's other model) is left out."""
    counts: dict[str, dict[str, int]] = {}
    for line in lines:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        thread, frames = split_stack(stack)
        if frames and (p := phase(thread, stack, frames[-1])) is not None:
            by = counts.setdefault(thread, {})
            by[p] = by.get(p, 0) + int(n)
    out = {}
    for thread, by in counts.items():
        if set(by) == {"wait: no request"}:
            continue
        total = sum(by.values())
        out[thread] = {"samples": total,
                       "phases": {p: round(n / total, 3) for p, n in sorted(by.items(), key=lambda kv: -kv[1])}}
    return out


def read_lines(path: Path):
    return (gzip.open(path, "rt") if path.suffix == ".gz" else path.open()).readlines()


def main():
    sys.path.insert(0, str(Path(__file__).parent))
    from common import write_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw", nargs="+", type=Path, help="py-spy raw stacks, pyspy_<model>_<steps>.txt[.gz]")
    ap.add_argument("--source", type=Path, required=True, help="the bench_serve_gpu JSON of the run")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    source = json.loads(args.source.read_text())
    rows = {(r["model"], r["steps"]): r for r in source["results"]["images"]}
    table = []
    for path in args.raw:
        model, steps = path.name.split(".")[0].removeprefix("pyspy_").rsplit("_", 1)
        row = rows[model, int(steps)]
        if not row.get("http_images_per_call"):
            raise SystemExit(f"{path.name}: its row counted no pipeline call ({row.get('error', 'no error')})")
        # one pipeline call per cycle of the closed loop: the phases' shares of it, in ms
        cycle_ms = 1e3 * row["http_images_per_call"] / row["http_img_s"]
        table.append({"model": model, "steps": int(steps), "raw": path.name, "cycle_ms": cycle_ms,
                      "threads": phases(read_lines(path))})
    # hardware: the server's, where the samples were taken; git_commit: this analysis's
    write_result("pyspy_phases", {"source": {k: source[k] for k in ("bench", "hardware", "git_commit", "date")},
                                  "rows": table}, args.out.parent, args.out.name, measured_on=source["hardware"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
