"""Paged KV block pools (vLLM V1 `BlockPool` + `KVCacheManager`, condensed).

BlockManager hands out free block ids from a stack: a request's blocks cost a few list operations
however many there are (a per-head sink + ring cache at 16k context holds ~33k pages, taken at
admission and freed at its end, which per-block bookkeeping made a ~5 ms host stall each way).

PrefixCachingBlockManager adds prefix caching: every block has a ref count, free blocks (ref 0) sit in
an LRU queue, and a FULL block keeps the chained hash of its contents, so a later request with the
same prefix can take it back from the free queue (or share it while it is still in use) instead of
recomputing it. A block loses its hash only when the pool hands it out for new contents.
new_block_manager picks one.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from leanserve.models.attention.kv_spec import KVCacheSpec
from leanserve.server.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None  # contents of a hashed block, checked on every hit


def hash_block(parent_hash: bytes | None, token_ids: list[int]) -> bytes:
    """SHA-256 over (parent hash, little-endian int64 token ids): chaining makes a block's hash
    identify the whole prefix up to and including it, not just its own tokens."""
    h = hashlib.sha256(parent_hash or b"")
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def variant_root(variant: int) -> bytes | None:
    """The parent hash of a sequence's first block: none for variant 0 (every sequence of a
    one-variant model), so their hashes stay those of the token ids alone."""
    return None if variant == 0 else b"variant" + struct.pack("<q", variant)


class BlockManager:
    """The pool without prefix caching (module docstring): blocks are owned by one sequence at a
    time, so a stack of free ids is all the state."""
    enable_prefix_caching = False

    def __init__(self, num_blocks: int, kv_spec: KVCacheSpec):
        if num_blocks < 1 or kv_spec.block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {kv_spec.block_size}")
        self.num_blocks = num_blocks
        self.kv_spec = kv_spec  # how many blocks a sequence holds
        self.block_size = kv_spec.block_size
        self._init_blocks(num_blocks)
        # cumulative, in tokens (vLLM semantics: queries = tokens of admitted requests)
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    def _init_blocks(self, num_blocks: int) -> None:
        self._free_ids = list(range(num_blocks - 1, -1, -1))  # the top of the stack (block 0) goes first
        self._is_free = np.ones(num_blocks, dtype=bool)  # catches a double free, vectorised

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_ids)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences; cached-but-free blocks count as free."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Leading blocks of a not-yet-admitted sequence that the cache already holds: none here."""
        return []

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens (as many as the KV spec says its tokens
        take; at admission, what the spec reserves). `computed_blocks` (from get_computed_blocks) is
        passed once, at admission: they become the head of its block table and count as computed.
        Returns False, changing nothing, if the pool is too small."""
        computed_blocks = computed_blocks or []
        admission = seq.num_computed_tokens == 0  # fresh or after preemption
        num_computed = seq.num_computed_tokens + len(computed_blocks) * self.block_size
        num_tokens = num_computed + num_new_tokens
        if admission:
            num_required = self.kv_spec.blocks_at_admission(num_tokens, seq.planned_len)
        elif self.kv_spec.blocks_grow:
            num_required = self.kv_spec.blocks_for(num_tokens)
        else:  # it took all its blocks at admission
            num_required = len(seq.block_table)
        num_new_blocks = num_required - len(seq.block_table) - len(computed_blocks)
        if num_new_blocks + self._num_evictable(computed_blocks) > self.num_free_blocks:
            return False
        if admission:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += len(computed_blocks) * self.block_size
        for block_id in computed_blocks:
            self._touch(block_id)
        seq.block_table.extend(computed_blocks)
        seq.num_computed_tokens = num_computed
        seq.block_table.extend(self._take(num_new_blocks))
        # a block holding a token not yet read back (async scheduling) is offered to the cache later
        self._blocks_computed(seq, min(num_tokens, seq.num_tokens - seq.num_pending_tokens) // self.block_size)
        return True

    def _num_evictable(self, computed_blocks: list[int]) -> int:
        """Cache hits that sit in the free queue: touching them takes them out of it."""
        return 0

    def _touch(self, block_id: int) -> None:
        raise AssertionError("a pool without prefix caching has no computed blocks to share")

    def _take(self, n: int) -> list[int]:
        if n <= 0:
            return []
        taken = self._free_ids[-n:]
        del self._free_ids[-n:]
        taken.reverse()
        self._is_free[taken] = False
        return taken

    def _blocks_computed(self, seq: Sequence, num_full_blocks: int) -> None:
        """The sequence's first `num_full_blocks` blocks are computed by the end of this step."""

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks; AssertionError, changing nothing, if one of them is free already."""
        ids = np.array(seq.block_table, dtype=np.int64)
        if self._is_free[ids].any():
            raise AssertionError(f"{seq.request_id!r} frees blocks that are free already "
                                 f"({ids[self._is_free[ids]][:8].tolist()}...): a double free")
        self._is_free[ids] = True
        self._free_ids.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_cached_blocks = 0


class PrefixCachingBlockManager(BlockManager):
    """The pool with prefix caching (module docstring)."""
    enable_prefix_caching = True

    def _init_blocks(self, num_blocks: int) -> None:
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head = evicted first
        self.cached_blocks: dict[bytes, int] = {}  # block hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def _block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        """Extend the sequence's chained hashes to its first `num_full_blocks` blocks."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_full_blocks):
            # a block's K/V depend on the model variant that computed them, so the chain starts
            # from the variant: sequences on different variants never share blocks
            parent = seq.block_hashes[i - 1] if i else variant_root(seq.variant)
            seq.block_hashes.append(hash_block(parent, seq.token_ids[i * bs:(i + 1) * bs]))
        return seq.block_hashes[:num_full_blocks]

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Leading blocks of a not-yet-admitted sequence that the cache already holds. At most
        (num_tokens - 1) tokens are served from the cache, so the last prompt token is always
        computed and produces the logits for the first sample."""
        bs = self.block_size
        hits = []
        for i, h in enumerate(self._block_hashes(seq, (seq.num_tokens - 1) // bs)):
            block_id = self.cached_blocks.get(h)
            # a hash collision must not hand out another prefix's K/V, however unlikely
            if block_id is None or self.blocks[block_id].token_ids != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break
            hits.append(block_id)
        return hits

    def _num_evictable(self, computed_blocks: list[int]) -> int:
        return sum(1 for b in computed_blocks if self.blocks[b].ref_cnt == 0)

    def _take(self, n: int) -> list[int]:
        return [self._pop_free_block() for _ in range(n)]

    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_cnt == 0:
            del self.free_queue[block_id]
        block.ref_cnt += 1

    def _pop_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict its cached contents
            if self.cached_blocks.get(block.block_hash) == block_id:
                del self.cached_blocks[block.block_hash]
            block.block_hash = block.token_ids = None
        block.ref_cnt = 1
        return block_id

    def _blocks_computed(self, seq: Sequence, num_full_blocks: int) -> None:
        # Blocks whose tokens are all computed by the end of this step become shareable now:
        # a sequence admitted later in the same step reads them after this one wrote them,
        # since the model stores a layer's K/V for the whole batch before attending.
        bs = self.block_size
        hashes = self._block_hashes(seq, num_full_blocks)
        for i in range(seq.num_cached_blocks, num_full_blocks):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is not None:  # a prefix-cache hit
                continue
            # an identical block computed by another sequence stays the canonical one
            if hashes[i] not in self.cached_blocks:
                block.block_hash = hashes[i]
                block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                self.cached_blocks[hashes[i]] = block.block_id
        seq.num_cached_blocks = max(seq.num_cached_blocks, num_full_blocks)

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks. Tail blocks are freed first so they are also evicted
        first: a prefix's head is worth more than its tail. Unhashed blocks hold nothing
        reusable and go to the front of the queue."""
        # with async scheduling the block that the last computed token fills may still be unhashed (that
        # token was unread when its step was scheduled); by now every computed token is known
        num_known = min(seq.num_computed_tokens, seq.num_tokens - seq.num_pending_tokens)
        self._blocks_computed(seq, num_known // self.block_size)
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block_id} freed twice"
            if block.ref_cnt == 0:
                self.free_queue[block_id] = None
                if block.block_hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_cached_blocks = 0


def new_block_manager(num_blocks: int, kv_spec: KVCacheSpec, enable_prefix_caching: bool) -> BlockManager:
    cls = PrefixCachingBlockManager if enable_prefix_caching else BlockManager
    return cls(num_blocks, kv_spec)
