"""Paged attention for a whole flattened step (prefill chunks and decode rows mixed, varlen) over the
paged KV cache, as one Triton flash-attention-style launch, with its PyTorch reference beside it.

Layout: q, out [T, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; query_start_loc [B+1]
int32 (sequence b owns rows query_start_loc[b]:query_start_loc[b+1]); seq_lens [B] int32 (context
length after the step); block_tables [B, max_blocks] int32 (-1 padded). Sequence b's q_len queries
are the last positions of its context: query i sits at p = seq_len - q_len + i and sees keys
j <= p (with a sliding window W, only j > p - W, transformers' convention).

Bound. For a prefill chunk of n new tokens after c cached ones (causal, no window):
    FLOPs = 4 * Hq * D * sum_i (c + i + 1) ~= 4 * Hq * D * n * (c + n / 2)   (QK^T and PV)
    bytes >= (2 * n * Hq * D + 2 * (c + n) * Hkv * D) * dtype_bytes         (q, out; K, V once)
    time  >= max(FLOPs / peak matmul, bytes / copy bandwidth)
e.g. Llama-3-8B (Hq 32, Hkv 8, D 128, bf16), a 2048-token chunk with no prefix: 34 GFLOP per layer,
~43 us at ~790 TFLOP/s, against 42 MB, ~9 us at ~4.8 TB/s: compute-bound; the kernel re-reads a
sequence's K/V once per query tile, from L2 mostly. Decode rows (n = 1) are bandwidth-bound like
the split-K decode kernel's, but here one program walks a row's whole context (no split).

Programs: (query tile of a sequence, KV head). A tile's BLOCK_M rows are BLOCK_M // GROUP query
tokens x the GROUP query heads sharing the KV head, so each K/V tile loaded serves every head of
the group, and decode rows still fill GROUP rows of the dot. The grid is sized from T and B alone
(host ints, so the launch needs no device sync and can be graph-captured); each program finds its
sequence by a binary search over query_start_loc, so a long chunk batched with many decodes costs
~T / BLOCK_Q + B programs, not max_query_len / BLOCK_Q x B (the scheme of vLLM's unified Triton
attention).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from leanserve.kernels.paged_attention import check_paged_inputs

BLOCK_M = 64             # query rows (tokens x heads of a group) per program
BLOCK_N = 64             # context tokens per loop iteration (gathered across cache blocks)
NO_WINDOW = 2**31 - 1    # a window no context reaches, so the kernel needs no "windowed?" branch


@triton.jit
def _first_tile(query_start_loc_ptr, seq, BLOCK_Q: tl.constexpr):
    """Where sequence seq's query tiles start in the grid: query_start_loc // BLOCK_Q + seq. It
    grows by >= cdiv(q_len, BLOCK_Q) per sequence, so sequences' tile ranges never overlap, and
    the grid needs only T // BLOCK_Q + B programs per KV head (gaps exit at once)."""
    return tl.load(query_start_loc_ptr + seq) // BLOCK_Q + seq


@triton.jit
def _paged_varlen_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    num_seqs, scale_log2e, window,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax in base 2 (scale folded with log2 e); writes the normalised output rows.
    Row r of the tile is query token tile * BLOCK_Q + r // GROUP, head r % GROUP of the group."""
    global_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    # binary search: the last sequence whose first tile is <= this program's
    left = 0
    right = num_seqs
    while left < right:
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
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # absolute position of the sequence's first query

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    i = tile * BLOCK_Q + r // GROUP  # query index within the sequence
    heads = kv_head * GROUP + r % GROUP
    row_valid = (r // GROUP < BLOCK_Q) & (i < q_len)
    q_pos = first_pos + i
    token = (q_start + i).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_valid[:, None], other=0.0)

    # the keys any row of this tile sees: [lowest query pos - window + 1, highest query pos]
    last_pos = first_pos + tl.minimum((tile + 1) * BLOCK_Q, q_len) - 1
    lo = tl.maximum(first_pos + tile * BLOCK_Q - window + 1, 0)
    hi = last_pos + 1

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        pos = start + n
        loaded = (pos >= lo) & (pos < hi)
        # masked loads, not just masked scores: slots outside the context may hold NaN (0 * NaN)
        block = tl.load(table + pos // BLOCK_SIZE, mask=loaded, other=0).to(tl.int64)
        kv_row = block * stride_kb + (pos % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
        k = tl.load(k_cache_ptr + kv_row[:, None] + d[None, :], mask=loaded[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_row[:, None] + d[None, :], mask=loaded[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        visible = (loaded[None, :] & (pos[None, :] <= q_pos[:, None])
                   & (pos[None, :] > q_pos[:, None] - window))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row can see nothing yet (its window starts in a later tile): keep its max at -inf
        # but subtract 0, so exp2 gives 0 rather than exp2(-inf + inf) = NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + token[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def paged_varlen_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                           scale: float, sliding_window: int | None = None, out: torch.Tensor | None = None, block_m: int = BLOCK_M, block_n: int = BLOCK_N,
                           num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D], written into `out` if given. Rows outside every sequence
    (past query_start_loc[B]) are left untouched. No host syncs. block_m / block_n / num_warps /
    num_stages are tuning knobs."""
    num_tokens, _, head_dim = q.shape
    block_size, num_kv_heads, group = check_paged_inputs("paged_varlen_attention", q, k_cache, v_cache)
    if out is None:
        out = torch.empty_like(q)
    if out.stride(-1) != 1:
        raise ValueError("out rows must be contiguous")
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or num_tokens == 0:
        return out

    block_m = max(block_m, 16, triton.next_power_of_2(group))  # tl.dot needs M >= 16; a tile holds a group
    block_q = block_m // group  # query tokens per tile
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _paged_varlen_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, num_seqs,
        scale * math.log2(math.e), NO_WINDOW if sliding_window is None else sliding_window,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def paged_varlen_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                               scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Reference: per sequence, gather its context through the block table and apply the causal
    (and window) mask explicitly, fp32 softmax. Rows outside every sequence are zeros."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    window = sliding_window if sliding_window is not None else NO_WINDOW
    out = torch.zeros_like(q)
    qsl = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        start, end = qsl[b], qsl[b + 1]
        pos = torch.arange(seq_len, device=q.device)
        blocks = block_tables[b, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)[:, None]
        visible = (pos[None, :] <= q_pos) & (pos[None, :] > q_pos - window)  # [n, L]
        scores = torch.einsum("nhd,lhd->hnl", q[start:end].float(), k) * scale
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[start:end] = torch.einsum("hnl,lhd->nhd", probs, v).to(q.dtype)
    return out
