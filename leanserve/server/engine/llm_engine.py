"""The synchronous engine for offline use: the engine core and the output processor in one
process; requests in, one scheduled model step at a time, deltas out.

Tests and offline benchmarks drive it directly (`generate()`, or add_request/step); the server
runs the core in its own process instead (async_engine.py).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from leanserve.models.model_dir import load_tokenizer
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.core import EngineCore
from leanserve.server.engine.output_processor import OutputProcessor
from leanserve.server.engine.outputs import EngineStats, RequestOutput, TokenLogprob
from leanserve.server.engine.sampling_params import SamplingParams

__all__ = ["EngineStats", "GenerationResult", "LLMEngine"]


@dataclass(slots=True)
class GenerationResult:
    """One finished request of `LLMEngine.generate`."""
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    stop_reason: str | int | None
    num_cached_tokens: int
    logprobs: list[TokenLogprob] | None


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.core = EngineCore(config)
        self.tokenizer = load_tokenizer(config.model)
        self.processor = OutputProcessor(self.tokenizer)
        # the core's parts, for tests and benchmarks that look inside
        self.model_runner, self.scheduler, self.block_manager = (self.core.model_runner, self.core.scheduler,
                                                                 self.core.block_manager)
        self.max_model_len, self.vocab_size, self.eos_token_ids = (self.core.max_model_len, self.core.vocab_size,
                                                                   self.core.eos_token_ids)
        self._generate_ids = itertools.count()

    def close(self) -> None:
        """Stop the tensor-parallel worker processes, if any (a one-process engine needs no close)."""
        self.core.close()

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, *, check_queue: bool = True, validated: bool = False) -> None:
        """EngineCore.add_request; the same errors."""
        self.core.add_request(request_id, prompt_token_ids, params, arrival_time, check_queue=check_queue,
                              validated=validated)
        self.processor.add_request(request_id, prompt_token_ids, params)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Drop a request and free its blocks; returns its final output (None if unknown/finished)."""
        core_out = self.core.abort(request_id)
        outputs, _ = self.processor.process([core_out] if core_out is not None else [])
        return outputs[0] if outputs else None

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def stats(self, healthy: bool = True) -> EngineStats:
        return self.core.stats(healthy)

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and return one output per request that got a token."""
        outputs, stopped = self.processor.process(self.core.step())
        for request_id in stopped:  # a stop string ended it: free its blocks now
            self.core.abort(request_id)
        return outputs

    # ---- offline ----------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[GenerationResult]:
        """Run `prompts` to completion (all admitted at once) and return results in prompt order.
        For tests and benchmarks; do not mix with requests added through add_request."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        ids = [f"generate-{next(self._generate_ids)}" for _ in prompts]
        results = {rid: GenerationResult(rid, list(p), [], "", None, None, 0, None if sp.logprobs is None else [])
                   for rid, p, sp in zip(ids, prompts, params_list)}
        for rid, prompt, sp in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, sp, check_queue=False)
        while self.has_unfinished():
            for out in self.step():
                res = results[out.request_id]
                res.token_ids += out.new_token_ids
                res.text += out.new_text
                if out.logprobs:
                    res.logprobs += out.logprobs
                if out.finished:
                    res.finish_reason, res.stop_reason = out.finish_reason, out.stop_reason
                    res.num_cached_tokens = out.num_cached_tokens
        return [results[rid] for rid in ids]
