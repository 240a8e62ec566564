"""MoA's sink + ring paged KV cache in PyTorch: where a position lives, the store of a step's K/V,
and reference attention for a whole step (prefill chunks and decode rows) and for pure decode.
These are the CPU serving paths and the oracles of the Triton kernels (moa_prefill.py,
moa_decode.py); no Triton import, so CPU installs without it serve MoA models.

Layout. One pool of pages for all layers, k_pool, v_pool [num_pages, P, D]: a page holds P tokens
of one KV head of one layer. In a layer, sequence b's KV head u (a "unit") keeps C = S + R slots
(S sink, R ring; R >= 1) in the ceil(C / P) pages block_tables[b, page_offsets[b, u]:]; slot s lives
in page s // P at offset s % P. Position p takes slot p if p < S, else S + (p - S) mod R, so once
the ring is full it holds the last R positions (the token-exact rule: query i sees key j iff
j <= i and (j < S or j > i - R)). sink_lens, ring_lens, page_offsets [B, U] int32 are this
layer's; a unit's slot order is irrelevant to attention, so no pointer state is kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def slot_of(pos: torch.Tensor, sink: torch.Tensor, ring: torch.Tensor) -> torch.Tensor:
    """The slot position `pos` takes (tensors broadcast)."""
    return torch.where(pos < sink, pos, sink + (pos - sink) % ring)


def slot_position(slot: torch.Tensor, sink: torch.Tensor, ring: torch.Tensor, context: int | torch.Tensor
                  ) -> torch.Tensor:
    """The position slot `slot` holds once positions 0..context-1 are stored, -1 if it is empty:
    a ring slot holds the latest position congruent to it."""
    last = slot + torch.div(context - 1 - slot, ring, rounding_mode="floor") * ring
    pos = torch.where(slot < sink, slot, last)
    return torch.where(slot < torch.minimum(torch.as_tensor(context), sink + ring), pos, -1)


def page_rows(block_tables: torch.Tensor, seq: torch.Tensor, first_page: torch.Tensor, slot: torch.Tensor,
              page_size: int) -> torch.Tensor:
    """Row (page * P + offset) of the flattened pool that holds `slot` of the unit whose pages start
    at column `first_page` of row `seq` of block_tables (all broadcast). Columns are clamped into
    the table and page ids to >= 0, so slots past a unit's pages (which callers mask) and padding
    rows (tables of -1) index a real, finite row instead of failing."""
    width = block_tables.shape[1]
    col = (first_page + torch.div(slot, page_size, rounding_mode="floor")).clamp(0, width - 1)
    page = block_tables.reshape(-1)[(seq * width + col).long()].clamp_min(0)
    return page.long() * page_size + slot % page_size


def store_rows(k_pool: torch.Tensor, block_tables: torch.Tensor, page_offsets: torch.Tensor, sink_lens: torch.Tensor,
               ring_lens: torch.Tensor, token_seq: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
               write: torch.Tensor) -> torch.Tensor:
    """[T, U] pool rows a step's tokens are stored at: token t (of sequence token_seq[t], at
    positions[t]) goes to each unit's slot if write[t] and it is still in that unit's cache at the
    step's end (p < S or p >= seq_len - R): a chunk longer than the ring would otherwise write one
    slot twice, in no defined order. Everything else goes to the trash page (the pool's last, never
    handed out), so the store has static shapes and no host sync (CUDA-graph capturable)."""
    page_size = k_pool.shape[1]
    sink, ring = sink_lens[token_seq], ring_lens[token_seq]  # [T, U]
    pos = positions[:, None]
    keep = write[:, None] & ((pos < sink) | (pos >= seq_lens[token_seq][:, None] - ring))
    rows = page_rows(block_tables, token_seq[:, None], page_offsets[token_seq], slot_of(pos, sink, ring), page_size)
    return torch.where(keep, rows, (k_pool.shape[0] - 1) * page_size)


def moa_store_kv(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                 block_tables: torch.Tensor, page_offsets: torch.Tensor, sink_lens: torch.Tensor,
                 ring_lens: torch.Tensor, token_seq: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
                 write: torch.Tensor) -> None:
    """Store a step's new K/V [T, U, D] at store_rows."""
    rows = store_rows(k_pool, block_tables, page_offsets, sink_lens, ring_lens, token_seq, positions, seq_lens,
                      write).flatten()
    k_pool.view(-1, k_pool.shape[2]).index_copy_(0, rows, k.flatten(0, 1))
    v_pool.view(-1, v_pool.shape[2]).index_copy_(0, rows, v.flatten(0, 1))


