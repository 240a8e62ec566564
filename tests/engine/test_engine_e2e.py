"""The engine end to end on the tiny Llama (fp32, CPU): equality with transformers, batching
invariance, prefix caching, stops, aborts, and the asyncio front (streaming, cancellation,
queue bound, engine death, shutdown)."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from leanserve.server.engine.async_engine import AsyncLLMEngine
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.errors import EngineDeadError, QueueFullError
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def engine_config(model_dir, **overrides) -> EngineConfig:
    # small blocks and a small step budget, so prompts span blocks and prefills are chunked;
    # fp32 also on a GPU (auto would pick bf16 there), so results compare exactly with transformers
    kwargs = dict(model=str(model_dir), block_size=4, num_kv_blocks=256, max_model_len=128,
                  max_num_batched_tokens=32, max_num_seqs=8, dtype="float32")
    return EngineConfig(**(kwargs | overrides))


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async-scheduling"])
def engine(tiny_llm_dir, request):
    # async scheduling: each step launched before the previous step's tokens are read; every test of
    # this engine must hold either way
    return LLMEngine(engine_config(tiny_llm_dir, async_scheduling=request.param))


@pytest.fixture(scope="module")
def prompts(tiny_llm_dir):
    from leanserve.models.model_dir import load_tokenizer

    texts = ["1 + 2 =", "The json module", "Wrap text: the textwrap module formats paragraphs of text",
             "7 + 14 = 21", "os.path", "pytest fixtures are", "Hello", "39 + 35 = 74 and 3 + 28 = 31, so"]
    tokenizer = load_tokenizer(str(tiny_llm_dir))
    return [tokenizer(t)["input_ids"] for t in texts]


def test_greedy_matches_transformers(engine, prompts, tiny_llm_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32).eval()
    results = engine.generate(prompts[:4], GREEDY)
    for prompt, res in zip(prompts[:4], results):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY.max_tokens,
                          do_sample=False, eos_token_id=None)[0, len(prompt):].tolist()
        assert res.token_ids == ref
        assert res.finish_reason == "length"
        assert res.text == engine.tokenizer.decode(ref, skip_special_tokens=True)
    assert len({tuple(r.token_ids) for r in results}) == 4
    assert engine.block_manager.usage == 0.0


def test_batched_equals_one_at_a_time(tiny_llm_dir, prompts):
    params = [GREEDY, SamplingParams(temperature=0.9, seed=1, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=2, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=20, ignore_eos=True)] * 2
    # prefix caching off: the batched run must not lean on blocks the lone runs left behind;
    # offline generate() is not subject to the serving queue bound
    eng = LLMEngine(engine_config(tiny_llm_dir, enable_prefix_caching=False, max_queued_requests=2))
    together = eng.generate(prompts, params)
    alone = [eng.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]


def test_prefix_cache_hit_gives_identical_output(engine, prompts):
    prompt = prompts[2] + prompts[7]  # 10+ blocks of 4
    hits_before = engine.block_manager.prefix_cache_hits
    first, = engine.generate([prompt], GREEDY)
    second, = engine.generate([prompt], GREEDY)
    assert second.num_cached_tokens >= len(prompt) - engine.block_manager.block_size
    assert second.num_cached_tokens < len(prompt)
    assert engine.block_manager.prefix_cache_hits - hits_before >= second.num_cached_tokens
    assert second.token_ids == first.token_ids and second.text == first.text


def test_a_finished_conversation_is_cached_to_its_last_computed_token(engine, prompts):
    # a chat's next turn starts with the last turn's prompt and reply: every full block of what the
    # last turn computed is a hit, also with async scheduling, where the block a sequence's last
    # computed token fills is only known to the cache once that sequence's final token is read
    bs = engine.block_manager.block_size
    # a prompt length at which the last computed token (the reply's last but one) ends a block
    prompt = (prompts[5] + prompts[1])[:bs * 4 - GREEDY.max_tokens % bs + 1]
    first, = engine.generate([prompt], GREEDY)
    conversation = prompt + first.token_ids
    assert len(first.token_ids) == GREEDY.max_tokens and (len(conversation) - 1) % bs == 0
    second, = engine.generate([conversation], SamplingParams(temperature=0, max_tokens=1))
    assert second.num_cached_tokens == len(conversation) - 1


def test_abort_frees_all_blocks(engine, prompts):
    for i, p in enumerate(prompts[:5]):
        engine.add_request(f"abort-{i}", p, GREEDY)
    for _ in range(4):
        engine.step()
    assert engine.block_manager.usage > 0
    outs = [engine.abort(f"abort-{i}") for i in range(5)]
    assert all(o.finished and o.finish_reason == "abort" for o in outs)
    assert engine.abort("abort-0") is None  # already gone
    assert not engine.has_unfinished() and engine.block_manager.usage == 0.0
    assert engine.stats().kv_cache_usage == 0.0 and engine.stats().num_running == 0


def test_stop_token_ids_and_stop_strings(engine, prompts):
    ref, = engine.generate([prompts[1]], GREEDY)
    stop_id = ref.token_ids[5]
    first = ref.token_ids.index(stop_id)
    res, = engine.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id]))
    assert res.token_ids == ref.token_ids[:first + 1]
    assert (res.finish_reason, res.stop_reason) == ("stop", stop_id)
    assert res.text == engine.tokenizer.decode(ref.token_ids[:first])  # the stop token's text is not emitted

    stop = ref.text[len(ref.text) // 2:len(ref.text) // 2 + 3]
    res, = engine.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    assert (res.finish_reason, res.stop_reason) == ("stop", stop)
    assert res.text == ref.text[:ref.text.index(stop)]


def test_times_travel_with_the_first_token_and_the_end(engine, prompts):
    """A request's engine times come with its first output and its last, also when a stop string (found
    outside the core) ends it; the outputs between carry none (copying them per token was a third of the
    core's host work at batch 256)."""
    ref, = engine.generate([prompts[1]], GREEDY)
    stop = ref.text[len(ref.text) // 2:len(ref.text) // 2 + 3]
    engine.add_request("timed", prompts[1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert len(outs) > 2 and outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop
    assert outs[0].times is not None and all(o.times is None for o in outs[1:-1])
    t = outs[-1].times
    assert t.first_token == outs[0].token_times[0] and t.last_token == t.finished == outs[-1].token_times[-1]
    assert t.arrival <= t.queued <= t.scheduled <= t.first_token < t.finished
    assert not engine.processor.times and not engine.processor.detokenizers


def test_eos_and_min_tokens(engine, prompts):
    eos = engine.eos_token_ids[0]
    forced = SamplingParams(temperature=0, max_tokens=10, logit_bias={eos: 100.0})
    res, = engine.generate([prompts[0]], forced)
    assert res.token_ids == [eos] and res.finish_reason == "stop" and res.stop_reason is None and res.text == ""
    res, = engine.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=10, min_tokens=3,
                                                        logit_bias={eos: 100.0}))
    assert len(res.token_ids) == 4 and res.token_ids[-1] == eos and eos not in res.token_ids[:3]


def test_request_validation(engine, prompts):
    with pytest.raises(ValueError, match="maximum context length is 128 tokens"):
        engine.add_request("too-long", prompts[0], SamplingParams(max_tokens=128))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("oov", [engine.vocab_size], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], GREEDY)
    assert not engine.has_unfinished()


def test_logprobs(engine, prompts):
    res, = engine.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2))
    assert len(res.logprobs) == 5
    for t, lp in zip(res.token_ids, res.logprobs):
        assert lp.token_id == t and lp.logprob <= 0 and len(lp.top) == 2
        assert lp.top[0][0] == t and lp.top[0][2] == pytest.approx(lp.logprob)  # greedy = the top token
        assert lp.token == engine.tokenizer.decode([t])


