"""MoA band + sink attention for a whole step (prefill chunks and decode rows, varlen) over the sink +
ring page pool (layout: moa_reference.py) plus the step's own K/V, as one Triton launch; reference:
moa_prefill_attention_ref. It runs before the step's K/V are stored: a chunk's early queries need
ring entries that the chunk's own tokens will overwrite.

Sequence b's q_len rows are the last positions of its seq_len-token context; c0 = seq_len - q_len
positions are in the cache. Query at position i of KV head u (sink S, ring R) sees key j iff
j <= i and (j < S or j > i - R) (token-exact, the same rule decode follows). A program (query tile of a
sequence, KV head) serves the head's group of query heads and reads
  1. the unit's cached slots (at most S + R; each slot's position follows from c0, moa_reference.slot_position),
  2. the step's keys in the sink, [c0, S),
  3. the step's keys in the tile's band, (first query - R, last query],
so key tiles wholly outside sink and band are never loaded: a short-span head costs O(q_len * R).
The grid and the sequence search are paged_varlen_attention's (sized from T and B: no host sync).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from leanserve.kernels.moa_decode import check_pool_inputs
from leanserve.kernels.paged_varlen_attention import BLOCK_M, BLOCK_N, _first_tile


@triton.jit
def _online_softmax_step(q, k, v, visible, m_i, l_i, acc, scale_log2e, DOT_PRECISION: tl.constexpr):
    """One key tile into the running (max, sum, acc); rows that see nothing yet keep max -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # exp2(-inf - -inf) would be NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _moa_prefill_kernel(
    q_ptr, k_ptr, v_ptr, k_pool_ptr, v_pool_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    page_offsets_ptr, sink_ptr, ring_ptr, num_seqs, scale_log2e,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_kp, stride_ks, stride_bt, stride_ub, stride_uu,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Row r of the tile is query token tile * BLOCK_Q + r // GROUP, head r % GROUP of the group.
    page_offsets, sink, ring share strides (stride_ub, stride_uu)."""
    global_tile = tl.program_id(0)
    unit = tl.program_id(1)
    left = 0
    right = num_seqs
    while left < right:  # the last sequence whose first tile is <= this program's
        mid = (left + right) // 2
        if _first_tile(query_start_loc_ptr, mid, BLOCK_Q) <= global_tile:
            left = mid + 1
        else:
            right = mid
    seq = left - 1
    tile = global_tile - _first_tile(query_start_loc_ptr, seq, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_Q >= q_len:  # a gap between two sequences' tiles, or past the last
        return
    cached = tl.load(seq_lens_ptr + seq) - q_len
    unit_off = seq * stride_ub + unit * stride_uu
    sink = tl.load(sink_ptr + unit_off)
    ring = tl.load(ring_ptr + unit_off)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt + tl.load(page_offsets_ptr + unit_off)

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    i = tile * BLOCK_Q + r // GROUP
    heads = unit * GROUP + r % GROUP
    row_valid = (r // GROUP < BLOCK_Q) & (i < q_len)
    q_pos = cached + i
    token = (q_start + i).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_valid[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # 1. the cache as it was before the step
    num_cached = tl.minimum(cached, sink + ring)
    for start in range(0, num_cached, BLOCK_N):
        slot = start + n
        loaded = slot < num_cached
        pos = tl.where(slot < sink, slot, slot + ((cached - 1 - slot) // ring) * ring)
        page = tl.load(table + slot // PAGE_SIZE, mask=loaded, other=0).to(tl.int64)
        row = page * stride_kp + (slot % PAGE_SIZE) * stride_ks
        k = tl.load(k_pool_ptr + row[:, None] + d[None, :], mask=loaded[:, None], other=0.0)
        v = tl.load(v_pool_ptr + row[:, None] + d[None, :], mask=loaded[:, None], other=0.0)
        visible = loaded[None, :] & ((pos[None, :] < sink) | (pos[None, :] > q_pos[:, None] - ring))
        m_i, l_i, acc = _online_softmax_step(q, k, v, visible, m_i, l_i, acc, scale_log2e, DOT_PRECISION)

    # 2 and 3. the step's own keys: the sink part, then the tile's band (disjoint ranges)
    first_q = cached + tile * BLOCK_Q
    end = cached + tl.minimum((tile + 1) * BLOCK_Q, q_len)  # one past the tile's last query
    sink_end = tl.maximum(cached, tl.minimum(sink, end))
    band_start = tl.maximum(first_q - ring + 1, sink_end)
    for part in tl.static_range(2):
        lo = cached if part == 0 else band_start
        hi = sink_end if part == 0 else end
        for start in range(lo, hi, BLOCK_N):
            pos = start + n
            loaded = pos < hi
            key = (q_start + pos - cached).to(tl.int64)
            k = tl.load(k_ptr + key[:, None] * stride_kt + unit * stride_kh + d[None, :], mask=loaded[:, None], other=0.0)
            v = tl.load(v_ptr + key[:, None] * stride_kt + unit * stride_kh + d[None, :], mask=loaded[:, None], other=0.0)
            visible = (loaded[None, :] & (pos[None, :] <= q_pos[:, None])
                       & ((pos[None, :] < sink) | (pos[None, :] > q_pos[:, None] - ring)))
            m_i, l_i, acc = _online_softmax_step(q, k, v, visible, m_i, l_i, acc, scale_log2e, DOT_PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + token[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def moa_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                          v_pool: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                          block_tables: torch.Tensor, page_offsets: torch.Tensor, sink_lens: torch.Tensor,
                          ring_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                          block_m: int = BLOCK_M, block_n: int = BLOCK_N, num_warps: int = 4,
                          num_stages: int = 2) -> torch.Tensor:
    """q [T, Hq, D], the step's k, v [T, U, D] -> [T, Hq, D] (into `out` if given; rows outside every
    sequence are left alone). page_offsets, sink_lens, ring_lens [B, U] int32 with equal strides
    (slices of one layout are). No host syncs."""
    num_tokens = q.shape[0]
    num_units = k.shape[1]
    page_size, group = check_pool_inputs("moa_prefill_attention", q, k_pool, v_pool, num_units)
    if not page_offsets.stride() == sink_lens.stride() == ring_lens.stride():
        raise ValueError("page_offsets, sink_lens and ring_lens need equal strides")
    if k.stride() != v.stride() or k.stride(-1) != 1:
        raise ValueError("k and v need equal strides and contiguous rows")
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or num_tokens == 0:
        return out
    block_m = max(block_m, 16, triton.next_power_of_2(group))  # tl.dot needs M >= 16; a tile holds a group
    block_q = block_m // group
    _moa_prefill_kernel[(num_tokens // block_q + num_seqs, num_units)](
        q, k, v, k_pool, v_pool, out, query_start_loc, seq_lens, block_tables, page_offsets, sink_lens, ring_lens,
        num_seqs, scale * math.log2(math.e),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k_pool.stride(0), k_pool.stride(1), block_tables.stride(0),
        page_offsets.stride(0), page_offsets.stride(1), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=q.shape[-1], PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages,
    )
    return out

