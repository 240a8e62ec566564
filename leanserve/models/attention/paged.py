"""Dense paged attention: every layer attends to its whole context (or a sliding window of it)
through the block table. The PyTorch paths, the one dispatch point that sends steps on CUDA to the
Triton kernels in leanserve/kernels (which drop in behind `paged_attention` / `store_kvcache`), and
the PagedAttention layer. Its cache layout is kv_spec.PagedKVSpec."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from typing import TYPE_CHECKING

from leanserve.models.attention.metadata import AttentionMetadata

if TYPE_CHECKING:  # kv_spec imports this module
    from leanserve.models.attention.kv_spec import KVCache


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """Write the step's new K/V [T, Hkv, D] into the paged cache at `slot_mapping` (-1 = skip).
    CUDA: the Triton kernel (one launch, and no mask-indexing host sync, so it can be graph-captured)."""
    if k.is_cuda:
        from leanserve.kernels.kv_cache import (
            store_kvcache as store_kvcache_triton,  # CPU installs may lack Triton
        )
        store_kvcache_triton(k, v, k_cache, v_cache, slot_mapping)
        return
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[valid]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[valid]


def context_slots(block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int, block_size: int
                  ) -> torch.Tensor:
    """[B, max_seq_len] int64: the cache slot of each sequence's context positions, which the
    PyTorch paths gather K/V through. A row's tail past its seq_len repeats the slot of its position
    0, which is written (finite), so a padded gather needs only its scores masked, not its K/V
    (unwritten slots may hold NaN, and 0 * NaN survives a -inf score). No host syncs."""
    pos = torch.arange(max_seq_len, device=block_tables.device)[None, :]
    pos = torch.where(pos < seq_lens[:, None], pos, 0)
    return block_tables.gather(1, pos // block_size).long() * block_size + pos % block_size


def _context_slots(meta: AttentionMetadata) -> torch.Tensor:
    """The step's context slots: precomputed once per step when the model runner filled them."""
    if meta.context_slots is not None:
        return meta.context_slots
    return context_slots(meta.block_tables, meta.seq_lens, meta.max_seq_len, meta.block_size)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, block_size, Hkv, D] at slots [...] -> [..., Hkv, D]. index_select (a
    row copy) ran 1.5-2x faster than advanced indexing on CPU at the tiny model's decode sizes."""
    return cache.flatten(0, 1).index_select(0, slots.flatten()).view(*slots.shape, *cache.shape[2:])


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Reference paged attention for any step (prefill chunks and decodes mixed). q [T, Hq, D] -> [T, Hq, D].

    Sequence b's q_len queries are the last positions of its seq_lens[b]-token context, so query
    i sits at absolute position seq_len - q_len + i and sees keys j <= that position (and, with a
    sliding window W, only j > position - W, transformers' convention). Keys are gathered through
    the step's context slots; only the first seq_len of them are read. Decoding sequences go
    through one batched call; prefilling ones are looped over."""
    qsl = meta.query_start_loc_cpu if meta.query_start_loc_cpu is not None else meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens_cpu if meta.seq_lens_cpu is not None else meta.seq_lens.tolist()
    slots = _context_slots(meta)
    out = torch.zeros_like(q)  # rows of padding tokens (outside every sequence) stay finite
    decodes = [b for b in range(len(seq_lens)) if qsl[b + 1] - qsl[b] == 1]
    if decodes:
        idx = torch.tensor(decodes, device=q.device)
        rows = torch.tensor([qsl[b] for b in decodes], device=q.device)
        longest = max(seq_lens[b] for b in decodes)
        out[rows] = _decode_attention(q[rows], k_cache, v_cache, slots[idx, :longest], meta.seq_lens[idx],
                                      scale, sliding_window)
    for b, seq_len in enumerate(seq_lens):
        start, end = qsl[b], qsl[b + 1]
        q_len = end - start
        if q_len <= 1:
            continue
        k = _gather(k_cache, slots[b, :seq_len])  # [L, Hkv, D]
        v = _gather(v_cache, slots[b, :seq_len])
        windowed = sliding_window is not None and seq_len > sliding_window
        mask = None
        if q_len < seq_len or windowed:  # else plain causal, which lets SDPA pick its fastest kernel
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
            k_pos = torch.arange(seq_len, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if windowed:
                mask &= k_pos > q_pos - sliding_window
        # 4-D inputs: on CUDA, 3-D ones silently fall back to SDPA's slow math kernel
        o = F.scaled_dot_product_attention(q[None, start:end].transpose(1, 2), k[None].transpose(1, 2),
                                           v[None].transpose(1, 2), attn_mask=mask, is_causal=mask is None,
                                           scale=scale, enable_gqa=True)
        out[start:end] = o[0].transpose(0, 1)
    return out


def paged_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 meta: AttentionMetadata, scale: float, sliding_window: int | None = None
                                 ) -> torch.Tensor:
    """Reference paged attention for a pure decode step: every sequence has exactly one new token,
    so sequence b's query is row b (rows past B are padding). No host syncs, so it also runs under
    CUDA graph capture. q [T, Hq, D] -> [T, Hq, D]."""
    num_seqs = meta.block_tables.shape[0]
    out = torch.zeros_like(q)
    out[:num_seqs] = _decode_attention(q[:num_seqs], k_cache, v_cache, _context_slots(meta), meta.seq_lens,
                                       scale, sliding_window)
    return out


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                      seq_lens: torch.Tensor, scale: float, sliding_window: int | None) -> torch.Tensor:
    """One query per sequence, at the last position of its context: q [B, Hq, D] -> [B, Hq, D].
    Contexts are gathered through slots [B, L] (context_slots: padded with written slots) and
    the tail masked in the scores."""
    k = _gather(k_cache, slots)  # [B, L, Hkv, D]
    v = _gather(v_cache, slots)
    k_pos = torch.arange(slots.shape[1], device=q.device)[None, :]
    seq_lens = seq_lens[:, None]
    mask = k_pos < seq_lens  # [B, L]
    if sliding_window is not None:
        mask &= k_pos >= seq_lens - sliding_window
    # one query per sequence: a KV head's group of query heads rides SDPA's query axis (they all
    # see the same keys), so K/V need no GQA expansion; ~30% faster on CPU at the tiny model's sizes
    o = F.scaled_dot_product_attention(q.unflatten(1, (k.shape[2], -1)), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask[:, None, None, :], scale=scale)
    return o.flatten(1, 2)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def uses_triton_decode(head_dim: int, block_size: int) -> bool:
    """Whether attention on CUDA runs the Triton kernels (power-of-2 shapes) rather than the
    PyTorch paths (PagedKVSpec.graphs_capturable says why CUDA graphs follow it)."""
    return _pow2(head_dim) and head_dim >= 16 and _pow2(block_size)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """The one dispatch point for paged attention. On CUDA with power-of-2 head dims and block
    sizes, pure decode steps run the Triton split-K decode kernel and every other step (prefill
    chunks, mixed with decodes) the Triton varlen kernel, each one launch with no host syncs.
    CPU and other shapes take the PyTorch paths."""
    if q.is_cuda and uses_triton_decode(q.shape[-1], meta.block_size):
        # CPU installs may lack Triton
        from leanserve.kernels.paged_attention import paged_decode_attention
        from leanserve.kernels.paged_varlen_attention import paged_varlen_attention
        if meta.max_query_len == 1:
            num_seqs = meta.block_tables.shape[0]
            out = torch.empty_like(q)
            out[num_seqs:].zero_()  # rows past B are padding, zeros as in paged_decode_attention_torch
            paged_decode_attention(q[:num_seqs], k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                   meta.max_seq_len, sliding_window, out=out[:num_seqs])
            return out
        out = torch.zeros_like(q)  # the kernel leaves rows of padding tokens (outside every sequence) alone
        return paged_varlen_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                      scale, sliding_window, out=out)
    if meta.max_query_len == 1:
        return paged_decode_attention_torch(q, k_cache, v_cache, meta, scale, sliding_window)
    return paged_attention_torch(q, k_cache, v_cache, meta, scale, sliding_window)


class PagedAttention(nn.Module):
    """Stores this step's K/V in the layer's paged cache, then attends through it."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq * D]."""
        k_cache, v_cache = kv_cache
        store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, meta, self.scale, self.sliding_window)
        return o.flatten(1)
