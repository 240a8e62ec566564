"""Paged KV block pools: allocation, ref counts, prefix-cache hits, LRU eviction, hash checks; the pool without
prefix caching (a stack of free ids) behaves the same for one owner per block."""
from __future__ import annotations

import pytest
import torch

from leanserve.models.attention.kv_spec import PagedKVSpec
from leanserve.server.engine import block_manager as bm_module
from leanserve.server.engine.block_manager import BlockManager, PrefixCachingBlockManager, new_block_manager
from leanserve.server.engine.sampling_params import SamplingParams
from leanserve.server.engine.sequence import Sequence


def dense_spec(block_size: int) -> PagedKVSpec:
    """The block manager reads only block counts from the spec: one tiny layer will do."""
    return PagedKVSpec(num_layers=1, block_size=block_size, num_kv_heads=1, head_dim=1, dtype=torch.float32)


def make_seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, tokens, SamplingParams(), 0.0, eos_token_ids=[])


def admit(bm: BlockManager, seq: Sequence) -> int:
    """Admit a sequence for its whole prompt; returns how many tokens came from the cache."""
    hits = bm.get_computed_blocks(seq)
    assert bm.allocate_slots(seq, seq.num_tokens - len(hits) * bm.block_size, hits)
    return len(hits) * bm.block_size


@pytest.mark.parametrize("caching", [False, True])
def test_allocate_free_and_ref_counts(caching):
    bm = new_block_manager(8, dense_spec(4), caching)
    assert type(bm) is (PrefixCachingBlockManager if caching else BlockManager)
    seq = make_seq(list(range(10)))
    assert bm.allocate_slots(seq, 10)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    if caching:
        assert all(bm.blocks[b].ref_cnt == 1 for b in seq.block_table)
    # growing inside the last block needs no new block; crossing a boundary needs one
    seq.num_computed_tokens = 10
    seq.append_token(10)
    assert bm.allocate_slots(seq, 1) and len(seq.block_table) == 3
    seq.num_computed_tokens = 11
    seq.append_token(11)
    seq.append_token(12)
    assert bm.allocate_slots(seq, 2) and len(seq.block_table) == 4
    blocks = list(seq.block_table)
    bm.free(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    if caching:
        assert all(bm.blocks[b].ref_cnt == 0 for b in blocks)
    again = make_seq(list(range(30)), "again")  # every block again, each once
    assert bm.allocate_slots(again, 30) and sorted(again.block_table) == list(range(8))


def test_allocation_failure_changes_nothing():
    bm = PrefixCachingBlockManager(4, dense_spec(4))
    a = make_seq(list(range(12)), "a")
    assert bm.allocate_slots(a, 12)
    b = make_seq(list(range(100, 108)), "b")
    assert not bm.allocate_slots(b, 8)  # needs 2 blocks, 1 free
    assert b.block_table == [] and b.num_computed_tokens == 0 and bm.num_free_blocks == 1
    assert bm.prefix_cache_queries == 12  # the failed admission is not counted


def test_prefix_hits_are_shared_and_ref_counted():
    bm = PrefixCachingBlockManager(16, dense_spec(4))
    a = make_seq(list(range(13)), "a")
    assert admit(bm, a) == 0
    # same 12 leading tokens: 3 full blocks hit
    b = make_seq(list(range(12)) + [99, 98], "b")
    assert admit(bm, b) == 12
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    assert b.num_computed_tokens == 12
    assert all(bm.blocks[x].ref_cnt == 2 for x in a.block_table[:3])
    assert bm.prefix_cache_queries == 13 + 14 and bm.prefix_cache_hits == 12
    # freeing one owner keeps the shared blocks alive for the other
    bm.free(a)
    assert all(bm.blocks[x].ref_cnt == 1 for x in b.block_table[:3])
    assert bm.num_free_blocks == 16 - len(b.block_table)


def test_last_prompt_token_is_always_computed():
    bm = PrefixCachingBlockManager(16, dense_spec(4))
    a = make_seq(list(range(8)), "a")
    admit(bm, a)
    # an identical 8-token prompt (2 full cached blocks) reuses only the first block, so the
    # last token is computed and yields logits
    b = make_seq(list(range(8)), "b")
    assert admit(bm, b) == 4
    assert b.num_computed_tokens == 4


def test_freed_blocks_keep_their_hash_until_reused():
    bm = PrefixCachingBlockManager(8, dense_spec(4))
    a = make_seq(list(range(9)), "a")
    admit(bm, a)
    cached = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 8
    b = make_seq(list(range(9)), "b")
    assert admit(bm, b) == 8
    assert b.block_table[:2] == cached
    assert bm.num_free_blocks == 8 - 3  # hits left the free queue again


def test_chained_hash_depends_on_the_prefix():
    bm = PrefixCachingBlockManager(16, dense_spec(4))
    admit(bm, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 0], "a"))
    # the second block's tokens match, but after a different first block
    assert bm.get_computed_blocks(make_seq([9, 9, 9, 9, 5, 6, 7, 8, 0], "b")) == []