def test_async_scheduling_matches_sync_under_preemption(tiny_llm_dir, prompts):
    """Async scheduling launches each step before reading the previous step's tokens: with seeded
    sampling, logprobs, stop ids and EOS forced early in one batch, and a KV cache so small that sequences
    are preempted while their last token is still unread, each request gets exactly the tokens of the
    synchronous engine, and every block comes back. Penalties (which make a step synchronous) in a second
    batch."""
    results, device_steps, pending_victims = {}, 0, 0
    for async_scheduling in (False, True):
        eng = LLMEngine(engine_config(tiny_llm_dir, async_scheduling=async_scheduling, num_kv_blocks=40))
        end = eng.eos_token_ids[0]
        mr, sched = eng.model_runner, eng.core.scheduler
        placeholder_inputs, preempt = mr._placeholder_inputs, sched._preempt

        def count_device_inputs(*args):
            nonlocal device_steps
            out = placeholder_inputs(*args)
            device_steps += out is not None
            return out

        def count_pending_victims(seq):
            nonlocal pending_victims
            pending_victims += seq.num_pending_tokens > 0
            preempt(seq)

        mr._placeholder_inputs, sched._preempt = count_device_inputs, count_pending_victims
        params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                  SamplingParams(temperature=0.9, seed=3, max_tokens=18, ignore_eos=True, logprobs=2),
                  SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[prompts[1][2]]),
                  SamplingParams(temperature=0, max_tokens=10, min_tokens=3, logit_bias={end: 100.0}),
                  SamplingParams(temperature=0.8, seed=5, top_k=20, max_tokens=1)] * 2
        outs = eng.generate(prompts[:5] + prompts[3:8], params)
        assert [len(r.token_ids) for r in outs][3] == 4  # EOS after min_tokens, the next token dropped
        assert sched.num_preemptions > 0  # the cache is too small for all ten at once
        penalised = [SamplingParams(temperature=0, max_tokens=15, repetition_penalty=1.3, ignore_eos=True),
                     SamplingParams(temperature=0.7, seed=1, max_tokens=15, frequency_penalty=0.5, ignore_eos=True),
                     SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)]
        outs += eng.generate(prompts[5:8], penalised)
        results[async_scheduling] = [(r.token_ids, r.finish_reason, [lp.logprob for lp in r.logprobs or []])
                                     for r in outs]
        assert not eng.has_unfinished() and eng.block_manager.usage == 0.0
    assert device_steps > 10 and pending_victims > 0  # the async run read ids on the device, and preempted
    sync, overlapped = results[False], results[True]
    for a, b in zip(sync, overlapped):
        assert a[:2] == b[:2]
        assert a[2] == pytest.approx(b[2], abs=1e-5)


