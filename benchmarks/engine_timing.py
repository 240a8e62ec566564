"""Decode-throughput timing of the leanserve engine and of transformers `generate`, shared by the
CPU and GPU benchmarks."""
from __future__ import annotations

import time
from collections.abc import Callable

from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.sampling_params import SamplingParams


def sync(engine: LLMEngine) -> None:
    if engine.model_runner.device.type == "cuda":
        import torch
        torch.cuda.synchronize()


def time_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int,
                on_decode: Callable[[LLMEngine], None] | None = None) -> dict:
    """Admit all prompts at once, step to completion. The decode rate counts only full-batch steps:
    from the step after the last sequence's first token (prefill cost is reported separately, as
    TTFT) through the step in which the first sequence finishes. Prompts that take several steps to
    prefill (more prompt tokens than a step's budget) let the first sequences decode, and finish,
    while the last ones prefill; counting the steps after that at a shrinking batch would report a
    rate at no batch in particular (MoA's benchmark at 16k context did: 1.62x dense, where its
    full-batch steps run 1.9x). Callers give max_tokens room (decode steps + prefill steps); a
    sequence that finishes before the window opens is a ValueError (unless max_tokens is 1: no decode).
    on_decode(engine), if given, runs once when every sequence decodes, between the prefill and the
    decode spans (a profiler stepping the engine: its steps count in wall_s only)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", p, params, check_queue=False)
    sync(engine)
    t0 = time.perf_counter()
    produced, started, finished_early = 0, set(), False
    t_prefilled = t_all_started = t_first_finish = None
    decode_tokens, decode_steps = 0, 0
    while engine.has_unfinished():
        outs = engine.step()
        produced += sum(len(out.new_token_ids) for out in outs)
        if t_all_started is None:
            finished_early |= any(out.finished for out in outs)
        elif t_first_finish is None:
            decode_tokens += sum(len(out.new_token_ids) for out in outs)
            decode_steps += 1
            if any(out.finished for out in outs):
                sync(engine)
                t_first_finish = time.perf_counter()
        started.update(out.request_id for out in outs)
        if t_all_started is None and len(started) == len(prompts):
            sync(engine)
            t_prefilled = time.perf_counter()
            if on_decode is not None:
                on_decode(engine)
            if max_tokens > 1 and (finished_early or engine.stats().num_running < len(prompts)):
                raise ValueError(f"a sequence finished before all {len(prompts)} decoded together: max_tokens "
                                 f"{max_tokens} leaves no full-batch window (add the prefill steps)")
            sync(engine)
            t_all_started = time.perf_counter()
    sync(engine)
    t1 = time.perf_counter()
    return {"batch": len(prompts), "prompt_len": len(prompts[0]), "max_tokens": max_tokens,
            "output_tokens": produced, "wall_s": t1 - t0, "tok_s": produced / (t1 - t0),
            "prefill_s": t_prefilled - t0, "decode_steps": decode_steps,
            # no decode step (max_tokens 1): no rate
            "decode_tok_s": decode_tokens / (t_first_finish - t_all_started) if decode_steps else 0.0}


def time_generate(model, prompts: list[list[int]], max_tokens: int) -> dict:
    """transformers `generate` (greedy, exactly max_tokens new tokens) on equal-length prompts, the
    same dict as time_engine's; prefill_s is a 1-token generate, the decode rate the rest."""
    import torch
    device = model.device
    ids = torch.tensor(prompts, device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run(4)  # warm-up
    prefill_s, total_s = run(1), run(max_tokens)
    return {"batch": len(prompts), "prompt_len": len(prompts[0]), "max_tokens": max_tokens,
            "output_tokens": len(prompts) * max_tokens, "wall_s": total_s, "tok_s": len(prompts) * max_tokens / total_s,
            "prefill_s": prefill_s, "decode_tok_s": len(prompts) * (max_tokens - 1) / (total_s - prefill_s)}


def profile_steps(engine: LLMEngine, steps: int, top: int = 25) -> dict:
    """Step the engine `steps` times under torch.profiler: wall ms per step, busy ms per step (on CUDA
    the kernels and copies, graph replays included, summed; on CPU the ops' self time) and the `top`
    kernels (ops) by time per step. Busy well under wall is an idle GPU between kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.model_runner.device.type == "cuda"
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(engine)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync(engine)
        wall = time.perf_counter() - t0

    def self_us(e) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    # one device's events only: a CPU op also carries its kernels' device time, which would count twice
    events = sorted((e for e in prof.key_averages() if e.device_type == kind), key=self_us, reverse=True)
    busy_us = sum(self_us(e) for e in events)
    return {"steps": steps, "wall_ms_per_step": wall / steps * 1e3, "busy_ms_per_step": busy_us / steps / 1e3,
            "top": [{"name": e.key[:160], "ms_per_step": self_us(e) / steps / 1e3, "calls_per_step": e.count / steps}
                    for e in events[:top]]}