def moa_decode_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                             block_tables: torch.Tensor, page_offsets: torch.Tensor, valid_lens: torch.Tensor,
                             scale: float, max_valid: int) -> torch.Tensor:
    """Decode (the step's K/V already stored): q [B, Hq, D] -> [B, Hq, D]. Sequence b's query heads
    of KV head u attend to that unit's first valid_lens[b, u] >= 1 slots, all of which the newest
    token sees. max_valid: a host int >= every valid_len; shapes depend on it alone (no host sync,
    so it can be graph-captured)."""
    num_seqs, num_units = valid_lens.shape
    page_size, head_dim = k_pool.shape[1], k_pool.shape[2]
    slots = torch.arange(max_valid, device=q.device)
    mask = slots < valid_lens[..., None]  # [B, U, n]
    seq = torch.arange(num_seqs, device=q.device)[:, None, None]
    # masked slots read slot 0 (always written): an empty one may hold NaN, and 0 * NaN survives the mask
    rows = page_rows(block_tables, seq, page_offsets[..., None], torch.where(mask, slots, 0), page_size).flatten()
    k = k_pool.view(-1, head_dim).index_select(0, rows).view(num_seqs, num_units, max_valid, head_dim)
    v = v_pool.view(-1, head_dim).index_select(0, rows).view(num_seqs, num_units, max_valid, head_dim)
    # a KV head's group of query heads rides SDPA's query axis: K/V need no GQA expansion
    o = F.scaled_dot_product_attention(q.unflatten(1, (num_units, -1)), k, v, attn_mask=mask[:, :, None], scale=scale)
    return o.flatten(1, 2)


def moa_prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                              v_pool: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                              block_tables: torch.Tensor, page_offsets: torch.Tensor, sink_lens: torch.Tensor,
                              ring_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """A whole step, before its K/V are stored: q [T, Hq, D], the step's k, v [T, U, D] -> [T, Hq, D].
    Sequence b's q_len rows are the last positions of its seq_len-token context; they attend to what
    the cache held before the step (its first seq_len - q_len positions, sink + ring) plus the
    step's own keys, with the token-exact mask (a chunk's early queries see ring entries its own
    writes will overwrite: attend first, then store). Rows outside every sequence are zeros."""
    num_units, head_dim, page_size = k.shape[1], k.shape[2], k_pool.shape[1]
    out = torch.zeros_like(q)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        start, end = qsl[b], qsl[b + 1]
        if end == start:
            continue
        cached = seq_len - (end - start)  # positions already in the cache
        sink, ring = sink_lens[b][:, None].long(), ring_lens[b][:, None].long()  # [U, 1]
        slots = torch.arange(min(cached, int((sink + ring).max())), device=q.device)[None, :]
        cached_pos = slot_position(slots, sink, ring, cached)  # [U, m]
        # empty slots read slot 0 (written): they may hold NaN, and 0 * NaN survives the mask
        rows = page_rows(block_tables, torch.tensor(b, device=q.device), page_offsets[b][:, None],
                         torch.where(cached_pos >= 0, slots, 0), page_size)
        keys = torch.cat([k_pool.view(-1, head_dim)[rows], k[start:end].transpose(0, 1)], 1)  # [U, m + n, D]
        values = torch.cat([v_pool.view(-1, head_dim)[rows], v[start:end].transpose(0, 1)], 1)
        new_pos = torch.arange(cached, seq_len, device=q.device)
        key_pos = torch.cat([cached_pos, new_pos.expand(num_units, -1)], 1)[:, None]
        q_pos = new_pos[None, :, None]
        visible = (key_pos >= 0) & (key_pos <= q_pos) & ((key_pos < sink[..., None]) | (key_pos > q_pos - ring[..., None]))
        qb = q[start:end].unflatten(1, (num_units, -1)).permute(1, 2, 0, 3)  # [U, G, n, D]
        o = F.scaled_dot_product_attention(qb, keys[:, None].expand(-1, qb.shape[1], -1, -1),
                                           values[:, None].expand(-1, qb.shape[1], -1, -1),
                                           attn_mask=visible[:, None], scale=scale)
        out[start:end] = o.permute(2, 0, 1, 3).flatten(1, 2)
    return out
