"""CUDA graphs for pure-decode steps (vLLM's CUDAGraphRunner, nano-vllm's capture_cudagraph).

An eager decode step launches every kernel of every layer from Python (~500 for an 8B Llama), and
at small batches the GPU waits on those launches. Here the model forward is captured once per
bucketed batch size and a step replays the smallest graph that fits its batch: one launch.

A graph bakes in tensor addresses and host ints, hence:
- inputs live in static buffers sized for the largest bucket; a step copies its rows in and pads
  the rest of its bucket with rows that write no KV (slot -1) and read only one cached token;
  a model with several weight sets (num_variants > 1) also gets each row's variant id from one;
- block tables stay on the device (block_table.py): a step copies each sequence's row index, and
  the graph gathers those rows of the persistent table (the padding row for padding);
- attention is captured with max_seq_len = max_model_len (the Triton kernel sizes its split-K
  grid from that host int); each row still loops over its own seq_len only;
- batches larger than the largest bucket, steps with prefill chunks, and CPU stay eager.
The LM head is captured too (its matmul, the float32 cast and, with tensor parallelism, the vocabulary
gather are launches like any layer's); a model that picks a head per row from host ids (num_variants >
1) computes its logits after the replay. Sampling stays outside: which processing steps run (penalties,
top-k/p, seeded rows, logprobs) is decided per step on the host; a greedy batch is one argmax launch.
"""
from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from leanserve.errors import UserError
from leanserve.models.attention.kv_spec import KVCache, KVCacheSpec
from leanserve.models.attention.metadata import AttentionMetadata
from leanserve.server.engine.block_table import PersistentBlockTable

logger = logging.getLogger(__name__)

# a padding row: token 0 at position 0, no KV write, attends to slot 0 of block 0 (the persistent
# table's padding row: block_table.PAD_BLOCK, which always exists and holds finite values), so any
# decode attention implementation stays finite on it, whatever the batch's real sequences hold. Its
# planned length is its one token (a cache sized per request sizes it smallest).
PAD_TOKEN, PAD_POSITION, PAD_SLOT, PAD_SEQ_LEN, PAD_VARIANT = 0, 0, -1, 1, 0
PAD_PLANNED_LEN = PAD_SEQ_LEN


def default_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then powers of two and their 1.5x (16, 24, 32, 48, 64, 96, ...) below
    max_num_seqs, and max_num_seqs itself: every decode batch has a graph, padded by at most
    ~1.5x past 8 rows (decode reads the weights once per step, so extra rows cost little)."""
    sizes, p = [1, 2, 4, 8], 16
    while p < max_num_seqs:
        sizes += [p, p * 3 // 2]
        p *= 2
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


def check_batch_sizes(sizes: list[int], max_num_seqs: int) -> list[int]:
    bad = [s for s in sizes if not 1 <= s <= max_num_seqs]
    if not sizes or bad:
        raise UserError(f"cuda_graph_batch_sizes must be non-empty and within [1, max_num_seqs={max_num_seqs}], "
                         f"got {sizes}")
    return sorted(set(sizes))


def select_bucket(num_seqs: int, batch_sizes: list[int]) -> int | None:
    """The smallest captured batch size >= num_seqs (batch_sizes sorted); None if none is."""
    i = bisect.bisect_left(batch_sizes, num_seqs)
    return batch_sizes[i] if i < len(batch_sizes) else None


@dataclass(slots=True)
class DecodeInputs:
    """One decode step on the host: one new token per sequence, in batch order."""
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    seq_lens: list[int]
    rows: list[int]  # each sequence's row of the persistent block table
    planned_lens: list[int]  # each sequence's prompt + max_tokens (AttentionMetadata.planned_lens)
    variants: list[int] | None = None  # each sequence's Sequence.variant; None for a one-variant model

    @property
    def num_seqs(self) -> int:
        return len(self.input_ids)


def pad_decode_inputs(inputs: DecodeInputs, bucket: int, pad_row: int) -> DecodeInputs:
    """Pad to `bucket` rows with PAD rows, which read the block table's padding row `pad_row`."""
    pad = bucket - inputs.num_seqs
    if pad < 0:
        raise ValueError(f"{inputs.num_seqs} sequences do not fit a bucket of {bucket}")
    variants = None if inputs.variants is None else inputs.variants + [PAD_VARIANT] * pad
    return DecodeInputs(inputs.input_ids + [PAD_TOKEN] * pad, inputs.positions + [PAD_POSITION] * pad,
                        inputs.slot_mapping + [PAD_SLOT] * pad, inputs.seq_lens + [PAD_SEQ_LEN] * pad,
                        inputs.rows + [pad_row] * pad, inputs.planned_lens + [PAD_PLANNED_LEN] * pad, variants)


