"""MoA attention: every KV head (unit) of every layer keeps its own span, a sink + ring cache sized
once per request from the plan (models/moa_plan.py: C = S + R slots for the request's planned
length N = prompt + max_tokens), in pages of the engine's block size.

- MoAKVSpec: the engine's view. A block is one page (block_size tokens of one KV head of one
  layer); a request takes all its pages at admission (sum over layers and units of ceil(C / P)), never
  grows, and frees them when it ends, so the block manager's usage (kv_cache_usage_perc) counts
  the smaller cache truthfully. A request's block table lists its pages by (layer, unit, page).
  Ring pages are overwritten during decode, so pages are not shareable prefixes: no prefix caching.
- MoAStep: the per-step layout every layer reads (capacities, sink / ring lengths, where each
  unit's pages start in the table, each token's sequence), computed on the device from the step's
  planned lengths, inside CUDA graphs too.
- MoAAttention: pure decode steps store the new token, then run the split-K decode; other steps
  attend to cache + the step's own K/V (the band + sink varlen kernel), then store. CUDA with
  power-of-2 head and page sizes runs the Triton kernels; CPU runs the PyTorch references.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from leanserve.kernels.moa_reference import moa_decode_attention_ref, moa_prefill_attention_ref, moa_store_kv
from leanserve.models.attention.metadata import AttentionMetadata
from leanserve.models.attention.paged import uses_triton_decode
from leanserve.models.moa_plan import kv_slots_tensor


@dataclass(frozen=True)
class MoAKVSpec:
    """The engine's view of the sink + ring page pool (module docstring). alphas, betas [L, U]
    float64 on the host: the plan's rules; plan_block_size: the plan's B (sink length, rounding)."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens per page
    dtype: torch.dtype
    alphas: torch.Tensor
    betas: torch.Tensor
    plan_block_size: int
    prefix_caching = False  # ring pages are overwritten: a page is no function of a token prefix
    blocks_grow = False  # every page at admission: the block manager asks a running request for none

    @property
    def bytes_per_block(self) -> int:
        """K and V of one page."""
        return 2 * self.block_size * self.head_dim * self.dtype.itemsize

    def allocate(self, num_blocks: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One pool [2, num_blocks + 1, P, D] that every layer shares (page ids are global); the extra
        last page is the trash that padding and overwritten tokens are stored into (moa_store_kv)."""
        pool = torch.zeros(2, num_blocks + 1, self.block_size, self.head_dim, dtype=self.dtype, device=device)
        return [(pool[0], pool[1])] * self.num_layers

    def blocks_for(self, num_tokens: int) -> int:
        """Pages of a request planned for num_tokens tokens."""
        slots = kv_slots_tensor(self.alphas, self.betas, torch.tensor(num_tokens), self.plan_block_size)
        return int((-(-slots // self.block_size)).sum())

    def block_table_width(self, max_model_len: int) -> int:
        return self.blocks_for(max_model_len)

    def blocks_at_admission(self, num_tokens: int, planned_len: int) -> int:
        """All pages at once, sized for the request's planned length (spec §9.4)."""
        return self.blocks_for(planned_len)

    def slot(self, block_table: list[int], position: int) -> int:
        """The position itself: MoAStep maps it to each unit's page and offset (slot -1 still means
        do not write, as for padding rows of CUDA graphs)."""
        return position

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        return list(range(start, end))

    def prepare_step(self, meta: AttentionMetadata, device: torch.device) -> None:
        """Nothing: the model computes MoAStep in its forward, where CUDA graphs capture it too."""

    def graphs_capturable(self) -> bool:
        return uses_triton_decode(self.head_dim, self.block_size)


@dataclass(frozen=True)
class MoAStep:
    """One step's cache layout, [B, L, U] int32 unless noted."""
    capacity: torch.Tensor      # C
    sink: torch.Tensor          # S = min(C, plan B)
    ring: torch.Tensor          # R = C - S
    page_offsets: torch.Tensor  # first column of each unit's pages in the sequence's block table
    token_seq: torch.Tensor     # [T] int64: the sequence of each token
    positions: torch.Tensor     # [T] int64: each token's absolute position
    write: torch.Tensor         # [T] bool: the token's K/V is stored (slot_mapping -1: padding)

    @classmethod
    def compute(cls, meta: AttentionMetadata, alphas: torch.Tensor, betas: torch.Tensor, plan_block_size: int,
                page_size: int) -> MoAStep:
        """From the step's planned lengths (no host sync). alphas, betas [L, U] float64 on the device."""
        if meta.planned_lens is None:
            raise ValueError("MoA attention needs the step's planned lengths (AttentionMetadata.planned_lens)")
        n = meta.planned_lens[:, None, None]
        capacity = kv_slots_tensor(alphas, betas, n, plan_block_size)  # [B, L, U]
        pages = (-(-capacity // page_size)).flatten(1)
        offsets = (pages.cumsum(1) - pages).view_as(capacity)
        sink = capacity.clamp_max(plan_block_size)
        num_tokens = meta.slot_mapping.shape[0]
        tokens = torch.arange(num_tokens, device=capacity.device)
        token_seq = torch.searchsorted(meta.query_start_loc[1:], tokens.to(meta.query_start_loc.dtype), right=True)
        token_seq = token_seq.clamp_max(meta.seq_lens.shape[0] - 1)  # rows past the last sequence: padding
        # a sequence's tokens are the last of its context
        positions = (meta.seq_lens[token_seq] - meta.query_start_loc[token_seq + 1] + tokens).long()
        return cls(capacity.int(), sink.int(), (capacity - sink).int(), offsets.int(), token_seq, positions,
                   meta.slot_mapping >= 0)


class MoALayerCache(NamedTuple):
    """What one layer's attention gets instead of a dense (k_cache, v_cache): the shared pool, the
    step's layout and the layer's index into it."""
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    step: MoAStep
    layer: int


class MoAAttention(nn.Module):
    """Stores the step's K/V into the sink + ring pages and attends through them (module docstring).
    max_capacity: the largest C of this layer's units at the longest context the model takes, a host
    bound on the decode's per-unit lengths."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, max_capacity: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.max_capacity = max_capacity

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: MoALayerCache,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq * D]."""
        k_pool, v_pool, step, layer = cache
        sink, ring, offsets = step.sink[:, layer], step.ring[:, layer], step.page_offsets[:, layer]
        triton = q.is_cuda and uses_triton_decode(self.head_dim, k_pool.shape[1])

        def store() -> None:
            store_kv = moa_store_kv
            if q.is_cuda:  # one launch per layer instead of ~12 (CPU installs may lack Triton)
                from leanserve.kernels.moa_store import moa_store_kv as store_kv
            store_kv(k, v, k_pool, v_pool, meta.block_tables, offsets, sink, ring, step.token_seq, step.positions,
                     meta.seq_lens, step.write)

        if meta.max_query_len == 1:  # the new token overwrites only a position it no longer sees
            store()
            num_seqs = meta.block_tables.shape[0]
            valid = torch.minimum(meta.seq_lens[:, None], step.capacity[:, layer])
            bound = min(meta.max_seq_len, self.max_capacity)
            out = torch.empty_like(q)
            out[num_seqs:].zero_()  # rows past B are padding
            if triton:
                from leanserve.kernels.moa_decode import moa_decode_attention  # CPU installs may lack Triton
                moa_decode_attention(q[:num_seqs], k_pool, v_pool, meta.block_tables, offsets, valid, self.scale,
                                     bound, out=out[:num_seqs])
            else:
                out[:num_seqs] = moa_decode_attention_ref(q[:num_seqs], k_pool, v_pool, meta.block_tables, offsets,
                                                          valid, self.scale, bound)
            return out.flatten(1)
        if triton:
            from leanserve.kernels.moa_prefill import moa_prefill_attention
            # the kernel takes one stride set for k and v: rotary gives k its own buffer, v is a qkv view
            k, v = k.contiguous(), v.contiguous()
            out = moa_prefill_attention(q, k, v, k_pool, v_pool, meta.query_start_loc, meta.seq_lens,
                                        meta.block_tables, offsets, sink, ring, self.scale, out=torch.zeros_like(q))
        else:
            out = moa_prefill_attention_ref(q, k, v, k_pool, v_pool, meta.query_start_loc, meta.seq_lens,
                                            meta.block_tables, offsets, sink, ring, self.scale)
        store()  # after attending: a chunk's early queries still needed what its tokens overwrite
        return out.flatten(1)

