"""CUDA-graph decode on CPU: the real CUDAGraphRunner (static buffers, views, padding, buckets) whose
"graphs" run the forward eagerly over those buffers, i.e. what a replay computes."""
from __future__ import annotations

import functools
from collections import Counter
from types import SimpleNamespace

import torch

from leanserve.server.engine.cuda_graph import CUDAGraphRunner
from leanserve.server.engine.llm_engine import LLMEngine


class EagerReplayRunner(CUDAGraphRunner):
    @torch.inference_mode()
    def capture(self) -> None:
        self.replays: Counter[int] = Counter()
        for bs in reversed(self.batch_sizes):
            self._fill_padding(bs)
            self._forward(bs)
            self.graphs[bs] = SimpleNamespace(replay=functools.partial(self._replay, bs))

    def _replay(self, bs: int) -> None:
        self.replays[bs] += 1
        self._forward(bs)


def attach_runner(engine: LLMEngine, batch_sizes: list[int]) -> EagerReplayRunner:
    mr = engine.model_runner
    runner = EagerReplayRunner(mr.model, mr.kv_caches, mr.block_table, batch_sizes, mr.max_model_len, mr.kv_spec,
                               mr.device)
    runner.capture()
    mr.graph_runner = runner
    return runner
