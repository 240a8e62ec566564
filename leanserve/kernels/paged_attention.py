"""Paged decode attention (one query token per sequence) over the paged KV cache, as a Triton
split-K ("flash-decoding") kernel, with its PyTorch reference beside it.

Layout: q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks]
int32 (-1 padded); seq_lens [B] int32 (context length including the current token).

Bound. Decode attention does O(1) FLOPs per byte, so it is limited by reading the cache:
    bytes = sum_b seq_len_b * Hkv * D * 2 (K and V) * dtype_bytes   (+ q, out: negligible)
    time >= bytes / copy bandwidth
e.g. Llama-3-8B (Hkv 8, D 128, bf16) reads 4 KiB per token per layer: batch 64 x 4k context =
1.07 GB, ~0.36 ms at an H100's ~3 TB/s. The kernel reads each K/V row exactly once: one program
serves a (sequence, KV head) pair's whole group of query heads, and split-K spreads long contexts
over enough programs to keep every SM streaming.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from leanserve.kernels import num_sms

BLOCK_N = 64             # context tokens per loop iteration (gathered across cache blocks)
MIN_TILES_PER_SPLIT = 4  # shorter splits would spend more on partials and the reduce than they win
MAX_SPLITS = 64
WAVES = 4                # programs per SM to aim for: enough to hide the tail of ragged batches
NO_WINDOW = 2**31 - 1    # a window no context reaches, so the kernel needs no "windowed?" branch


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_m_ptr, part_l_ptr,
    scale_log2e, window, tokens_per_split,
    stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: sequence x KV head x split. Online softmax in base 2 (scale folded with log2 e).
    Without SPLIT it writes the normalised output; with it, unnormalised partials + (max, sum)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    num_heads = tl.num_programs(1) * GROUP

    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_start = tl.maximum(seq_len - window, 0)
    # splits tile the (windowed) context from a BLOCK_N-aligned start, so every loop tile below
    # holds at least one visible token and the running max is finite after the first one
    lo = (ctx_start // BLOCK_N) * BLOCK_N + split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + g
    head_mask = g < GROUP
    # the group is padded to >= 16 rows because tl.dot needs M >= 16; padding rows are zero queries
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=head_mask[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        pos = start + n
        visible = (pos < seq_len) & (pos >= ctx_start)
        # masked loads, not just masked scores: slots past seq_len may hold NaN garbage (0 * NaN)
        block = tl.load(table + pos // BLOCK_SIZE, mask=visible, other=0).to(tl.int64)
        row = block * stride_kb + (pos % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=visible[:, None], other=0.0)
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=visible[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    if SPLIT:
        # an empty split (context shorter than its range) leaves m = -inf, l = 0, acc = 0: weight 0
        part = (seq * num_heads + heads) * num_splits + split
        tl.store(part_m_ptr + part, m_i, mask=head_mask)
        tl.store(part_l_ptr + part, l_i, mask=head_mask)
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=head_mask[:, None])
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # empty context (padding row): zeros
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])


@triton.jit
def _reduce_splits_kernel(
    part_out_ptr, part_m_ptr, part_l_ptr, out_ptr, num_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """One program per (sequence, query head): merge the splits with the log-sum-exp rule
    out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, M = max_s m_s."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    part = (seq * tl.num_programs(1) + head) * num_splits + s
    mask = s < num_splits
    m = tl.load(part_m_ptr + part, mask=mask, other=float("-inf"))
    l = tl.load(part_l_ptr + part, mask=mask, other=0.0)
    acc = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=mask[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty splits: 2^-inf = 0
    l_sum = tl.sum(w * l, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(l_sum == 0.0, 1.0, l_sum)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def num_kv_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                  block_n: int = BLOCK_N) -> int:
    """How many splits of the context: enough (sequence, KV head, split) programs for WAVES per SM,
    but each split at least MIN_TILES_PER_SPLIT tiles long. Short contexts and big batches get 1."""
    wanted = -(-WAVES * num_sms // (num_seqs * num_kv_heads))
    longest = max(1, max_seq_len // (block_n * MIN_TILES_PER_SPLIT))
    return _split_plan(max_seq_len, max(1, min(wanted, longest, MAX_SPLITS)), block_n)[0]


def _split_plan(span: int, num_splits: int, block_n: int) -> tuple[int, int]:
    """(splits, tokens per split) covering `span` tokens in whole tiles; rounding each split up to
    whole tiles can leave fewer splits than asked."""
    tiles = max(1, -(-span // block_n))
    tiles_per_split = -(-tiles // num_splits)
    return -(-tiles // tiles_per_split), tiles_per_split * block_n



def check_paged_inputs(kernel: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
                       ) -> tuple[int, int, int]:
    """ValueError for shapes the paged Triton kernels do not take; -> (block_size, num_kv_heads,
    query heads per KV head). q [..., Hq, D]; caches [num_blocks, block_size, Hkv, D]."""
    num_heads, head_dim = q.shape[-2:]
    _, block_size, num_kv_heads, _ = k_cache.shape
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"{kernel} needs a power-of-2 head_dim >= 16, got {head_dim}")
    if block_size & (block_size - 1):
        raise ValueError(f"{kernel} needs a power-of-2 block_size, got {block_size}")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need equal strides, and q, k/v rows must be contiguous")
    return block_size, num_kv_heads, num_heads // num_kv_heads


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_seq_len: int,
                           sliding_window: int | None = None, out: torch.Tensor | None = None,
                           num_splits: int | None = None, block_n: int = BLOCK_N, num_warps: int = 4,
                           num_stages: int = 2) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hq, D] (written into `out` if given). Sequence b attends to its first
    seq_lens[b] cached tokens (the last `sliding_window` of them, if set). max_seq_len is a host int
    >= every seq_len: it sizes the splits without a device sync (so the call can be graph-captured).
    num_splits overrides the heuristic (tests); block_n / num_warps / num_stages are tuning knobs."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads, group = check_paged_inputs("paged_decode_attention", q, k_cache, v_cache)
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out

    span = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window + block_n)
    if num_splits is None:
        num_splits = num_kv_splits(num_seqs, num_kv_heads, span, num_sms(q.device), block_n)
    num_splits, tokens_per_split = _split_plan(span, num_splits, block_n)
    split = num_splits > 1
    if split:
        part_m = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_out = out  # unused

    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_m, part_l,
        scale * math.log2(math.e), NO_WINDOW if sliding_window is None else sliding_window, tokens_per_split,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, SPLIT=split,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        _reduce_splits_kernel[(num_seqs, num_heads)](
            part_out, part_m, part_l, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4,
        )
    return out


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               sliding_window: int | None = None) -> torch.Tensor:
    """Reference: gather each sequence's visible tokens through its block table, fp32 softmax."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    for b, seq_len in enumerate(seq_lens.tolist()):
        start = 0 if sliding_window is None else max(0, seq_len - sliding_window)
        pos = torch.arange(start, seq_len, device=q.device)
        blocks = block_tables[b, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)
        probs = (torch.einsum("hd,lhd->hl", q[b].float(), k) * scale).softmax(-1)
        out[b] = torch.einsum("hl,lhd->hd", probs, v).to(q.dtype)
    return out
