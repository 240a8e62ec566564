"""MoA decode attention over the sink + ring page pool (layout: moa_reference.py) as a Triton
split-K kernel whose work per KV head is that head's own span; reference: moa_decode_attention_ref.

One query token per sequence (its K/V already stored). Program (sequence, KV head, split) serves the
head's group of query heads and walks slots [split * tokens_per_split, ...) of that unit up to its
valid length; all valid slots are visible to the newest token (sink + ring, order-free). Spans
differ up to ~10x between heads, so splits are sized from the longest and a short head's splits
past its valid length exit at once; the partials merge with paged_attention's reduce kernel.

Bound: bytes = sum over sequences and units of valid_len * D * 2 (K, V) * dtype_bytes, i.e. the
plan's density times dense GQA's, at the same copy bandwidth.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from leanserve.kernels import num_sms
from leanserve.kernels.paged_attention import BLOCK_N, _reduce_splits_kernel, _split_plan, num_kv_splits


@triton.jit
def _moa_decode_kernel(
    q_ptr, k_pool_ptr, v_pool_ptr, block_tables_ptr, page_offsets_ptr, valid_lens_ptr,
    out_ptr, part_out_ptr, part_m_ptr, part_l_ptr, scale_log2e, tokens_per_split, table_width,
    stride_qb, stride_qh, stride_kp, stride_ks, stride_bt, stride_pb, stride_pu, stride_vb, stride_vu,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax in base 2 (scale folded with log2 e). Without SPLIT it writes the normalised
    output; with it, unnormalised partials + (max, sum): an empty split leaves weight 0."""
    seq = tl.program_id(0)
    unit = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    num_heads = tl.num_programs(1) * GROUP

    valid = tl.load(valid_lens_ptr + seq * stride_vb + unit * stride_vu)
    first_page = tl.load(page_offsets_ptr + seq * stride_pb + unit * stride_pu)
    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, valid)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    heads = unit * GROUP + g
    head_mask = g < GROUP
    # the group is padded to >= 16 rows because tl.dot needs M >= 16; padding rows are zero queries
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=head_mask[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        slot = start + n
        loaded = slot < hi
        # masked loads: slots past valid_len are empty or another request's (never attended). Columns
        # are clamped into the row and pages to >= 0, as moa_reference.page_rows does: a CUDA-graph
        # padding row is [PAD_BLOCK, -1, ...] and its units start past column 0, so unclamped it reads
        # page -1, before the pool (an illegal address on an H100 once the pool was ~50 GB)
        col = tl.minimum(first_page + slot // PAGE_SIZE, table_width - 1)
        page = tl.maximum(tl.load(row_ptr + col, mask=loaded, other=0), 0).to(tl.int64)
        row = page * stride_kp + (slot % PAGE_SIZE) * stride_ks
        k = tl.load(k_pool_ptr + row[:, None] + d[None, :], mask=loaded[:, None], other=0.0)
        v = tl.load(v_pool_ptr + row[:, None] + d[None, :], mask=loaded[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        s = tl.where(loaded[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    if SPLIT:
        part = (seq * num_heads + heads) * num_splits + split
        tl.store(part_m_ptr + part, m_i, mask=head_mask)
        tl.store(part_l_ptr + part, l_i, mask=head_mask)
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=head_mask[:, None])
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])


def check_pool_inputs(kernel: str, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, num_units: int
                      ) -> tuple[int, int]:
    """ValueError for shapes the MoA Triton kernels do not take; -> (page size, query heads per KV
    head). q [..., Hq, D]; pools [num_pages, P, D]."""
    num_heads, head_dim = q.shape[-2:]
    page_size = k_pool.shape[1]
    if head_dim < 16 or head_dim & (head_dim - 1) or page_size & (page_size - 1):
        raise ValueError(f"{kernel} needs a power-of-2 head_dim >= 16 and page size, got {head_dim}, {page_size}")
    if q.dtype != k_pool.dtype or k_pool.dtype != v_pool.dtype:
        raise ValueError(f"q, k_pool, v_pool dtypes differ: {q.dtype}, {k_pool.dtype}, {v_pool.dtype}")
    if num_heads % num_units:
        raise ValueError(f"num_heads {num_heads} is not a multiple of the {num_units} KV heads")
    if k_pool.stride() != v_pool.stride() or k_pool.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("k_pool and v_pool need equal strides, and q, k/v rows must be contiguous")
    return page_size, num_heads // num_units


def moa_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                         page_offsets: torch.Tensor, valid_lens: torch.Tensor, scale: float, max_valid: int,
                         out: torch.Tensor | None = None, num_splits: int | None = None, block_n: int = BLOCK_N,
                         num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hq, D] (into `out` if given); page_offsets, valid_lens [B, U] int32 (any
    strides), valid_lens >= 1. max_valid: a host int >= every valid_len, which sizes the splits
    without a device sync, so the call can be graph-captured. num_splits overrides the heuristic."""
    num_seqs, num_heads, head_dim = q.shape
    num_units = valid_lens.shape[1]
    page_size, group = check_pool_inputs("moa_decode_attention", q, k_pool, v_pool, num_units)
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = num_kv_splits(num_seqs, num_units, max_valid, num_sms(q.device), block_n)
    num_splits, tokens_per_split = _split_plan(max_valid, num_splits, block_n)
    split = num_splits > 1
    if split:
        part_m = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_out = out  # unused
    _moa_decode_kernel[(num_seqs, num_units, num_splits)](
        q, k_pool, v_pool, block_tables, page_offsets, valid_lens, out, part_out, part_m, part_l,
        scale * math.log2(math.e), tokens_per_split, block_tables.shape[1],
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), block_tables.stride(0),
        page_offsets.stride(0), page_offsets.stride(1), valid_lens.stride(0), valid_lens.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        BLOCK_N=block_n, SPLIT=split, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        _reduce_splits_kernel[(num_seqs, num_heads)](
            part_out, part_m, part_l, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4,
        )
    return out