def test_async_scheduling_returns_each_step_one_step_late(tiny_llm_dir, prompts):
    """A step's tokens come out of the next step() (that one is launched before they are read); the
    last token's step launches nothing for a sequence that ends by length."""
    for async_scheduling, expected in ((False, [1, 1, 1]), (True, [0, 1, 1, 1])):
        eng = LLMEngine(engine_config(tiny_llm_dir, async_scheduling=async_scheduling))
        eng.add_request("r", prompts[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        counts = []
        while eng.has_unfinished():
            counts.append(len(eng.step()))
        assert counts == expected


def test_refuses_a_cache_smaller_than_one_sequence(tiny_llm_dir):
    from leanserve.errors import UserError
    with pytest.raises(UserError, match="less than one max_model_len"):
        LLMEngine(engine_config(tiny_llm_dir, num_kv_blocks=8, max_model_len=64))


# ---- AsyncLLMEngine ---------------------------------------------------------------------------------


async def collect(stream):
    outs = [out async for out in stream]
    return outs, "".join(o.new_text for o in outs), [t for o in outs for t in o.new_token_ids]


def test_async_streams_match_offline(tiny_llm_dir, engine, prompts):
    offline = engine.generate(prompts[:4], GREEDY)

    async def main():
        eng = AsyncLLMEngine(engine.config)  # the core in its own process, async scheduling or not
        await eng.start()
        streams = [eng.generate(f"s{i}", p, GREEDY, time.monotonic()) for i, p in enumerate(prompts[:4])]
        results = await asyncio.gather(*(collect(s) for s in streams))
        stats = eng.stats()
        await eng.shutdown()
        return results, stats, eng.healthy

    results, stats, healthy_after = asyncio.run(main())
    for (outs, text, ids), ref in zip(results, offline):
        assert ids == ref.token_ids and text == ref.text
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert all(len(o.new_token_ids) == 1 for o in outs)  # one output per step
        last = outs[-1]
        assert last.finish_reason == "length" and last.num_output_tokens == GREEDY.max_tokens
        t = last.times
        assert t.arrival <= t.queued <= t.scheduled <= t.first_token <= t.last_token <= t.finished
    assert stats.healthy and stats.num_running == 0 and stats.kv_cache_usage == 0.0
    assert not healthy_after


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async-scheduling"])
def test_async_cancellation_frees_blocks(tiny_llm_dir, prompts, async_scheduling):
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)

    async def main():
        eng = AsyncLLMEngine(engine_config(tiny_llm_dir, async_scheduling=async_scheduling))
        await eng.start()
        got = []

        async def consume(i):
            async for out in eng.generate(f"c{i}", prompts[i], long, time.monotonic()):
                got.append(out)

        tasks = [asyncio.create_task(consume(i)) for i in range(3)]
        while len(got) < 6:
            await asyncio.sleep(0.005)
        running = eng.stats()
        tasks[0].cancel()  # cancelled while waiting for output (client disconnect)
        stream = eng.generate("c-closed", prompts[3], long, time.monotonic())
        await stream.__anext__()
        await stream.aclose()  # or closed explicitly
        tasks[1].cancel()
        tasks[2].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(200):  # aborts land after the step in progress
            if eng.stats().num_running == 0:
                break
            await asyncio.sleep(0.01)
        after = eng.stats()
        await eng.shutdown()
        return running, after, got

    running, after, got = asyncio.run(main())
    assert running.kv_cache_usage > 0 and running.num_running >= 1
    assert after.num_running == after.num_waiting == 0 and after.kv_cache_usage == 0.0
    assert not any(o.finished for o in got)


def test_async_errors_are_raised_at_call_time(tiny_llm_dir, prompts):
    async def main():
        eng = AsyncLLMEngine(engine_config(tiny_llm_dir, max_queued_requests=2))
        await eng.start()
        with pytest.raises(ValueError, match="maximum context length"):
            eng.generate("big", prompts[0], SamplingParams(max_tokens=1000), time.monotonic())
        # without an await in between, the core cannot have taken them: both count as waiting
        eng.generate("q0", prompts[0], GREEDY, time.monotonic())
        eng.generate("q1", prompts[0], GREEDY, time.monotonic())
        with pytest.raises(QueueFullError):
            eng.generate("q2", prompts[0], GREEDY, time.monotonic())
        await eng.shutdown(drain_timeout=0)

    asyncio.run(main())


def test_async_engine_death(tiny_llm_dir, prompts, crash_core_at_step):
    crash_core_at_step(1)

    async def main():
        eng = AsyncLLMEngine(engine_config(tiny_llm_dir))
        await eng.start()
        outs, _, _ = await collect(eng.generate("d0", prompts[0], GREEDY, time.monotonic()))
        with pytest.raises(EngineDeadError):
            eng.generate("d1", prompts[0], GREEDY, time.monotonic())
        healthy = eng.stats().healthy
        await eng.shutdown()
        return outs, healthy

    outs, healthy = asyncio.run(main())
    assert len(outs) == 1 and outs[0].finished and outs[0].finish_reason == "error"
    assert "simulated device failure" in outs[0].error
    assert not healthy


def test_async_shutdown_drains_or_aborts(tiny_llm_dir, prompts):
    async def run(drain_timeout):
        eng = AsyncLLMEngine(engine_config(tiny_llm_dir))
        await eng.start()
        tasks = [asyncio.create_task(collect(eng.generate(f"x{i}", p, GREEDY, time.monotonic())))
                 for i, p in enumerate(prompts[:3])]
        await asyncio.sleep(0)
        await eng.shutdown(drain_timeout=drain_timeout)
        with pytest.raises(EngineDeadError, match="shutting down"):
            eng.generate("late", prompts[0], GREEDY, time.monotonic())
        return [(await t)[0][-1].finish_reason for t in tasks]

    assert asyncio.run(run(None)) == ["length"] * 3
    assert asyncio.run(run(0)) == ["abort"] * 3
