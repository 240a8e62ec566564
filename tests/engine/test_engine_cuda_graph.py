"""CUDA graphs for decode: bucket choice and padding (pure functions), the runner's static-buffer
plumbing on CPU (its "graphs" replaced by eager forwards over the same buffers), and on CUDA real
graphs against eager decode plus the no-host-sync property of a step."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from graph_replay import attach_runner

from leanserve.errors import UserError
from leanserve.models.attention.metadata import AttentionMetadata
from leanserve.models.attention.paged import uses_triton_decode
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.cuda_graph import (
    PAD_POSITION,
    PAD_PLANNED_LEN,
    PAD_SEQ_LEN,
    PAD_SLOT,
    PAD_TOKEN,
    PAD_VARIANT,
    DecodeInputs,
    check_batch_sizes,
    default_batch_sizes,
    pad_decode_inputs,
    select_bucket,
)
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.model_runner import ModelRunner
from leanserve.server.engine.sampling_params import SamplingParams
from leanserve.server.engine.sequence import Sequence

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = ["1 + 2 =", "The json module", "Wrap text: the textwrap module formats paragraphs of text",
         "7 + 14 = 21", "os.path", "pytest fixtures are", "Hello", "39 + 35 = 74 and 3 + 28 = 31, so"]


def engine_config(model_dir, **overrides) -> EngineConfig:
    # small blocks: prompts span several blocks, so block tables differ in width within a batch
    kwargs = dict(model=str(model_dir), block_size=4, num_kv_blocks=256, max_model_len=128,
                  max_num_batched_tokens=32, max_num_seqs=8, enable_prefix_caching=False)
    return EngineConfig(**(kwargs | overrides))


def table_rows(mr: ModelRunner, tables: list[list[int]]) -> tuple[list[Sequence], list[int]]:
    """Sequences holding `tables` and their rows of the runner's persistent block table."""
    seqs = []
    for i, table in enumerate(tables):
        seqs.append(Sequence(f"t{i}", [1], SamplingParams(), 0.0, []))
        seqs[-1].block_table = table
    return seqs, mr.block_table.rows(seqs)


def requests(engine: LLMEngine, n: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """n prompts; greedy and seeded rows, with different lengths so the batch shrinks as they finish."""
    prompts = [engine.tokenizer(t)["input_ids"] for t in TEXTS[:n]]
    params = [SamplingParams(temperature=0, max_tokens=32 - 3 * i, ignore_eos=True) if i % 2 == 0 else
              SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=32 - 3 * i, ignore_eos=True)
              for i in range(n)]
    return prompts, params


# ---- pure functions --------------------------------------------------------------------------------

def test_default_batch_sizes():
    assert default_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert default_batch_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100]
    assert default_batch_sizes(6) == [1, 2, 4, 6]
    assert default_batch_sizes(1) == [1]
    for max_num_seqs in range(1, 300):
        sizes = default_batch_sizes(max_num_seqs)
        assert sizes == sorted(set(sizes)) and sizes[-1] == max_num_seqs
        for n in range(1, max_num_seqs + 1):  # every batch has a bucket, padded by less than 2x
            assert n <= select_bucket(n, sizes) < 2 * n


