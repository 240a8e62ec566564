"""CPU: what the host adds to every decode step of the engine, dense vs MoA caches (a uniform window
and mixed spans at the same density), at a realistic block-table size: Llama-3-8B's 32 layers x 8
KV heads and 64-token pages (a 16k-token MoA request holds ~33k pages, one table entry each; dense
holds 256 blocks) with a tiny hidden size.

    python benchmarks/bench_engine_host.py [--context 16384] [--batch 25] [--steps 20]
    python benchmarks/bench_engine_host.py --smoke

Requests start as if prefilled (all their blocks allocated, the prompt counted as computed), and
decode steps go through the CUDA-graph runner whose replay does nothing: on a GPU a replay runs
asynchronously, so what this times is the host work a step puts in front of it (scheduling, step
inputs, block-table copies, sampling a tiny vocabulary, outputs). Also counted: the bytes a step
hands to the device (the graph's input buffers and the block-table rows' new entries), admitting a
request (scheduling it with its blocks; its table row is copied in the first step, timed apart) and a
step in which one request finishes (its blocks freed), as a server pays them whenever requests come
and go.
Results: benchmarks/results/engine_host-<cpu>.json, {"arms": {arm: {step_ms, first_step_ms, ...}}}.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import types
from pathlib import Path

import numpy as np
import torch
from bench_decode_gpu import LLAMA3_8B, model_dir
from bench_moa_gpu import moa_dir, plan_of, uniform_plan
from common import write_result

from leanserve.models.moa_plan import MoAPlan
from leanserve.server.engine.block_table import PersistentBlockTable
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.cuda_graph import CUDAGraphRunner, DecodeInputs
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.sampling_params import SamplingParams

SHAPE = dict(LLAMA3_8B, hidden_size=128, intermediate_size=128, vocab_size=512, torch_dtype="float32")


class CountingTable(PersistentBlockTable):
    """Counts the bytes of new table entries sent to the device (index + value, int64 each)."""
    sent = 0

    def write(self, update: np.ndarray) -> None:
        self.sent += 8 * len(update)
        super().write(update)


class NoReplayRunner(CUDAGraphRunner):
    """The graph runner's host side (padding, input copies) with replays that run nothing."""
    sent = 0

    def capture(self) -> None:
        width = self.model.config.vocab_size if self.with_logits else self.model.config.hidden_size
        self.out = torch.zeros(self.batch_sizes[-1], width)
        self.graphs = {bs: types.SimpleNamespace(replay=lambda: None) for bs in self.batch_sizes}

    def _copy(self, padded: DecodeInputs) -> None:
        self.sent += 8 * self.id_rows * padded.num_seqs + 4 * 3 * padded.num_seqs
        super()._copy(padded)


def mixed_plan(config: dict, density: float, profile_lengths: list[int], block: int) -> MoAPlan:
    """Heterogeneous spans at the same mean density without the optimiser (its MILP takes a minute at
    this many units; a step's host cost depends on the table's size, not on how spans were chosen):
    in every layer, half the KV heads keep beta = density / 2, half 3 density / 2."""
    layers, heads = config["num_hidden_layers"], config["num_key_value_heads"]
    betas = [[density * (0.5 if u % 2 else 1.5) for u in range(heads)] for _ in range(layers)]
    return plan_of(config, [[0.0] * heads for _ in range(layers)], betas, density, profile_lengths, block, 2)


def blocks_per_request(plan: MoAPlan | None, n: int, block_size: int) -> int:
    if plan is None:
        return -(-n // block_size)
    return sum(-(-c // block_size) for layer in plan.slots(n) for c in layer)


def planned_len(args) -> int:
    """The longest request's prompt + max_tokens (run_arm staggers max_tokens by the request's index)."""
    return args.context + args.steps + 2 + args.batch


def run_arm(path: Path, plan: MoAPlan | None, args) -> dict:
    n = planned_len(args)
    config = EngineConfig(model=str(path), load_format="dummy", device="cpu", dtype="float32", max_model_len=n,
                          max_num_seqs=args.batch, max_num_batched_tokens=args.batch * n, block_size=args.block_size,
                          enable_prefix_caching=False,
                          num_kv_blocks=args.batch * blocks_per_request(plan, n, args.block_size))
    engine = LLMEngine(config)
    mr, core = engine.model_runner, engine.core
    mr.block_table = CountingTable(args.batch, mr.block_table.width, mr.device)
    runner = NoReplayRunner(mr.model, mr.kv_caches, mr.block_table, [args.batch], mr.max_model_len, mr.kv_spec,
                            mr.device)
    runner.capture()
    mr.graph_runner = runner
    rng = random.Random(0)
    for i in range(args.batch):  # request i finishes i + 1 steps after the timed ones: one finish per step
        params = SamplingParams(temperature=0, max_tokens=args.steps + 3 + i, ignore_eos=True)
        core.add_request(str(i), [rng.randrange(3, SHAPE["vocab_size"]) for _ in range(args.context)], params)
    t = time.perf_counter()
    for seq, k in core.scheduler.schedule().scheduled:  # admitted with all their blocks: "prefilled"
        seq.num_computed_tokens += k
        seq.append_token(5)
    admit = time.perf_counter() - t
    table_entries = len(core.requests["0"].block_table)
    t = time.perf_counter()
    core.step()  # the first decode step also copies every table in
    first = time.perf_counter() - t
    sent_before = (mr.block_table.sent, runner.sent)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - t)
    sent = mr.block_table.sent - sent_before[0] + runner.sent - sent_before[1]
    finishing = []  # steps that each end one request (and free its blocks), the batch shrinking
    while core.has_unfinished():
        t = time.perf_counter()
        core.step()
        finishing.append(time.perf_counter() - t)
    return {"table_entries_per_request": table_entries, "admit_ms_per_request": 1e3 * admit / args.batch,
            "first_step_ms": 1e3 * first, "step_ms": 1e3 * statistics.median(times),
            "step_ms_min": 1e3 * min(times), "h2d_bytes_per_step": sent / args.steps,
            "finishing_step_ms": 1e3 * statistics.median(finishing)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="context 512, batch 4, 3 steps, pages of 16")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.context, args.batch, args.steps, args.block_size = 512, 4, 3, 16
    torch.set_num_threads(args.threads)
    shape = dict(SHAPE, max_position_embeddings=planned_len(args))
    base = model_dir(shape)
    profile = [args.context // 4, args.context // 2, args.context]
    plans = {"dense": None, "uniform": uniform_plan(shape, args.density, profile, args.block_size),
             "mixed": mixed_plan(shape, args.density, profile, args.block_size)}
    arms = {}
    for name, plan in plans.items():
        arms[name] = run_arm(base if plan is None else moa_dir(base, plan), plan, args)
        print(name, json.dumps(arms[name]), flush=True)
    out = write_result("engine_host_smoke" if args.smoke else "engine_host",
                       {"context": args.context, "batch": args.batch, "steps": args.steps, "density": args.density,
                        "block_size": args.block_size, "layers": shape["num_hidden_layers"],
                        "kv_heads": shape["num_key_value_heads"], "arms": arms},
                       **({"out_dir": args.out_dir} if args.out_dir else {}))
    print(out)


if __name__ == "__main__":
    main()
