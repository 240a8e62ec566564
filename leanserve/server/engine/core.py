"""The engine core: scheduler, KV blocks and model runner; token ids in, token ids out.

It knows nothing of text: detokenization and stop strings live in the OutputProcessor, which
runs next to it offline (LLMEngine) and in the API process when the core runs in its own process
(core_proc.py, vLLM V1's EngineCore). A stop string found there aborts the request here.

Every sampled token enters its sequence as a PLACEHOLDER when its step is launched and gets its id
when the step's samples are read back. Synchronously that is at once. With async scheduling
(EngineConfig.async_scheduling) the next step is scheduled and launched first, its decodes reading
those ids on the device, so the host's work of both steps overlaps the GPU's: a step returns the
previous step's outputs. The cost is one token computed and dropped for a sequence that stopped on a
sampled stop token; requests with repetition, frequency or presence penalties (which read every past
token) make their steps synchronous.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from leanserve.errors import UserError
from leanserve.models.model_dir import load_tokenizer
from leanserve.runtime import resolve_device
from leanserve.server.engine.block_manager import new_block_manager
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.model_runner import ModelRunner
from leanserve.server.engine.outputs import CoreOutput, EngineStats
from leanserve.server.engine.sampler import PendingSample, SamplerOutput
from leanserve.server.engine.sampling_params import SamplingParams
from leanserve.server.engine.scheduler import Scheduler
from leanserve.server.engine.sequence import PLACEHOLDER, Sequence
from leanserve.server.engine.validation import validate_request

logger = logging.getLogger(__name__)


def eos_token_ids(model_dir: str, hf_config, tokenizer) -> list[int]:
    """generation_config.json's eos_token_id (int or list; config.json's if there is none) plus
    the tokenizer's: chat models end turns with a token other than the tokenizer's eos."""
    gen_file = Path(model_dir) / "generation_config.json"
    eos = json.loads(gen_file.read_text()).get("eos_token_id") if gen_file.is_file() else hf_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def default_batched_tokens(device: str) -> int:
    """The step token budget when none is given: 2048 on CUDA; 512 on CPU, where (zoo/chat-tiny, 64
    streams, BENCHMARKS.md) it cut ITL p99 from ~0.4 s to ~0.13 s and TTFT p50 from ~0.8 s to ~0.26 s
    without losing throughput."""
    return 2048 if resolve_device(device).type == "cuda" else 512


@dataclass(slots=True)
class LaunchedStep:
    """A step whose samples the host has not processed: each sampling sequence and the index of its
    PLACEHOLDER token."""
    seqs: list[Sequence]
    positions: list[int]
    sampled: SamplerOutput | PendingSample | None
    reads_history: bool  # a sequence's sampling reads its past tokens (penalties)

    def resolve(self) -> SamplerOutput | None:
        return self.sampled.resolve() if isinstance(self.sampled, PendingSample) else self.sampled


def reads_history(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


class EngineCore:
    def __init__(self, config: EngineConfig):
        if config.max_num_batched_tokens is None:
            config = replace(config, max_num_batched_tokens=default_batched_tokens(config.device))
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_queued_requests",
                     "tensor_parallel_size", "max_prefill_tokens_with_decodes"):
            if getattr(config, name) is not None and getattr(config, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(config, name)}")
        if config.async_scheduling and config.tensor_parallel_size > 1:
            raise UserError("async scheduling runs in one process; tensor_parallel_size must be 1")
        self.config = config
        self._launched: LaunchedStep | None = None  # async scheduling: the step whose samples are unread
        self.model_runner = ModelRunner(config)
        try:
            self._setup(config)
        except BaseException:
            self.close()
            raise

    def _setup(self, config: EngineConfig) -> None:
        """Everything after loading: limits, the KV cache (sized, allocated), the scheduler."""
        hf_config = self.model_runner.hf_config
        max_pos = hf_config.max_position_embeddings
        self.max_model_len = config.max_model_len or max_pos
        if self.max_model_len > max_pos:
            raise UserError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings {max_pos}")
        self.vocab_size = self.model_runner.vocab_size
        self.eos_token_ids = eos_token_ids(config.model, hf_config, load_tokenizer(config.model))

        kv_spec = self.model_runner.kv_spec
        max_seq_blocks = kv_spec.blocks_for(self.max_model_len)  # what one full-length sequence holds
        num_blocks = config.num_kv_blocks
        if num_blocks is None:
            num_blocks = self.model_runner.profile_num_blocks(self.max_model_len)
            # A small model on a big GPU would get millions of blocks (seconds of Python setup,
            # GBs of host memory, the GPU taken from the image engine) that no schedule can use:
            # stop at max_num_seqs full-length sequences.
            usable = config.max_num_seqs * max_seq_blocks
            if num_blocks > usable:
                logger.info("KV cache: capping %d blocks to %d (max_num_seqs x max_model_len)", num_blocks, usable)
                num_blocks = usable
        if num_blocks < max_seq_blocks:
            raise UserError(
                f"the KV cache holds {num_blocks} blocks of {config.block_size} tokens, less than one "
                f"max_model_len={self.max_model_len} sequence ({max_seq_blocks} blocks); lower max_model_len or give "
                f"the cache more memory (gpu_memory_utilization / cpu_kv_cache_gib / num_kv_blocks)")
        self.model_runner.allocate_kv_cache(num_blocks)
        # in blocks, not tokens: a spec's block need not hold block_size tokens of every layer and head
        logger.info("KV cache: %d blocks (%.2f GiB); max concurrency at %d tokens: %.2fx", num_blocks,
                    num_blocks * kv_spec.bytes_per_block / 2**30, self.max_model_len, num_blocks / max_seq_blocks)

        prefix_caching = config.enable_prefix_caching and kv_spec.prefix_caching
        if config.enable_prefix_caching and not prefix_caching:
            logger.info("prefix caching off: this model's KV cache blocks are not shareable prefixes (%s)",
                        type(kv_spec).__name__)
        self.block_manager = new_block_manager(num_blocks, kv_spec, prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_queued_requests, config.max_prefill_tokens_with_decodes)
        self.requests: dict[str, Sequence] = {}

    def close(self) -> None:
        """Stop the tensor-parallel worker processes, if any (idempotent)."""
        self.model_runner.close()

    def worker_connections(self) -> list:
        """Objects that turn readable (multiprocessing.connection.wait) when a tensor-parallel
        worker process exits; then check_workers() raises. Empty for a one-process engine."""
        workers = self.model_runner.workers
        return workers.connections if workers is not None else []

    def check_workers(self) -> None:
        """A worker connection turned readable (workers send nothing once up): RuntimeError, naming
        the worker if it exited."""
        self.model_runner.workers.check_alive(grace=2.0)
        raise RuntimeError("a tensor-parallel worker closed its connection to rank 0")

    # ---- requests ---------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, *, check_queue: bool = True, validated: bool = False) -> None:
        """Queue a request; ValueError if its id is in use or it cannot run (validate_request, unless
        validated says the caller ran it), QueueFullError if the queue is at its bound (unless
        check_queue is False: offline runs, or a front end that enforced the bound itself)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not validated:
            validate_request(prompt_token_ids, params, self.vocab_size, self.max_model_len)
        now = time.monotonic()
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.model_runner.device).manual_seed(params.seed)
        seq = Sequence(request_id, prompt_token_ids, params, arrival_time if arrival_time is not None else now,
                       self.eos_token_ids, generator)
        if self.model_runner.num_variants > 1:
            seq.variant = self._draw_variant(generator)
        self.scheduler.add(seq, check_queue)
        seq.times.queued = now
        self.requests[request_id] = seq

    def _draw_variant(self, generator: torch.Generator | None) -> int:
        """A model with several weight sets behind it (num_variants) runs each sequence through one,
        drawn uniformly: from the request's own generator when it is seeded (reproducible, and each
        of n choices, seeded seed + i, draws its own), else the engine's."""
        gen = generator or self.model_runner.sampler.generator
        return int(torch.randint(self.model_runner.num_variants, (1,), generator=gen, device=gen.device))

    def abort(self, request_id: str) -> CoreOutput | None:
        """Drop a request and free its blocks; returns its final output (None if unknown/finished)."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        seq.finish_reason = "abort"
        seq.times.finished = time.monotonic()
        return self._output(seq, [], None)

    def has_unfinished(self) -> bool:
        """Whether a request is still waiting, running or owed its last token (a launched step whose
        sequences all ended meanwhile owes nothing: the next step() drops its samples)."""
        return self.scheduler.has_unfinished() or (
            self._launched is not None and not all(seq.is_finished for seq in self._launched.seqs))

    def stats(self, healthy: bool = True) -> EngineStats:
        bm = self.block_manager
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           kv_cache_usage=bm.usage, num_kv_blocks=bm.num_blocks, block_size=bm.block_size,
                           num_preemptions=self.scheduler.num_preemptions,
                           prefix_cache_queries=bm.prefix_cache_queries, prefix_cache_hits=bm.prefix_cache_hits,
                           healthy=healthy, enable_prefix_caching=bm.enable_prefix_caching)

    # ---- the step ---------------------------------------------------------------------------------

    def step(self) -> list[CoreOutput]:
        """Schedule, launch the model once, and return one output per request that got a token: this
        step's, or with async scheduling the previous step's."""
        outputs: list[CoreOutput] = []
        previous, self._launched = self._launched, None
        if previous is not None and previous.reads_history:  # their penalties must see the real tokens
            outputs, previous = self._finish(previous), None
        sched = self.scheduler.schedule()
        self.model_runner.release(sched.freed)
        if sched.scheduled:
            self._launched = self._launch(sched.scheduled, previous)
        elif previous is None and self.scheduler.has_unfinished():
            raise RuntimeError("the scheduler could not schedule any waiting request")
        if previous is not None:
            outputs += self._finish(previous)
        if not self.config.async_scheduling and self._launched is not None:
            outputs += self._finish(self._launched)
            self._launched = None
        return outputs

    def _launch(self, scheduled: list[tuple[Sequence, int]], previous: LaunchedStep | None) -> LaunchedStep:
        """Run the model on a scheduled step; every sequence that samples gets a PLACEHOLDER token."""
        prev = None
        if previous is not None and isinstance(previous.sampled, PendingSample):
            prev = (previous.sampled.ids, {seq: row for row, seq in enumerate(previous.seqs)})
        seqs, sampled = self.model_runner.execute_model(scheduled, sync=not self.config.async_scheduling, prev=prev)
        for seq, n in scheduled:
            seq.num_computed_tokens += n
        positions = []
        for seq in seqs:
            positions.append(seq.num_tokens)
            seq.append_token(PLACEHOLDER)
            seq.num_pending_tokens += 1
            # a sequence that ends by length with this token is not scheduled again (known before its id)
            seq.awaiting_final = (seq.num_output_tokens >= seq.params.max_tokens
                                  or seq.num_tokens >= self.max_model_len)
        return LaunchedStep(seqs, positions, sampled, any(reads_history(seq.params) for seq in seqs))

    def _finish(self, step: LaunchedStep) -> list[CoreOutput]:
        """Read a launched step's samples and give each still unfinished sequence its token."""
        sampled = step.resolve()
        now = time.monotonic()
        outputs = []
        for row, (seq, pos) in enumerate(zip(step.seqs, step.positions)):
            if seq.is_finished:  # ended or aborted while the step ran: the token is dropped
                continue
            seq.num_pending_tokens -= 1
            outputs.append(self._accept_token(row, seq, pos, sampled, now))
        return outputs

    def _accept_token(self, row: int, seq: Sequence, pos: int, sampled: SamplerOutput, now: float) -> CoreOutput:
        token = sampled.token_ids[row]
        params = seq.params
        seq.token_ids[pos] = token
        num_output = pos + 1 - seq.num_prompt_tokens
        first = seq.times.first_token is None
        if first:
            seq.times.first_token = now
        seq.times.last_token = now
        if num_output >= params.min_tokens and token in seq.eos_token_ids and not params.ignore_eos:
            seq.finish_reason = "stop"
        elif num_output >= params.min_tokens and token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif num_output >= params.max_tokens or pos + 1 >= self.max_model_len:
            seq.finish_reason = "length"
        logprobs = None
        if params.logprobs is not None:
            logprobs = [(token, sampled.logprobs[row], sampled.top_logprobs[row])]
        if seq.finish_reason is not None:
            del seq.token_ids[pos + 1:]  # a token launched after this one (async scheduling) is dropped
            seq.num_pending_tokens = 0
            self.scheduler.finish(seq)
            del self.requests[seq.request_id]
            seq.times.finished = now
        return self._output(seq, [token], logprobs, token_times=[now], with_times=first)

    @staticmethod
    def _output(seq: Sequence, new_token_ids: list[int], logprobs, token_times: list[float] | None = None,
                with_times: bool = False) -> CoreOutput:
        """The request's times travel with its first token and its end only (CoreOutput.times): copying
        them into every token's output was a third of the core's host work per step at batch 256."""
        times = copy.copy(seq.times) if with_times or seq.finish_reason is not None else None
        return CoreOutput(request_id=seq.request_id, new_token_ids=new_token_ids, finish_reason=seq.finish_reason,
                          stop_reason=seq.stop_reason, logprobs=logprobs, num_prompt_tokens=seq.num_prompt_tokens,
                          num_cached_tokens=seq.num_cached_tokens,
                          num_output_tokens=seq.num_output_tokens - seq.num_pending_tokens,
                          token_times=token_times or [], times=times)