def test_select_bucket_and_check_batch_sizes():
    sizes = [1, 2, 4, 8]
    assert [select_bucket(n, sizes) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    assert check_batch_sizes([8, 2, 2], 8) == [2, 8]
    for bad in ([], [0, 2], [2, 9]):
        with pytest.raises(UserError, match="cuda_graph_batch_sizes"):
            check_batch_sizes(bad, 8)


def test_pad_decode_inputs():
    inputs = DecodeInputs(input_ids=[5, 6, 7], positions=[0, 5, 2], slot_mapping=[40, 49, 54], seq_lens=[1, 6, 3],
                          rows=[2, 0, 1], planned_lens=[9, 8, 7])
    padded = pad_decode_inputs(inputs, 5, pad_row=8)
    assert padded.num_seqs == 5 and inputs.num_seqs == 3  # the input is left alone
    assert padded.input_ids == [5, 6, 7, PAD_TOKEN, PAD_TOKEN]
    assert padded.positions == [0, 5, 2, PAD_POSITION, PAD_POSITION]
    assert padded.slot_mapping == [40, 49, 54, -1, -1] and PAD_SLOT == -1  # padding never writes the KV cache
    assert padded.seq_lens == [1, 6, 3, PAD_SEQ_LEN, PAD_SEQ_LEN] and PAD_SEQ_LEN == 1
    assert padded.rows == [2, 0, 1, 8, 8]  # a padding row's only read (seq_len 1) is the padding row's block
    assert padded.planned_lens == [9, 8, 7, PAD_PLANNED_LEN, PAD_PLANNED_LEN] and PAD_PLANNED_LEN == 1
    assert pad_decode_inputs(inputs, 3, pad_row=8) == inputs
    with pytest.raises(ValueError):
        pad_decode_inputs(inputs, 2, pad_row=8)
    assert padded.variants is None  # a one-variant model's steps carry no variant ids
    with_variants = pad_decode_inputs(DecodeInputs([5], [0], [40], [1], [0], [4], variants=[2]), 3, pad_row=8)
    assert with_variants.variants == [2, PAD_VARIANT, PAD_VARIANT] and PAD_VARIANT == 0


def test_uses_triton_decode():
    assert uses_triton_decode(128, 16) and uses_triton_decode(16, 4)
    assert not uses_triton_decode(8, 16)    # tl.dot needs head_dim >= 16
    assert not uses_triton_decode(96, 16)   # not a power of two
    assert not uses_triton_decode(64, 12)


# ---- the runner's buffers on CPU --------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_llm_dir):
    return LLMEngine(engine_config(tiny_llm_dir))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU engine")
def test_cpu_has_no_graphs(engine, tiny_llm_dir):
    assert engine.model_runner.graph_runner is None
    with pytest.raises(UserError, match="cuda_graph_batch_sizes"):
        ModelRunner(engine_config(tiny_llm_dir, cuda_graph_batch_sizes=[4, 16]))


@pytest.mark.parametrize("batch_sizes", [[1, 2, 4, 8], [2, 4]])
def test_replayed_decode_equals_eager(engine, batch_sizes):
    """Batches of 1, 3 and 8 shrinking as requests finish: through buckets with padding rows, and
    with [2, 4] also past the largest bucket (those steps stay eager)."""
    for n in (1, 3, 8):
        prompts, params = requests(engine, n)
        engine.model_runner.graph_runner = None
        eager = engine.generate(prompts, params)
        runner = attach_runner(engine, batch_sizes)
        try:
            replayed = engine.generate(prompts, params)
        finally:
            engine.model_runner.graph_runner = None
        assert [r.token_ids for r in replayed] == [r.token_ids for r in eager]
        assert [len(r.token_ids) for r in eager] == [p.max_tokens for p in params]
        assert sum(runner.replays.values()) >= min(params, key=lambda p: p.max_tokens).max_tokens - 2
        if n == 3 and batch_sizes[0] == 1:
            assert runner.replays[4] > 0  # 3 rows + 1 padding row
    assert engine.block_manager.usage == 0.0


def test_replayed_decode_reads_unread_tokens_on_the_device(engine, tiny_llm_dir):
    """Async scheduling: a replay's input ids for tokens the host has not read yet come from the previous
    step's samples, written over the static buffer on the device; the tokens equal the synchronous
    engine's (batches shrinking through the buckets, padding rows included)."""
    overlapped = LLMEngine(engine_config(tiny_llm_dir, async_scheduling=True))
    for n in (1, 3, 8):
        prompts, params = requests(engine, n)
        engine.model_runner.graph_runner = None
        want = engine.generate(prompts, params)
        runner = attach_runner(overlapped, [1, 2, 4, 8])
        try:
            got = overlapped.generate(prompts, params)
        finally:
            overlapped.model_runner.graph_runner = None
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert sum(runner.replays.values()) >= min(params, key=lambda p: p.max_tokens).max_tokens - 2
    assert overlapped.block_manager.usage == 0.0


def test_padding_rows_leave_the_kv_cache_alone_and_real_rows_match_eager(engine):
    mr = engine.model_runner
    for k, v in mr.kv_caches:  # no request is live: start from an all-zero cache
        k.zero_()
        v.zero_()
    k_before = [k.clone() for k, _ in mr.kv_caches]
    runner = attach_runner(engine, [4])  # the capture's warm-up runs 4 padding rows
    mr.graph_runner = None
    assert all(torch.equal(k, kb) for (k, _), kb in zip(mr.kv_caches, k_before))

    bs = mr.block_size  # 4: seq 1 decodes position 5 in its second block
    seqs, rows = table_rows(mr, [[10], [11, 12], [13]])
    inputs = DecodeInputs(input_ids=[5, 6, 7], positions=[0, 5, 2], slot_mapping=[10 * bs, 12 * bs + 1, 13 * bs + 2],
                          seq_lens=[1, 6, 3], rows=rows, planned_lens=[4, 9, 5])
    logits = runner.run(inputs).clone()  # the LM head runs in the graph
    mr.release(seqs)
    assert runner.replays == Counter({4: 1}) and logits.shape == (3, mr.vocab_size)
    for (k, v), kb in zip(mr.kv_caches, k_before):
        changed = (k != kb).flatten(2).any(-1).flatten().nonzero().flatten().tolist()
        assert changed == sorted(inputs.slot_mapping)  # the 3 real rows wrote, the padding row did not

    # the same step eagerly (writes the same K/V again, then attends identically)
    dev = mr.device
    meta = AttentionMetadata(slot_mapping=torch.tensor(inputs.slot_mapping, device=dev),
                             query_start_loc=torch.arange(4, dtype=torch.int32, device=dev),
                             seq_lens=torch.tensor(inputs.seq_lens, dtype=torch.int32, device=dev),
                             block_tables=torch.tensor([[10, -1], [11, 12], [13, -1]], dtype=torch.int32, device=dev),
                             max_query_len=1, max_seq_len=6, block_size=bs)
    with torch.inference_mode():
        want = mr.model.compute_logits(mr.model(torch.tensor(inputs.input_ids, device=dev),
                                                torch.tensor(inputs.positions, device=dev), mr.kv_caches, meta))
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


# ---- CUDA ------------------------------------------------------------------------------------------

@cuda
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async-scheduling"])
@pytest.mark.parametrize("batch_sizes", [None, [2]])
def test_cuda_graph_decode_equals_eager(tiny_llm_dir, batch_sizes, async_scheduling, monkeypatch):
    """fp32 tiny model (head_dim 16: the Triton decode path): the tokens of graph-replayed decode
    equal eager decode over 32 steps for batches of 1, 3 and 8 (with [2], batches above 2 run
    eagerly until they shrink); with async scheduling too (unread tokens copied from the previous
    step's samples into the graph's inputs, the samples read back through pinned memory)."""
    kw = dict(device="cuda", dtype="float32", block_size=16)
    eager = LLMEngine(engine_config(tiny_llm_dir, enforce_eager=True, **kw))
    graphed = LLMEngine(engine_config(tiny_llm_dir, cuda_graph_batch_sizes=batch_sizes,
                                      async_scheduling=async_scheduling, **kw))
    assert eager.model_runner.graph_runner is None
    runner = graphed.model_runner.graph_runner
    assert sorted(runner.graphs) == (batch_sizes or [1, 2, 4, 8])
    replays = Counter()
    run = runner.run
    monkeypatch.setattr(runner, "run", lambda inputs, pending=None: replays.update([inputs.num_seqs])
                        or run(inputs, pending))
    for n in (1, 3, 8):
        prompts, params = requests(eager, n)
        greedy = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)] * n
        for p in (greedy, params):
            want, got = eager.generate(prompts, p), graphed.generate(prompts, p)
            assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert replays and (batch_sizes is not None or {1, 3, 8} <= set(replays))


