"""Store a step's new K/V into MoA's sink + ring pages in one Triton launch (moa_reference.moa_store_kv is
its PyTorch reference and the CPU path).

One program per (token, KV head): it keeps the token's K/V if write[t] and the position is still in that
unit's cache at the step's end (p < S or p >= seq_len - R, so a chunk longer than the ring writes each
slot once), at slot p (sink) or S + (p - S) mod R (ring), in the page the unit's block-table columns give.
What it drops it skips: the reference sends it to a trash page instead, to keep static shapes without a
kernel. Per layer this is one launch where the reference is ~12 small ones (gathers, the keep rule, the
page lookup, two index_copy_), which a decode step pays in every layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _moa_store_kernel(
    k_ptr, v_ptr, k_pool_ptr, v_pool_ptr, block_tables_ptr, page_offsets_ptr, sink_ptr, ring_ptr,
    token_seq_ptr, positions_ptr, seq_lens_ptr, write_ptr, table_width,
    stride_kt, stride_ku, stride_vt, stride_vu, stride_kp, stride_ks, stride_bt, stride_ub, stride_uu,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    unit = tl.program_id(1)
    if tl.load(write_ptr + token) == 0:
        return
    seq = tl.load(token_seq_ptr + token)
    pos = tl.load(positions_ptr + token)
    unit_off = seq * stride_ub + unit * stride_uu
    sink = tl.load(sink_ptr + unit_off)
    ring = tl.load(ring_ptr + unit_off)
    if (pos >= sink) & (pos < tl.load(seq_lens_ptr + seq) - ring):
        return  # overwritten later in this same step: the reference stores it into the trash page
    slot = tl.where(pos < sink, pos, sink + (pos - sink) % tl.maximum(ring, 1))
    # columns clamped into the row and pages to >= 0, as moa_reference.page_rows does
    col = tl.minimum(tl.load(page_offsets_ptr + unit_off) + slot // PAGE_SIZE, table_width - 1)
    page = tl.maximum(tl.load(block_tables_ptr + seq.to(tl.int64) * stride_bt + col), 0).to(tl.int64)
    d = tl.arange(0, HEAD_DIM_PAD)
    mask = d < HEAD_DIM
    dst = page * stride_kp + (slot % PAGE_SIZE) * stride_ks + d
    k = tl.load(k_ptr + token.to(tl.int64) * stride_kt + unit * stride_ku + d, mask=mask)
    v = tl.load(v_ptr + token.to(tl.int64) * stride_vt + unit * stride_vu + d, mask=mask)
    tl.store(k_pool_ptr + dst, k.to(k_pool_ptr.dtype.element_ty), mask=mask)
    tl.store(v_pool_ptr + dst, v.to(v_pool_ptr.dtype.element_ty), mask=mask)


def moa_store_kv(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                 block_tables: torch.Tensor, page_offsets: torch.Tensor, sink_lens: torch.Tensor,
                 ring_lens: torch.Tensor, token_seq: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
                 write: torch.Tensor) -> None:
    """k, v [T, U, D] (rows contiguous, any token and head strides) into the pools [num_pages, P, D];
    page_offsets, sink_lens, ring_lens [B, U] (this layer's, equal strides); token_seq, positions [T];
    write [T] bool. No host sync: graph-capturable."""
    num_tokens, num_units, head_dim = k.shape
    if v.shape != k.shape or k_pool.shape != v_pool.shape or k_pool.shape[2] != head_dim:
        raise ValueError(f"shape mismatch: k {tuple(k.shape)}, v {tuple(v.shape)}, pools {tuple(k_pool.shape)}")
    if k_pool.stride() != v_pool.stride() or k_pool.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k_pool and v_pool need equal strides, and k, v and pool rows must be contiguous")
    if not page_offsets.stride() == sink_lens.stride() == ring_lens.stride():
        raise ValueError("page_offsets, sink_lens and ring_lens need equal strides")
    if num_tokens == 0:
        return
    _moa_store_kernel[(num_tokens, num_units)](
        k, v, k_pool, v_pool, block_tables, page_offsets, sink_lens, ring_lens, token_seq, positions, seq_lens,
        write, block_tables.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_pool.stride(0), k_pool.stride(1),
        block_tables.stride(0), page_offsets.stride(0), page_offsets.stride(1),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), PAGE_SIZE=k_pool.shape[1],
    )
