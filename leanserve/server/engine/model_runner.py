"""Owns the model, the paged KV cache, the running sequences' block tables (block_table.py) and the
sampler; turns a scheduled step into tensors, runs the forward and samples one token for every
sequence whose prompt is fully computed. On CUDA, pure-decode steps replay CUDA graphs
(cuda_graph.py) unless enforce_eager is set.

Tensor parallel (tensor_parallel_size N > 1): a ModelRunner runs in every rank's process over
that rank's shards. Rank 0's (the engine core's) starts the others (tp_workers.py) and, before each
operation that runs the model (profile, KV-cache allocation with its graph captures, a step),
sends it to them, so all ranks run the same forwards and their collectives pair up. A step
travels as its host inputs (StepInputs: token ids, positions, slots, block-table rows and the
entries the tables gained), so the ids rank 0 sampled reach the other ranks as the next step's
input ids. Only rank 0 samples and keeps the block-table bookkeeping."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from leanserve.errors import UserError
from leanserve.models.attention.kv_spec import KVCache
from leanserve.models.attention.metadata import AttentionMetadata
from leanserve.models.loader import checkpoint_dtype, load_model
from leanserve.models.tensor_parallel import (
    join_process_group,
    leave_process_group,
    min_over_ranks,
    set_tensor_parallel,
)
from leanserve.runtime import keep_freed_host_memory, resolve_device, resolve_dtype
from leanserve.server.engine import tp_workers
from leanserve.server.engine.block_table import PersistentBlockTable
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.cuda_graph import (
    CUDAGraphRunner,
    DecodeInputs,
    check_batch_sizes,
    default_batch_sizes,
)
from leanserve.server.engine.sampler import PendingSample, Sampler, SamplerOutput, to_device
from leanserve.server.engine.sampling_params import SamplingParams
from leanserve.server.engine.sequence import PLACEHOLDER, Sequence

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EagerInputs:
    """Host inputs of a step run eagerly (any mix of prefill chunks and decodes), flattened."""
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    variants: list[int]          # per token; empty for a one-variant model
    query_start_loc: list[int]
    seq_lens: list[int]
    planned_lens: list[int]  # each sequence's prompt + max_tokens (AttentionMetadata.planned_lens)
    rows: list[int]          # each sequence's row of the persistent block table
    table_width: int         # the widest sequence's table: the columns the step reads


@dataclass(slots=True)
class StepInputs:
    """What every rank runs one step on: eager inputs, or the decode inputs of a graph replay."""
    eager: EagerInputs | None
    decode: DecodeInputs | None
    sample_rows: list[int]       # rows of the step's hidden states that yield a token
    sample_variants: list[int]   # the variant of each sampled row's sequence
    table_update: np.ndarray     # PersistentBlockTable.assign's update, written by every rank first


def step_to_wire(step: StepInputs) -> list:
    def fields(x):
        return None if x is None else [getattr(x, f.name) for f in dataclasses.fields(x)]
    return [fields(step.eager), fields(step.decode), step.sample_rows, step.sample_variants,
            step.table_update.tobytes()]


def step_from_wire(values: list) -> StepInputs:
    eager, decode, sample_rows, sample_variants, table_update = values
    return StepInputs(None if eager is None else EagerInputs(*eager), None if decode is None else DecodeInputs(*decode),
                      sample_rows, sample_variants, np.frombuffer(table_update, dtype=np.int64).copy())


class ModelRunner:
    def __init__(self, config: EngineConfig, *, rank: int = 0, store: dist.Store | None = None,
                 on_loaded: Callable[[], None] | None = None):
        """Rank 0 (the default) with tensor_parallel_size > 1 starts ranks 1..N-1 itself; a worker
        passes its rank, the store rank 0 serves, and `on_loaded` (called between loading its
        shards and joining the process group: see tp_workers.py)."""
        self.config = config
        self.rank, self.tp_size = rank, config.tensor_parallel_size
        if self.tp_size > 1 and config.device not in ("auto", "cuda", "cpu"):
            raise UserError(f"--device {config.device} names one device, but --tensor-parallel-size {self.tp_size} "
                            f"puts rank r on GPU r: use auto, cuda or cpu (CUDA_VISIBLE_DEVICES picks the GPUs)")
        self.device = resolve_device(config.device, local_rank=rank if self.tp_size > 1 else None)
        if self.device.type == "cuda" and self.tp_size > 1:
            if self.tp_size > torch.cuda.device_count():
                raise UserError(f"--tensor-parallel-size {self.tp_size} needs {self.tp_size} GPUs; "
                                f"{torch.cuda.device_count()} are visible")
            torch.cuda.set_device(self.device)
        if self.device.type == "cpu":
            keep_freed_host_memory()
        self.dtype = resolve_dtype(config.dtype, self.device, checkpoint=checkpoint_dtype(config.model))
        self.block_size = config.block_size
        if config.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"load_format must be 'safetensors' or 'dummy', got {config.load_format!r}")
        self.graph_batch_sizes = (default_batch_sizes(config.max_num_seqs) if config.cuda_graph_batch_sizes is None
                                  else check_batch_sizes(config.cuda_graph_batch_sizes, config.max_num_seqs))
        # ranks 1..N-1 load their shards while this one loads its own
        self.workers = tp_workers.TPWorkers(config) if rank == 0 and self.tp_size > 1 else None
        try:
            self._load(store if self.workers is None else self.workers.store, on_loaded)
        except BaseException:
            self.close(timeout=0)  # the workers may still be importing: a SHUTDOWN would wait for that
            raise
        self.vocab_size = self.model.vocab_size
        # a model with several weight sets behind it (num_variants > 1) runs each sequence through
        # the one drawn for it (Sequence.variant): it gets the step's per-token variant ids in
        # AttentionMetadata.variants and each sampled row's in compute_logits(hidden, variants)
        self.num_variants = getattr(self.model, "num_variants", 1)
        # LLMEngine's rule; graphs are captured for contexts up to this length
        self.max_model_len = config.max_model_len or self.hf_config.max_position_embeddings
        # the model says how its KV cache is laid out; sizing and allocation go through it
        self.kv_spec = self.model.kv_cache_spec(self.block_size, self.dtype)
        # one row per running sequence, as wide as a max_model_len sequence's table
        self.block_table = PersistentBlockTable(config.max_num_seqs, self.kv_spec.block_table_width(self.max_model_len),
                                                self.device)
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))
        self.kv_caches: list[KVCache] = []
        self.graph_runner: CUDAGraphRunner | None = None

    def _load(self, store: dist.Store | None, on_loaded: Callable[[], None] | None) -> None:
        """This rank's shards of the model; then, tensor parallel, the process group, which forms
        only once every rank has loaded (a load error is raised, not a hang in a rendezvous)."""
        set_tensor_parallel(self.rank, self.tp_size)
        self.model, self.hf_config = load_model(self.config.model, self.device, self.dtype,
                                                random_weights=self.config.load_format == "dummy",
                                                settings_overrides=self.config.model_settings)
        if self.tp_size == 1:
            return
        if self.workers is not None:
            self.workers.wait_ready()
        if on_loaded is not None:
            on_loaded()
        join_process_group(store, self.device)

    def close(self, timeout: float = tp_workers.EXIT_TIMEOUT_S) -> None:
        """Stop the other tensor-parallel ranks (rank 0: killed if not gone in `timeout` seconds)
        and leave the process group."""
        if self.workers is not None:
            self.workers.close(timeout)
            self.workers = None
        if self.tp_size > 1:
            leave_process_group()

    def _send(self, message) -> None:
        """Rank 0: the other ranks run `message` next, as rank 0 does."""
        if self.workers is not None:
            self.workers.send(message)

    def profile_num_blocks(self, max_model_len: int) -> int:
        """How many KV blocks fit: CPU from cpu_kv_cache_gib; CUDA from what a max-size step
        leaves of total * gpu_memory_utilization (weights, peak activations, other processes).
        Tensor parallel: what fits on every rank (each holds its KV heads of every block)."""
        self._send((tp_workers.PROFILE, max_model_len))
        return min_over_ranks(self._profile_num_blocks(max_model_len), self.device)

    def _profile_num_blocks(self, max_model_len: int) -> int:
        if self.device.type != "cuda":
            return int(self.config.cpu_kv_cache_gib * 2**30 // self.kv_spec.bytes_per_block)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._dummy_run(max_model_len)
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        # memory outside torch's allocator (CUDA context, other processes) + torch's peak
        used = (total - free) - torch.cuda.memory_reserved(self.device) + torch.cuda.max_memory_allocated(self.device)
        self.kv_caches = []
        torch.cuda.empty_cache()
        available = total * self.config.gpu_memory_utilization - used
        logger.info("memory profile: total %.2f GiB, used at peak %.2f GiB, for KV cache %.2f GiB",
                    total / 2**30, used / 2**30, available / 2**30)
        return max(int(available // self.kv_spec.bytes_per_block), 0)

    @torch.inference_mode()
    def _dummy_run(self, max_model_len: int) -> None:
        """One prefill step of max_num_batched_tokens tokens (as few sequences as max_model_len
        allows), then logits for max_num_seqs rows: the largest activations a step can have."""
        c, spec = self.config, self.kv_spec
        total = c.max_num_batched_tokens
        lens = [min(max_model_len, total - i) for i in range(0, total, max_model_len)][:c.max_num_seqs]
        seqs, next_block = [], 0
        for n in lens:
            # n - 1 prompt tokens and one generated, all computed now: planned for n <= max_model_len tokens
            seq = Sequence("profile", [0] * (n - 1), SamplingParams(temperature=0, max_tokens=1), 0.0, [])
            seq.append_token(0)
            seq.block_table = list(range(next_block, next_block + spec.blocks_at_admission(n, seq.planned_len)))
            next_block += len(seq.block_table)
            seqs.append((seq, n))
        self.kv_caches = self.kv_spec.allocate(next_block, self.device)
        try:  # every rank profiles by itself: its own rows, assigned and written here
            input_ids, positions, meta = self._tensors(self._eager_inputs(seqs, self.block_table.rows([s for s, _ in seqs])))
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
        finally:
            self.block_table.release([seq for seq, _ in seqs])
        rows = torch.arange(c.max_num_seqs, device=self.device) % hidden.shape[0]
        self._compute_logits(hidden[rows], [0] * c.max_num_seqs).softmax(-1)

    @torch.inference_mode()
    def sequence_logprobs(self, token_ids: list[int], start: int) -> torch.Tensor:
        """[len - start] float32: the log-probability of each of token_ids[start:] given the tokens
        before it, from one prefill step of the whole sequence (planned for exactly its length)
        through the served attention, into a scratch cache and block table of its own: the serving
        cache and the running sequences are untouched. For offline evals (response-masked
        perplexity); one process only; a model with several variants is scored through variant 0."""
        if self.tp_size > 1:
            raise UserError("scoring sequences runs in one process; tensor_parallel_size must be 1")
        n = len(token_ids)
        if not 0 < start < n or n > self.max_model_len:
            raise ValueError(f"need 0 < start < len(token_ids) <= max_model_len ({self.max_model_len}); "
                             f"got start {start} of {n} tokens")
        # n - 1 prompt tokens and one generated, all computed now: planned for n tokens (as _dummy_run)
        seq = Sequence("score", token_ids[:-1], SamplingParams(temperature=0, max_tokens=1), 0.0, [])
        seq.append_token(token_ids[-1])
        seq.block_table = list(range(self.kv_spec.blocks_at_admission(n, seq.planned_len)))
        caches = self.kv_spec.allocate(len(seq.block_table), self.device)
        table = PersistentBlockTable(1, len(seq.block_table), self.device)
        input_ids, positions, meta = self._tensors(self._eager_inputs([(seq, n)], table.rows([seq])), table)
        hidden = self.model(input_ids, positions, caches, meta)
        logits = self._compute_logits(hidden[start - 1:n - 1], [0] * (n - start)).float()
        targets = torch.tensor(token_ids[start:], device=logits.device)
        return logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The serving KV cache; on CUDA, then the decode graphs (they bake in its addresses)."""
        self._send((tp_workers.ALLOCATE, num_blocks))
        self.graph_runner = None
        self.kv_caches = self.kv_spec.allocate(num_blocks, self.device)
        if self.device.type != "cuda" or self.config.enforce_eager:
            return
        if not self.kv_spec.graphs_capturable():
            logger.warning("CUDA graphs off: this model's decode attention has no capturable kernel for %s", self.kv_spec)
            return
        runner = CUDAGraphRunner(self.model, self.kv_caches, self.block_table, self.graph_batch_sizes,
                                 self.max_model_len, self.kv_spec, self.device)
        try:
            runner.capture()
        except RuntimeError as e:
            raise RuntimeError(f"CUDA graph capture failed ({e}); run with enforce_eager=True (--enforce-eager)") from e
        self.graph_runner = runner

    def _eager_inputs(self, scheduled: list[tuple[Sequence, int]], rows: list[int]) -> EagerInputs:
        inputs = EagerInputs([], [], [], [], [0], [], [], rows, max(len(seq.block_table) for seq, _ in scheduled))
        for seq, n in scheduled:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            inputs.input_ids += seq.token_ids[start:end]
            inputs.positions += range(start, end)
            inputs.slot_mapping += self.kv_spec.slots(seq.block_table, start, end)
            if self.num_variants > 1:
                inputs.variants += [seq.variant] * n
            inputs.query_start_loc.append(inputs.query_start_loc[-1] + n)
            inputs.seq_lens.append(end)
            inputs.planned_lens.append(seq.planned_len)
        return inputs

    @staticmethod
    def _sample_rows(scheduled: list[tuple[Sequence, int]]) -> list[int]:
        """The step's rows (flattened tokens) whose sequences finish their prompt (or recompute)
        there, and so yield the next token: each such sequence's last new token."""
        rows, end = [], 0
        for seq, n in scheduled:
            end += n
            if seq.num_computed_tokens + n == seq.num_tokens:
                rows.append(end - 1)
        return rows

    def _tensors(self, inputs: EagerInputs, table: PersistentBlockTable | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's device tensors; its rows index `table` (default: the running sequences')."""
        table = self.block_table if table is None else table
        qsl, seq_lens = inputs.query_start_loc, inputs.seq_lens
        num_seqs, num_tokens = len(seq_lens), len(inputs.input_ids)
        # one copy per dtype, each array a contiguous view of it: every copy is a launch
        ids = to_device(inputs.input_ids + inputs.positions + inputs.slot_mapping + inputs.variants, torch.int64,
                        self.device).view(-1, num_tokens)
        ints = to_device(qsl + seq_lens + inputs.planned_lens + inputs.rows, torch.int32, self.device)
        meta = AttentionMetadata(
            slot_mapping=ids[2],
            query_start_loc=ints[:num_seqs + 1],
            seq_lens=ints[num_seqs + 1:2 * num_seqs + 1],
            planned_lens=ints[2 * num_seqs + 1:3 * num_seqs + 1],
            # the step's rows of the persistent table, as wide as its widest sequence's
            block_tables=table.table[:, :inputs.table_width].index_select(0, ints[3 * num_seqs + 1:]),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_seq_len=max(seq_lens),
            block_size=self.block_size,
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )
        if inputs.variants:
            meta.variants, meta.variants_cpu = ids[3], inputs.variants
        self.kv_spec.prepare_step(meta, self.device)
        return ids[0], ids[1], meta

    def _prepare_decode(self, scheduled: list[tuple[Sequence, int]], rows: list[int]) -> DecodeInputs:
        """Host inputs of a step where every sequence computes one token (_eager_inputs' n = 1 case)."""
        inputs = DecodeInputs([], [], [], [], rows, [], [] if self.num_variants > 1 else None)
        for seq, _ in scheduled:
            pos = seq.num_computed_tokens
            inputs.input_ids.append(seq.token_ids[pos])
            inputs.positions.append(pos)
            inputs.slot_mapping.append(self.kv_spec.slot(seq.block_table, pos))
            inputs.seq_lens.append(pos + 1)
            inputs.planned_lens.append(seq.planned_len)
            if inputs.variants is not None:
                inputs.variants.append(seq.variant)
        return inputs

    def _compute_logits(self, hidden: torch.Tensor, variants: list[int]) -> torch.Tensor:
        """Logits of the rows of `hidden`; variants: each row's sequence's variant."""
        if self.num_variants == 1:
            return self.model.compute_logits(hidden)
        return self.model.compute_logits(hidden, variants)

    def release(self, seqs: list[Sequence]) -> None:
        """Sequences whose blocks were freed (SchedulerOutput.freed) give back their block-table rows."""
        self.block_table.release(seqs)

    def _placeholder_inputs(self, scheduled: list[tuple[Sequence, int]],
                            prev: tuple[torch.Tensor, dict[Sequence, int]]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Async scheduling: the step's tokens the host has not read yet (a decode's last sampled token,
        PLACEHOLDER on the host) as (their indices among the step's tokens, their ids from the previous
        step's samples on the device: prev = (those samples, each pending sequence's row in them))."""
        sampled, rows = prev
        dst, src, start = [], [], 0
        for seq, n in scheduled:
            if seq.token_ids[seq.num_computed_tokens] == PLACEHOLDER:
                dst.append(start)
                src.append(rows[seq])
            start += n
        if not dst:
            return None
        return (to_device(dst, torch.int64, self.device),
                sampled.index_select(0, to_device(src, torch.int64, self.device)))

    @torch.inference_mode()
    def execute_model(self, scheduled: list[tuple[Sequence, int]], *, sync: bool = True,
                      prev: tuple[torch.Tensor, dict[Sequence, int]] | None = None
                      ) -> tuple[list[Sequence], SamplerOutput | PendingSample | None]:
        """Run one step; returns the sequences that sample (batch order) and their samples: read back
        (sync), else still being copied (PendingSample). prev: the previous step's samples still on the
        device and each of its sequences' row in them (async scheduling, one process only)."""
        sampling = [seq for seq, n in scheduled if seq.num_computed_tokens + n == seq.num_tokens]
        rows, table_update = self.block_table.assign([seq for seq, _ in scheduled])
        pure_decode = self.graph_runner is not None and all(n == 1 for _, n in scheduled)
        decode = self._prepare_decode(scheduled, rows) if pure_decode else None
        if decode is None or not self.graph_runner.can_run(decode):
            decode = None
        step = StepInputs(self._eager_inputs(scheduled, rows) if decode is None else None, decode,
                          self._sample_rows(scheduled), [seq.variant for seq in sampling], table_update)
        pending = None if prev is None else self._placeholder_inputs(scheduled, prev)
        if pending is not None and self.tp_size > 1:
            raise RuntimeError("async scheduling runs in one process: other ranks read input ids from the host")
        try:
            self._send((tp_workers.STEP, step_to_wire(step)))
            logits = self.run_step(step, pending)
        except Exception:
            if self.workers is not None:  # a collective failed: name the rank that died, if one did
                self.workers.check_alive(grace=2.0)
            raise
        if logits is None:
            return [], None
        return sampling, self.sampler(logits, sampling, sync)

    @torch.inference_mode()
    def run_step(self, step: StepInputs, pending: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> torch.Tensor | None:
        """The forward of one step (every rank): the logits of its sampled rows, None if none samples.
        pending: (token indices, ids) written over the host's input ids on the device first."""
        self.block_table.write(step.table_update)
        graphed_logits = False
        if step.decode is not None:
            out = self.graph_runner.run(step.decode, pending)
            graphed_logits = self.graph_runner.with_logits
        else:
            input_ids, positions, meta = self._tensors(step.eager)
            if pending is not None:
                input_ids.index_copy_(0, *pending)
            out = self.model(input_ids, positions, self.kv_caches, meta)
        if not step.sample_rows:
            return None
        if len(step.sample_rows) < out.shape[0]:  # else every row samples, in order: no gather
            out = out[to_device(step.sample_rows, torch.int64, self.device)]
        return out if graphed_logits else self._compute_logits(out, step.sample_variants)