@cuda
def test_cuda_decode_step_has_no_host_sync(tiny_llm_dir):
    """The graph replay with its input copies, the eager step's input building, and sampling with
    every setting issue no host sync: only reading the sampled ids does."""
    engine = LLMEngine(engine_config(tiny_llm_dir, device="cuda", dtype="float32", block_size=16))
    mr = engine.model_runner
    inputs = DecodeInputs([5, 6, 7], [0, 17, 2], [10 * 16, 12 * 16 + 1, 13 * 16 + 2], [1, 18, 3],
                          table_rows(mr, [[10], [11, 12], [13]])[1], [4, 20, 5])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=3,
                                                            repetition_penalty=1.2, presence_penalty=0.5,
                                                            frequency_penalty=0.3, logit_bias={4: 2.0},
                                                            min_tokens=2, max_tokens=8),
              SamplingParams(temperature=1.0)]
    seqs = []
    for i, p in enumerate(params):
        engine.add_request(f"r{i}", [3, 4, 5], p)
        seqs.append(engine.core.requests[f"r{i}"])
    sched = engine.scheduler.schedule()  # the prefill: all blocks allocated, an eager step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            logits = mr.graph_runner.run(inputs)  # the LM head is in the graph
            mr._tensors(mr._eager_inputs(sched.scheduled, mr.block_table.rows([s for s, _ in sched.scheduled])))
            ids = mr.sampler.sample(logits, seqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ids.shape == (3,) and 0 <= int(ids.min()) and int(ids.max()) < mr.vocab_size


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_closed_loop_through_every_bucket_with_preemption_finishes(tiny_llm_dir, async_scheduling):
    """A serving-like closed loop: 48 requests in flight, each finished one replaced until 144 are done,
    in a cache too small for all of them (preemption), replayed through the buckets up to 48. Every
    request ends with all its tokens and every block and block-table row comes back."""
    engine = LLMEngine(engine_config(tiny_llm_dir, max_num_seqs=48, num_kv_blocks=300, max_model_len=64,
                                     max_num_batched_tokens=128, enable_prefix_caching=True,
                                     async_scheduling=async_scheduling))
    runner = attach_runner(engine, default_batch_sizes(48))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    sent, received, finished = 0, Counter(), []

    def add() -> None:
        nonlocal sent
        engine.add_request(str(sent), [3 + (sent * 7 + i) % 200 for i in range(24)], params)
        sent += 1
    for _ in range(48):
        add()
    while engine.has_unfinished():
        for out in engine.step():
            received[out.request_id] += len(out.new_token_ids)
            if out.finished:
                finished.append(out.finish_reason)
                if sent < 144:
                    add()
    assert finished == ["length"] * 144 and set(received.values()) == {16} and len(received) == 144
    assert engine.scheduler.num_preemptions > 0 and max(runner.replays) > 24
    assert engine.block_manager.usage == 0.0
    assert engine.step() == []  # the last finished sequences' rows go back at the next schedule
    assert engine.model_runner.block_table.num_rows_in_use == 0
