"""A MoA model directory served by the engine (CPU, fp32, the PyTorch reference paths): spans that
cover the whole context give dense's tokens, short spans give the explicit masked reference's
(ring wrap during prefill and decode, chunked prefill, continuous batching), the cache takes and
frees exactly the plan's pages, and decode through the CUDA graph runner's buffers equals eager."""
from __future__ import annotations

import pytest
import torch
from graph_replay import attach_runner
from moa_dirs import build_moa_dir, masked_dense_greedy, tiny_plan

from leanserve.models.attention.moa import MoAKVSpec
from leanserve.models.loader import load_model
from leanserve.models.moa_plan import kv_blocks
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
MAX_TOKENS = 24
TEXTS = ["1 + 2 =", "The json module encodes and decodes objects; the textwrap module formats paragraphs, and os",
         "Wrap text: the textwrap module formats paragraphs of text so that every line fits a width",
         "39 + 35 = 74 and 3 + 28 = 31, so 7 + 14 = 21 and 12 + 5 = 17 while 8 + 8 = 16 and 30 + 1 = 31"]
# per layer, per KV head: a fixed 32-slot sink + ring (16 + 16, wraps), half the request, all of it
SHORT = ([[32.0, 0.0], [0.0, 32.0]], [[0.0, 0.5], [1.0, 0.0]])


def engine_config(model_dir, **overrides) -> EngineConfig:
    # a small step budget: long prompts are prefilled in chunks, next to other requests' decodes
    kwargs = dict(model=str(model_dir), block_size=16, num_kv_blocks=512, max_model_len=256,
                  max_num_batched_tokens=32, max_num_seqs=4, dtype="float32", device="cpu")
    return EngineConfig(**(kwargs | overrides))


@pytest.fixture(scope="module")
def short_dir(tiny_llm_dir, tmp_path_factory):
    return build_moa_dir(tiny_llm_dir, tmp_path_factory.mktemp("moa") / "short", tiny_plan(*SHORT))


@pytest.fixture(scope="module")
def short_engine(short_dir):
    return LLMEngine(engine_config(short_dir))


def prompts(engine: LLMEngine) -> list[list[int]]:
    return [engine.tokenizer(t)["input_ids"] for t in TEXTS]


def greedy(engine: LLMEngine, prompt_ids: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [r.token_ids for r in engine.generate(prompt_ids, params)]


def test_spans_covering_the_context_give_dense_tokens(tiny_llm_dir, tmp_path):
    full = build_moa_dir(tiny_llm_dir, tmp_path / "full", tiny_plan([[0.0, 0.0]] * 2, [[1.0, 1.0]] * 2))
    moa, dense = LLMEngine(engine_config(full)), LLMEngine(engine_config(tiny_llm_dir))
    assert isinstance(moa.model_runner.kv_spec, MoAKVSpec)
    assert not moa.core.block_manager.enable_prefix_caching  # ring pages are no shareable prefix
    ids = prompts(dense)
    assert greedy(moa, ids) == greedy(dense, ids)


def test_short_spans_match_the_masked_dense_reference(tiny_llm_dir, short_engine):
    ids = prompts(short_engine)
    assert max(map(len, ids)) + MAX_TOKENS > 32 + 16  # the 32-slot heads wrap their ring
    dense, _ = load_model(str(tiny_llm_dir), "cpu", torch.float32)
    plan = tiny_plan(*SHORT)
    want = [masked_dense_greedy(dense, plan, p, MAX_TOKENS) for p in ids]
    assert greedy(short_engine, ids) == want
    assert greedy(short_engine, ids[-1:]) == want[-1:]  # alone: batching does not change a request


def test_pages_are_the_plans_and_are_freed(short_engine):
    core, bm = short_engine.core, short_engine.core.block_manager
    ids = prompts(short_engine)[-1]
    planned = len(ids) + MAX_TOKENS
    want = sum(kv_blocks(a, b, planned, 16) for la, lb in zip(*SHORT) for a, b in zip(la, lb))
    assert want < 2 * 2 * -(-planned // 16)  # fewer pages than the dense cache's blocks x heads x layers
    core.add_request("r", ids, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    core.step()
    seq = core.requests["r"]
    assert len(seq.block_table) == want and bm.num_free_blocks == bm.num_blocks - want
    assert core.stats().kv_cache_usage == pytest.approx(want / bm.num_blocks)
    while core.has_unfinished():
        core.step()
        assert len(seq.block_table) in (want, 0)  # all pages at admission, no growth
    assert bm.num_free_blocks == bm.num_blocks


def test_admission_waits_for_pages(short_dir):
    """A pool of two requests' pages and a step budget for three: two run, the third waits for pages."""
    probe = LLMEngine(engine_config(short_dir))
    ids = prompts(probe)[-1]
    pages = probe.model_runner.kv_spec.blocks_for(len(ids) + MAX_TOKENS)
    engine = LLMEngine(engine_config(short_dir, num_kv_blocks=2 * pages + 1, max_model_len=96,
                                     max_num_batched_tokens=256))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for i in range(3):
        engine.core.add_request(str(i), ids, params)
    engine.core.step()
    assert len(engine.core.scheduler.running) == 2 and len(engine.core.scheduler.waiting) == 1
    while engine.core.has_unfinished():
        engine.core.step()
        assert engine.core.scheduler.num_preemptions == 0  # admission reserved every page up front
    assert engine.core.block_manager.num_free_blocks == 2 * pages + 1


def test_graph_runner_decode_equals_eager(short_dir, short_engine):
    """Decode steps through the CUDA graph runner's static buffers (replayed eagerly on CPU: padding
    rows, bucketed batches, planned lengths in the buffers) give the eager engine's tokens."""
    graphed = LLMEngine(engine_config(short_dir))
    runner = attach_runner(graphed, [1, 4])
    ids = prompts(graphed)
    assert greedy(graphed, ids[:3]) == greedy(short_engine, ids[:3])
    assert runner.replays[4] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_and_triton_kernels_give_the_reference_tokens(short_dir, short_engine):
    """fp32 on CUDA (head_dim 16, pages of 16: the Triton prefill and decode kernels): captured decode
    graphs and eager steps give the CPU reference engine's greedy tokens."""
    ids = prompts(short_engine)
    want = greedy(short_engine, ids)
    graphed = LLMEngine(engine_config(short_dir, device="cuda"))
    eager = LLMEngine(engine_config(short_dir, device="cuda", enforce_eager=True))
    assert graphed.model_runner.graph_runner is not None and eager.model_runner.graph_runner is None
    assert greedy(graphed, ids) == want and greedy(eager, ids) == want


def test_tensor_parallel_is_refused(short_dir):
    """Loading rank 0 of 2 reaches MoA's convert step, which says what it cannot split."""
    from leanserve.errors import UserError
    from leanserve.models.tensor_parallel import set_tensor_parallel
    set_tensor_parallel(0, 2)
    try:
        with pytest.raises(UserError, match="MoA models cannot be served with --tensor-parallel-size > 1"):
            load_model(str(short_dir), "cpu", torch.float32)
    finally:
        set_tensor_parallel(0, 1)
