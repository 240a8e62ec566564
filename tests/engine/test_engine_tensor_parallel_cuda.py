"""Tensor parallel on 2 GPUs (NCCL), skipped elsewhere: decode steps replay CUDA graphs that hold the
all-reduces, and the greedy tokens are the one-GPU engine's (fp32 tiny model, head_dim 16: the Triton
decode path). The CPU tests (gloo) cover the rest: tests/models/test_models_tensor_parallel.py,
tests/server/test_server_tensor_parallel.py."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
PROMPTS = [[5, 17, 99, 230, 41, 7], list(range(30, 70)), [11] * 20]


def test_tp2_graph_replays_give_the_tp1_greedy_tokens(tiny_llm_dir, monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    tokens, replays = {}, Counter()
    for tp in (1, 2):
        engine = LLMEngine(EngineConfig(model=str(tiny_llm_dir), device="cuda", dtype="float32", block_size=16,
                                        max_model_len=256, max_num_seqs=4, num_kv_blocks=64, tensor_parallel_size=tp))
        try:
            runner = engine.model_runner.graph_runner
            assert runner is not None
            run = runner.run
            monkeypatch.setattr(runner, "run", lambda inputs, tp=tp, run=run: replays.update([tp]) or run(inputs))
            tokens[tp] = [r.token_ids for r in engine.generate(PROMPTS, params)]
        finally:
            engine.close()
    assert tokens[2] == tokens[1]
    assert replays[1] > 0 and replays[2] == replays[1]
