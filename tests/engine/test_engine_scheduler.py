"""Scheduler: token budget and sequence cap, chunked prefill mixed with decodes, FCFS admission,
preemption by recompute (and that preempted requests still produce the same tokens), queue bound."""
from __future__ import annotations

import itertools

import pytest
from test_engine_block_manager import dense_spec
from test_engine_e2e import engine_config

from leanserve.server.engine.block_manager import BlockManager, PrefixCachingBlockManager
from leanserve.server.engine.errors import QueueFullError
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.sampling_params import SamplingParams
from leanserve.server.engine.scheduler import Scheduler
from leanserve.server.engine.sequence import Sequence, SequenceStatus

_bases = itertools.count(1000, 1000)


def make_seq(rid: str, num_prompt: int, max_tokens: int = 4) -> Sequence:
    # distinct tokens per request, so prefix caching never links them
    base = next(_bases)
    return Sequence(rid, list(range(base, base + num_prompt)), SamplingParams(max_tokens=max_tokens), 0.0, [])


def scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, max_queued=100,
              pool=PrefixCachingBlockManager) -> Scheduler:
    return Scheduler(pool(num_blocks, dense_spec(block_size)), max_num_seqs, budget, max_queued)


def run_step(sched: Scheduler):
    """What the engine does around the model: advance computed tokens, sample for sequences whose
    tokens are all computed, finish at max_tokens."""
    out = sched.schedule()
    for seq, n in out.scheduled:
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(7)
            if seq.num_output_tokens == seq.params.max_tokens:
                sched.finish(seq)
    return out


def test_budget_and_sequence_cap():
    sched = scheduler(max_num_seqs=4, budget=32)
    seqs = [make_seq(f"r{i}", 10 + i) for i in range(10)]
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        out = run_step(sched)
        steps += 1
        assert 0 < out.num_batched_tokens <= 32
        assert len(out.scheduled) <= 4 and len(sched.running) <= 4
        assert len({id(s) for s, _ in out.scheduled}) == len(out.scheduled)
    assert all(s.is_finished and s.num_output_tokens == 4 for s in seqs)
    assert sched.block_manager.usage == 0.0 and steps < 60


def test_chunked_prefill_mixes_with_decodes():
    sched = scheduler(budget=16)
    short = make_seq("short", 3, max_tokens=10)
    sched.add(short)
    run_step(sched)  # short's prefill, samples its first token
    long = make_seq("long", 40)
    sched.add(long)
    out = run_step(sched)
    # the running decode goes first and takes 1 token; the new prompt gets the rest of the budget
    assert [(s.request_id, n) for s, n in out.scheduled] == [("short", 1), ("long", 15)]
    assert long.num_output_tokens == 0  # no sample from a partial prefill
    chunks = [15]
    while long.num_output_tokens == 0:
        out = run_step(sched)
        assert out.scheduled[0] == (short, 1)
        chunks.append(dict((s.request_id, n) for s, n in out.scheduled)["long"])
    assert chunks == [15, 15, 10] and long.num_computed_tokens == 40


def test_prefill_cap_applies_only_beside_decodes():
    sched = Scheduler(PrefixCachingBlockManager(64, dense_spec(4)), 8, 16, 100, max_prefill_tokens_with_decodes=4)
    first, second = make_seq("first", 10, max_tokens=20), make_seq("second", 9, max_tokens=20)
    sched.add(first)
    sched.add(second)
    out = run_step(sched)  # no decodes yet: prompts get the whole budget
    assert [(s.request_id, n) for s, n in out.scheduled] == [("first", 10), ("second", 6)]
    out = run_step(sched)  # first decodes now: second's last 3 prompt tokens fit under the cap
    assert [(s.request_id, n) for s, n in out.scheduled] == [("first", 1), ("second", 3)]
    third, fourth = make_seq("third", 10), make_seq("fourth", 5)
    sched.add(third)
    sched.add(fourth)
    chunks = []
    while third.num_computed_tokens < 10:  # beside two decodes, third's prompt goes 4 tokens a step
        out = run_step(sched)
        step = dict((s.request_id, n) for s, n in out.scheduled)
        assert step["first"] == step["second"] == 1 and sum(step.values()) - 2 <= 4
        chunks.append(step.get("third", 0))
    assert chunks == [4, 4, 2]  # and fourth takes the 2 left in the last of those steps
    assert fourth.num_computed_tokens == 2


def test_fcfs_head_is_not_overtaken():
    sched = scheduler(num_blocks=8, block_size=4, budget=64)
    sched.add(make_seq("a", 20))  # 5 blocks
    run_step(sched)
    big, small = make_seq("big", 16), make_seq("small", 2)  # 4 blocks (only 3 free), 1 block
    sched.add(big)
    sched.add(small)
    out = run_step(sched)
    assert [s.request_id for s, _ in out.scheduled] == ["a"]
    assert list(sched.waiting) == [big, small]


@pytest.mark.parametrize("pool", [PrefixCachingBlockManager, BlockManager])
def test_preemption_recomputes_the_newest_sequence(pool):
    sched = scheduler(num_blocks=8, block_size=4, budget=64, pool=pool)
    a, b, c = (make_seq(r, 7, max_tokens=12) for r in "abc")  # each grows to 19 tokens = 5 blocks
    for s in (a, b, c):
        sched.add(s)
    preempted, freed = [], []
    while sched.has_unfinished():
        running_before = list(sched.running)
        out = run_step(sched)
        freed += out.freed
        if out.num_preempted:
            victims = [s for s in running_before if s.status is SequenceStatus.WAITING]
            # the most recently admitted go, to the front of the queue (keeping their order),
            # with nothing cached
            assert victims == running_before[len(running_before) - len(victims):]
            assert list(sched.waiting)[:len(victims)] == victims
            assert all(v.block_table == [] and v.num_computed_tokens == 0 for v in victims)
            assert out.freed[-len(victims):] == victims[::-1]  # the step's output names them: their rows go
            preempted += victims
        held = sum(len(s.block_table) for s in sched.running)
        assert held <= 8
    assert preempted and sched.num_preemptions == len(preempted)
    assert all(s.is_finished and s.num_tokens == 19 for s in (a, b, c))
    freed += sched.schedule().freed  # finished after the last step: named by the next one
    assert sorted(s.request_id for s in freed) == sorted([s.request_id for s in preempted] + list("abc"))
    assert sched.block_manager.usage == 0.0


def test_waiting_queue_bound():
    sched = scheduler(max_queued=2)
    sched.add(make_seq("a", 3))
    sched.add(make_seq("b", 3))
    with pytest.raises(QueueFullError):
        sched.add(make_seq("c", 3))
    run_step(sched)  # admitted requests leave the queue
    sched.add(make_seq("c", 3))


def test_preempted_requests_produce_the_same_tokens(tiny_llm_dir):
    texts = ["1 + 2 =", "The json", "os.path", "7 + 14", "pytest is"]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)] * 4 + \
             [SamplingParams(temperature=0.9, seed=5, max_tokens=20, ignore_eos=True)]
    roomy = LLMEngine(engine_config(tiny_llm_dir, max_model_len=32))
    prompts = [roomy.tokenizer(t)["input_ids"] for t in texts]
    want = roomy.generate(prompts, params)
    assert roomy.scheduler.num_preemptions == 0
    # 8 blocks of 4 = 32 tokens for five sequences growing to 23-26 tokens each
    tight = LLMEngine(engine_config(tiny_llm_dir, num_kv_blocks=8, max_model_len=32))
    got = tight.generate(prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.text for r in got] == [r.text for r in want]
    assert tight.block_manager.usage == 0.0