class CUDAGraphRunner:
    """The model's decode forward captured at each of `batch_sizes`, all graphs in one memory pool."""

    def __init__(self, model: nn.Module, kv_caches: list[KVCache], block_table: PersistentBlockTable,
                 batch_sizes: list[int], max_model_len: int, kv_spec: KVCacheSpec, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_table = block_table
        self.batch_sizes = sorted(batch_sizes)
        self.max_model_len = max_model_len
        self.block_size = kv_spec.block_size
        self.device = device
        max_bs = self.batch_sizes[-1]
        self.with_variants = getattr(model, "num_variants", 1) > 1
        # input_ids, positions, slot_mapping (and variants) of a bs-row bucket are the views [0:bs],
        # [bs:2bs], [2bs:3bs] (and [3bs:4bs]) of one buffer, so a step fills them all with one copy
        self.id_rows = 4 if self.with_variants else 3
        self.ids = torch.zeros(self.id_rows * max_bs, dtype=torch.int64, device=device)
        # seq_lens, planned_lens and block-table rows of a bs-row bucket: the views [0:bs], [bs:2bs],
        # [2bs:3bs] of one buffer
        self.lens = torch.full((3 * max_bs,), PAD_SEQ_LEN, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        # the graphs write their output here: logits [max_bs, vocab] (with_logits), else hidden states
        self.with_logits = not self.with_variants
        self.out: torch.Tensor | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _inputs(self, bs: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids, positions, slot_mapping, *variants = self.ids[:self.id_rows * bs].view(self.id_rows, bs)
        seq_lens, planned_lens, rows = self.lens[:3 * bs].view(3, bs)
        # in the graph: every layer reads the gathered rows (a few MB at most, once per step)
        block_tables = self.block_table.table.index_select(0, rows)
        meta = AttentionMetadata(slot_mapping=slot_mapping, query_start_loc=self.query_start_loc[:bs + 1],
                                 seq_lens=seq_lens, block_tables=block_tables,
                                 max_query_len=1, max_seq_len=self.max_model_len, block_size=self.block_size,
                                 planned_lens=planned_lens, variants=variants[0] if variants else None)
        return input_ids, positions, meta

    def _fill_padding(self, bs: int) -> None:
        """Make all bs rows padding: warm-up and capture run the model without touching the KV cache."""
        self._copy(pad_decode_inputs(DecodeInputs([], [], [], [], [], [], [] if self.with_variants else None), bs,
                                     self.block_table.pad_row))

    def _forward(self, bs: int) -> None:
        input_ids, positions, meta = self._inputs(bs)
        out = self.model(input_ids, positions, self.kv_caches, meta)
        if self.with_logits:
            out = self.model.compute_logits(out)
        if self.out is None:  # the first (largest) bucket sizes the output buffer
            self.out = torch.empty_like(out)
        self.out[:bs] = out

    @torch.inference_mode()
    def capture(self) -> None:
        # the capture stream is made on the current device: make that the model's
        with torch.cuda.device(self.device):
            free_before = torch.cuda.mem_get_info()[0]
            t0 = time.perf_counter()
            pool = None
            for bs in reversed(self.batch_sizes):  # largest first: the smaller graphs reuse its pool memory
                self._fill_padding(bs)
                self._forward(bs)  # eager warm-up with the exact shapes: Triton compiles outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                # thread_local: CUDA calls from other threads (another engine loading) must not fail the capture
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self._forward(bs)
                pool = graph.pool()
                self.graphs[bs] = graph
            torch.cuda.synchronize()
            logger.info("CUDA graphs: captured decode batch sizes %s in %.1f s, %.2f GiB", self.batch_sizes,
                        time.perf_counter() - t0, (free_before - torch.cuda.mem_get_info()[0]) / 2**30)

    def can_run(self, inputs: DecodeInputs) -> bool:
        return inputs.num_seqs <= self.batch_sizes[-1]

    def _copy(self, padded: DecodeInputs) -> None:
        """Padded host inputs -> the static buffers: two copies, from pinned memory on CUDA (a
        pageable copy would make the host wait for the GPU to drain its queue)."""
        bs = padded.num_seqs

        def copy(dst: torch.Tensor, data: list, dtype: torch.dtype) -> None:
            dst.copy_(torch.tensor(data, dtype=dtype, pin_memory=dst.is_cuda), non_blocking=True)

        copy(self.ids[:self.id_rows * bs],
             padded.input_ids + padded.positions + padded.slot_mapping + (padded.variants or []), torch.int64)
        copy(self.lens[:3 * bs], padded.seq_lens + padded.planned_lens + padded.rows, torch.int32)

    @torch.inference_mode()
    def run(self, inputs: DecodeInputs, pending: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [num_seqs, vocab] float32 of one decode step (with_logits; else hidden states
        [num_seqs, hidden_size]): a view into the graphs' output buffer, valid until the next run (stream
        order keeps later reads of it correct; the sampler may modify it in place). pending: (rows,
        input ids) already on the device, written over the host's (async scheduling)."""
        bs = select_bucket(inputs.num_seqs, self.batch_sizes)
        self._copy(pad_decode_inputs(inputs, bs, self.block_table.pad_row))
        if pending is not None:  # the input ids are the buffer's first bs entries
            self.ids.index_copy_(0, *pending)
        self.graphs[bs].replay()
        return self.out[:inputs.num_seqs]
