"""What the engine needs to know about a model's KV cache, answered by the model (vLLM V1's
per-layer KV cache specs: `FullAttentionSpec`, `SlidingWindowSpec`, `page_size_bytes`, ...).

The engine sizes, allocates and hands out cache blocks only through a spec, so an attention kind
with another cache (sink + ring pages, one cache per ensemble member, ...) brings its own spec
next to its attention layer, and the engine stays as it is."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from leanserve.models.attention.metadata import AttentionMetadata
from leanserve.models.attention.paged import context_slots, uses_triton_decode

KVCache = tuple[torch.Tensor, torch.Tensor]  # one layer's (k_cache, v_cache)


class KVCacheSpec(Protocol):
    """All the engine reads from a spec (PagedKVSpec below says what each answer means)."""
    block_size: int  # tokens per block: also the prefix cache's unit and the slot mapping's
    prefix_caching: bool  # whether a block's K/V is a function of its token prefix (shareable)
    blocks_grow: bool  # whether a running sequence takes more blocks as it grows (else: all at admission)

    @property
    def bytes_per_block(self) -> int: ...
    def allocate(self, num_blocks: int, device: torch.device) -> list[KVCache]: ...
    def blocks_for(self, num_tokens: int) -> int: ...
    def block_table_width(self, max_model_len: int) -> int: ...
    def blocks_at_admission(self, num_tokens: int, planned_len: int) -> int: ...
    def slot(self, block_table: list[int], position: int) -> int: ...
    def slots(self, block_table: list[int], start: int, end: int) -> list[int]: ...
    def prepare_step(self, meta: AttentionMetadata, device: torch.device) -> None: ...
    def graphs_capturable(self) -> bool: ...


@dataclass(frozen=True)
class PagedKVSpec:
    """The dense paged cache: every layer keeps K and V of every token of a sequence, block_size
    tokens per block; a sequence's block table lists its blocks in token order. Per layer,
    k_cache and v_cache are [num_blocks, block_size, num_kv_heads, head_dim]."""
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    prefix_caching = True  # a full block holds the K/V of its block of tokens, for good
    blocks_grow = True  # one more block every block_size tokens

    @property
    def bytes_per_block(self) -> int:
        """One block of all layers, K and V: what the memory profile divides the free memory by."""
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def allocate(self, num_blocks: int, device: torch.device) -> list[KVCache]:
        """The cache for num_blocks blocks: one tensor [2, L, num_blocks, block_size, Hkv, D], seen as
        per-layer (k_cache, v_cache) views."""
        shape = (2, self.num_layers, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        # zeros, not empty: a kernel that reads a whole block must not meet NaN garbage
        cache = torch.zeros(shape, dtype=self.dtype, device=device)
        return [(cache[0, i], cache[1, i]) for i in range(self.num_layers)]

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence holds once num_tokens of its tokens are in the cache."""
        return -(-num_tokens // self.block_size)

    def block_table_width(self, max_model_len: int) -> int:
        """Columns of the block-table buffer that CUDA graphs capture: the table of a max_model_len sequence."""
        return self.blocks_for(max_model_len)

    def blocks_at_admission(self, num_tokens: int, planned_len: int) -> int:
        """Blocks the scheduler reserves when it admits a request whose first step leaves num_tokens
        tokens in the cache (prefix-cache hits + first chunk) and that may grow to planned_len
        tokens (prompt + max_tokens). Dense: those num_tokens' blocks only; later tokens take blocks
        as they come (blocks_for), so planned_len does not matter here."""
        return self.blocks_for(num_tokens)

    def slot(self, block_table: list[int], position: int) -> int:
        """The cache slot (block id * block_size + offset) that holds a sequence's token at `position`."""
        return block_table[position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """The slots of positions start..end-1 (the step's new tokens of one sequence)."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare_step(self, meta: AttentionMetadata, device: torch.device) -> None:
        """Per-step inputs the attention layers share, computed once instead of once per layer: the
        PyTorch paths (CPU, or shapes the Triton kernels do not take) gather K/V through the step's
        context slots."""
        if device.type != "cuda" or not self.graphs_capturable():
            meta.context_slots = context_slots(meta.block_tables, meta.seq_lens, meta.max_seq_len, self.block_size)

    def graphs_capturable(self) -> bool:
        """Whether decode steps may be captured in CUDA graphs: only when decode attention runs the
        Triton kernel (power-of-2 head_dim >= 16 and block size); the PyTorch fallback would be
        captured gathering max_model_len tokens of K/V per row, every step."""
        return uses_triton_decode(self.head_dim, self.block_size)


@dataclass(frozen=True)
class LayerGroupsKVSpec:
    """Consecutive groups of layers, each a dense paged cache with its own KV head count, under one
    block table: a block holds block_size tokens of every layer of every group, so the slot logic
    is PagedKVSpec's (every group shares it) and only the bytes of a block add up. For models whose
    layers keep different numbers of KV heads (an ensemble's member layers keep S caches side by
    side as S x the heads of its shared trunk)."""
    groups: tuple[PagedKVSpec, ...]
    prefix_caching = True
    blocks_grow = True

    def __post_init__(self):
        if not self.groups or len({(g.block_size, g.head_dim, g.dtype) for g in self.groups}) != 1:
            raise ValueError(f"layer groups need one block size, head dim and dtype: {self.groups}")

    @property
    def block_size(self) -> int:
        return self.groups[0].block_size

    @property
    def bytes_per_block(self) -> int:
        return sum(g.bytes_per_block for g in self.groups)

    def allocate(self, num_blocks: int, device: torch.device) -> list[KVCache]:
        """Every group's layers in order: one cache tensor per group."""
        return [cache for g in self.groups for cache in g.allocate(num_blocks, device)]

    def blocks_for(self, num_tokens: int) -> int:
        return self.groups[0].blocks_for(num_tokens)

    def block_table_width(self, max_model_len: int) -> int:
        return self.groups[0].block_table_width(max_model_len)

    def blocks_at_admission(self, num_tokens: int, planned_len: int) -> int:
        return self.groups[0].blocks_at_admission(num_tokens, planned_len)

    def slot(self, block_table: list[int], position: int) -> int:
        return self.groups[0].slot(block_table, position)

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        return self.groups[0].slots(block_table, start, end)

    def prepare_step(self, meta: AttentionMetadata, device: torch.device) -> None:
        self.groups[0].prepare_step(meta, device)

    def graphs_capturable(self) -> bool:
        return all(g.graphs_capturable() for g in self.groups)