def test_lru_eviction_order():
    bm = PrefixCachingBlockManager(5, dense_spec(2))  # all used below: no never-touched blocks
    a = make_seq([1, 2, 3, 4, 5], "a")   # blocks: [1,2] [3,4] [5]
    admit(bm, a)
    b = make_seq([7, 8, 9], "b")         # blocks: [7,8] [9]
    admit(bm, b)
    a_full, b_full = a.block_table[:2], b.block_table[0]
    bm.free(a)
    bm.free(b)
    # 3 new blocks: the two unhashed partial blocks go first, then a's tail block (a freed before b,
    # tails before heads), while a's head and b's full block stay cached
    c = make_seq([20, 21, 22, 23, 24, 25], "c")
    assert bm.allocate_slots(c, 6)
    assert a_full[1] in c.block_table and a_full[0] not in c.block_table and b_full not in c.block_table
    assert bm.get_computed_blocks(make_seq([1, 2, 3, 4, 5], "d")) == [a_full[0]]
    assert bm.get_computed_blocks(make_seq([7, 8, 9], "e")) == [b_full]


def test_hash_hit_requires_equal_tokens(monkeypatch):
    # a degenerate hash that collides for any two blocks with the same parent
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, tokens: (parent or b"") + b"x")
    bm = PrefixCachingBlockManager(8, dense_spec(4))
    admit(bm, make_seq([1, 2, 3, 4, 0], "a"))
    other = make_seq([5, 6, 7, 8, 0], "b")
    assert bm.get_computed_blocks(other) == []
    assert bm.get_computed_blocks(make_seq([1, 2, 3, 4, 0], "c")) != []


def test_prefix_caching_disabled():
    bm = BlockManager(8, dense_spec(4))
    admit(bm, make_seq(list(range(9)), "a"))
    assert bm.get_computed_blocks(make_seq(list(range(9)), "b")) == []
    b = make_seq(list(range(9)), "b")
    admit(bm, b)
    assert bm.num_free_blocks == 8 - 6  # the same prompt again: its own blocks, nothing shared


def test_uncached_pool_takes_many_blocks_at_once_and_catches_a_double_free():
    """A MoA-sized request (thousands of pages at admission) and the failure that must change nothing."""
    bm = BlockManager(10_000, dense_spec(4))
    a, b = make_seq(list(range(4 * 6_000)), "a"), make_seq(list(range(4 * 5_000)), "b")
    assert bm.allocate_slots(a, a.num_tokens) and len(set(a.block_table)) == 6_000
    assert not bm.allocate_slots(b, b.num_tokens)  # 5,000 blocks, 4,000 free
    assert b.block_table == [] and bm.num_free_blocks == 4_000
    c = make_seq(list(range(4 * 1_000)), "c")
    assert bm.allocate_slots(c, c.num_tokens)  # c holds blocks while a's stale table is freed twice
    table = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 9_000
    a.block_table = table
    with pytest.raises(AssertionError, match="double free"):
        bm.free(a)
    assert bm.num_free_blocks == 9_000  # the failed free changed nothing
    d = make_seq(list(range(4 * 9_000)), "d")
    assert bm.allocate_slots(d, d.num_tokens) and not set(d.block_table) & set(c.block_table)
