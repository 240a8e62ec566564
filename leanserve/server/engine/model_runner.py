"""Owns the model, the paged KV cache, the running sequences' block tables (block_table.py) and the
sampler; turns a scheduled step into tensors, runs the forward and samples one token for every
sequence whose prompt is fully computed. On CUDA, pure-decode steps replay CUDA graphs
(cuda_graph.py) unless enforce_eager is set."""
from __future__ import annotations

import logging

import torch

from leanserve.models.attention.kv_spec import KVCache
from leanserve.models.attention.metadata import AttentionMetadata
from leanserve.models.loader import load_model
from leanserve.runtime import resolve_device, resolve_dtype
from leanserve.server.engine.block_table import PersistentBlockTable
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.cuda_graph import (
    CUDAGraphRunner,
    DecodeInputs,
    check_batch_sizes,
    default_batch_sizes,
)
from leanserve.server.engine.sampler import Sampler, SamplerOutput, to_device
from leanserve.server.engine.sampling_params import SamplingParams
from leanserve.server.engine.sequence import Sequence

logger = logging.getLogger(__name__)

class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.block_size = config.block_size
        if config.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"load_format must be 'safetensors' or 'dummy', got {config.load_format!r}")
        self.graph_batch_sizes = (default_batch_sizes(config.max_num_seqs) if config.cuda_graph_batch_sizes is None
                                  else check_batch_sizes(config.cuda_graph_batch_sizes, config.max_num_seqs))
        self.model, self.hf_config = load_model(config.model, self.device, self.dtype,
                                                random_weights=config.load_format == "dummy",
                                                settings_overrides=config.model_settings)
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

    def profile_num_blocks(self, max_model_len: int) -> int:
        """How many KV blocks fit: CPU from cpu_kv_cache_gib; CUDA from what a max-size step
        leaves of total * gpu_memory_utilization (weights, peak activations, other processes)."""
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
        try:
            input_ids, positions, meta, _ = self._prepare(seqs)
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
        finally:
            self.block_table.release([seq for seq, _ in seqs])
        rows = torch.arange(c.max_num_seqs, device=self.device) % hidden.shape[0]
        self._compute_logits(hidden[rows], [0] * c.max_num_seqs).softmax(-1)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The serving KV cache; on CUDA, then the decode graphs (they bake in its addresses)."""
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

    def _prepare(self, scheduled: list[tuple[Sequence, int]]
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        variants: list[int] = []
        query_start_loc, seq_lens, planned_lens, sample_rows = [0], [], [], []
        for seq, n in scheduled:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += self.kv_spec.slots(seq.block_table, start, end)
            if self.num_variants > 1:
                variants += [seq.variant] * n
            query_start_loc.append(query_start_loc[-1] + n)
            seq_lens.append(end)
            planned_lens.append(seq.planned_len)
            if end == seq.num_tokens:  # prompt (or recompute) done: this row yields the next token
                sample_rows.append(query_start_loc[-1] - 1)
        rows = self.block_table.rows([seq for seq, _ in scheduled])
        width = max(len(seq.block_table) for seq, _ in scheduled)
        num_seqs, num_tokens = len(scheduled), len(input_ids)
        # one copy per dtype, each array a contiguous view of it: every copy is a launch
        ids = to_device(input_ids + positions + slots + variants, torch.int64, self.device).view(-1, num_tokens)
        ints = to_device(query_start_loc + seq_lens + planned_lens + rows, torch.int32, self.device)
        meta = AttentionMetadata(
            slot_mapping=ids[2],
            query_start_loc=ints[:num_seqs + 1],
            seq_lens=ints[num_seqs + 1:2 * num_seqs + 1],
            planned_lens=ints[2 * num_seqs + 1:3 * num_seqs + 1],
            # the step's rows of the persistent table, as wide as its widest sequence's
            block_tables=self.block_table.table[:, :width].index_select(0, ints[3 * num_seqs + 1:]),
            max_query_len=max(n for _, n in scheduled),
            max_seq_len=max(seq_lens),
            block_size=self.block_size,
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
        )
        if variants:
            meta.variants, meta.variants_cpu = ids[3], variants
        self.kv_spec.prepare_step(meta, self.device)
        return ids[0], ids[1], meta, sample_rows

    def _prepare_decode(self, scheduled: list[tuple[Sequence, int]]) -> DecodeInputs:
        """Host inputs of a step where every sequence computes one token (_prepare's n = 1 case)."""
        seqs = [seq for seq, _ in scheduled]
        inputs = DecodeInputs([], [], [], [], self.block_table.rows(seqs), [], [] if self.num_variants > 1 else None)
        for seq in seqs:
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

    @torch.inference_mode()
    def execute_model(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run one step; returns the sequences that sampled (batch order) and their samples."""
        sampling = [seq for seq, n in scheduled if seq.num_computed_tokens + n == seq.num_tokens]
        pure_decode = self.graph_runner is not None and all(n == 1 for _, n in scheduled)
        decode = self._prepare_decode(scheduled) if pure_decode else None
        if decode is not None and self.graph_runner.can_run(decode):
            hidden = self.graph_runner.run(decode)
            # one token per sequence: row i is sequence i (a 1-token prefill chunk may not sample)
            sample_rows = [i for i, (seq, _) in enumerate(scheduled) if seq.num_computed_tokens + 1 == seq.num_tokens]
        else:
            input_ids, positions, meta, sample_rows = self._prepare(scheduled)
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if not sampling:
            return [], None
        if len(sample_rows) < hidden.shape[0]:  # else every row samples, in order: no gather
            hidden = hidden[to_device(sample_rows, torch.int64, self.device)]
        return sampling, self.sampler(self._compute_logits(hidden, [seq.variant for seq in sampling]), sampling)
