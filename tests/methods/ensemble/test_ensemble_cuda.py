"""CUDA: an ensemble's decode steps replayed from real CUDA graphs equal eager decode, in both modes
(fp32 tiny model, head_dim 16 and blocks of 16: the Triton kernels, so graphs are captured)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from ensemble_dirs import build_ensemble_dir

from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TEXTS = ["1 + 2 =", "The json module", "Wrap text: the textwrap module formats paragraphs of text",
         "7 + 14 = 21", "os.path", "pytest fixtures are", "Hello", "39 + 35 = 74 and 3 + 28 = 31, so"]


def engine(model_dir, mode: str, **overrides) -> LLMEngine:
    kwargs = dict(model=str(model_dir), device="cuda", dtype="float32", block_size=16, num_kv_blocks=256,
                  max_model_len=128, max_num_batched_tokens=64, max_num_seqs=8, model_settings={"ensemble_mode": mode})
    return LLMEngine(EngineConfig(**(kwargs | overrides)))


@pytest.mark.parametrize("scope", ["full", "last:1"])
@pytest.mark.parametrize("mode", ["token_mean", "sequence_sample"])
def test_graph_replay_equals_eager(tiny_llm_dir, tmp_path, scope, mode, monkeypatch):
    ens = build_ensemble_dir(tiny_llm_dir, tmp_path / "ens", num_members=3, scope=scope)
    eager, graphed = engine(ens, mode, enforce_eager=True), engine(ens, mode)
    assert eager.model_runner.graph_runner is None
    runner = graphed.model_runner.graph_runner
    assert runner is not None and sorted(runner.graphs) == [1, 2, 4, 8]
    replays = Counter()
    run = runner.run
    monkeypatch.setattr(runner, "run",
                        lambda inputs, pending=None: replays.update([inputs.num_seqs]) or run(inputs, pending))
    for n in (1, 3, 8):
        prompts = [eager.tokenizer(t)["input_ids"] for t in TEXTS[:n]]
        params = [SamplingParams(temperature=0, max_tokens=24 - 2 * i, ignore_eos=True, logprobs=2, seed=i) if i % 2
                  else SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, ignore_eos=True, logprobs=2, seed=i)
                  for i in range(n)]
        want, got = eager.generate(prompts, params), graphed.generate(prompts, params)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        for g, w in zip(got, want):
            assert [t.logprob for t in g.logprobs] == pytest.approx([t.logprob for t in w.logprobs], abs=1e-4)
    assert {1, 3, 8} <= set(replays)
