"""Fused MoE++ layer forward in Triton (serving and benchmarks); moepp_reference.py is its oracle.

Six launches (five for decode), no host sync, every buffer sized from T alone, so the whole layer is
CUDA-graph capturable (a graph captured with one routing replays correctly with any other, all-ZC
included):

- K0 router GEMM (`_router_gemm_kernel`): x W_r^T and the constant experts' W_c x in one pass over x
  (read in its own dtype; no fp32 copy), split over D when there are few token blocks (decode: one
  program would read the whole router alone). fp32-exact products: bf16 x times the fp32 weight
  split into three bf16 parts (tensor cores); fp32 x: IEEE fp32 dots.
- K1 route (`_route_kernel`, one program per BLOCK_T tokens; N <= 64 so a row fits in registers):
  sums K0's partials in split order, + prev_logits W_g^T (gating residual), writes logits;
  std-normalise, softmax, top-k, renormalise; writes ids [T, k], gates [T, k], the ZC rank
  update's s [T] and b [T, n_const], and for the alignment each block's FFN-expert counts and each
  slot's rank among its block's slots of the same expert.
- K2 align (`_align_kernel`, FFN slots only; ZC slots are neither counted nor sorted): every
  program sums the per-block counts (total and before its block), so offsets need no separate
  scan launch; each expert's rows are padded to BLOCK_M; slots are scattered to
  sorted_slots[expert start + earlier blocks' count + rank] (stable: slot order within an
  expert); program 0 writes each expert's padded end and the sentinel T*k into padding rows.
  The buffer has the worst case T*k + n_ffn*(BLOCK_M - 1) rows; GEMM programs past the last
  expert's end exit at once, so all-ZC routing runs empty grids.
  Decode fast path (T*k*4 <= n_ffn, vLLM PR #39016): no K2; GEMM program m serves slot m alone
  and exits when that slot is ZC.
- K3 GEMM1 (`_gemm1_kernel`): per (row block, I tile) with grouped ordering for L2 reuse; rows
  slot // k of x are gathered inside the tile load (no permuted copy of x); two fp32
  accumulators (gate and up rows of the same I tile); writes h = SiLU(gate) * up [T*k, I] by slot.
- K4 GEMM2 (`_gemm2_kernel`): h rows by slot @ w2[e]^T, times the slot's gate in the epilogue,
  writes out_slot [T*k, D] for valid FFN slots only.
- K5 combine (`_combine_kernel`, deterministic, no atomics): y[t] = sum over t's FFN slots of
  out_slot + s[t] x[t] + sum_c b[t, c] v_c; ZC slots' out_slot rows are never read (they are
  never written). Plain MoE is the same kernel with no ZC experts.

Bounds (H200: ~4.25 TB/s measured device copy, ~790 TFLOP/s dense bf16; the paper's 7B layer
D 1536, I 4096, 16 FFN experts, top-2; one expert = 3*D*I*2 B = 37.7 MB bf16):
- decode is weight-bandwidth bound: time >= distinct experts touched * 37.7 MB / bandwidth, with
  E*(1 - (1 - p/E)^(T*k)) experts touched for uniform routing and FFN-slot share p. T = 1, p = 1:
  2 experts = 75.5 MB -> 17.6 us; T = 8: 10.3 experts -> 90 us; T = 64: all 16 (604 MB) -> 140 us,
  whatever p > 0.3 (savings need ZC picks to leave whole experts untouched).
- prefill is compute bound: 2*3*D*I = 37.7 MFLOP per FFN slot, so T*k*p*37.7 MFLOP / 790 TFLOP/s:
  T = 2048, p = 1: 155 GFLOP -> 196 us; T = 32768: 2.47 TFLOP -> 3.1 ms. The ridge (weights read
  once = compute) is at T*p ~ 1500 tokens. h's round trip (T*k*p*I*2 B written and read) adds
  ~8% at large T; routing + align + combine are the fixed cost that does not shrink with p.
Measured there (kernel time, default tiles, p = 1): T = 1: 45 us (GEMMs 35 us = 2.2 TB/s; routing
8.5 us); T = 64: 169 us (GEMMs 154 us = 3.9 TB/s); T = 32768: 4.75 ms (GEMMs 4.42 ms = 70% of the
bf16 peak; routing + align + combine 0.35 ms at any p).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from leanserve.kernels.moepp_reference import MoEPPLayout

RENORM_CODES = {"released": 0, "paper": 1, "mixtral": 2}
MAX_EXPERTS = 64  # a router row lives in registers
BLOCK_T = 32      # tokens per route / align / combine program
ROUTE_BLOCK_D = 64
# the router GEMM's products: "ieee" = exact fp32 (the reference's routing, near-ties included)
ROUTE_PRECISION = "ieee"


# ---- K0 router GEMM, K1 route ------------------------------------------------------------------------

@triton.jit
def _split_dot(x, w, acc, SPLIT_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """acc + x @ w for fp32 w with fp32-exact products. bf16 x: w = hi + mid + lo in bf16 (24 mantissa
    bits, as fp32 has), three tensor-core dots whose bf16 x bf16 products are exact in fp32; fp32 x:
    one dot at PRECISION."""
    if SPLIT_BF16:
        hi = w.to(tl.bfloat16)
        rest = w - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(x, lo, acc)
        acc = tl.dot(x, mid, acc)
        return tl.dot(x, hi, acc)
    return tl.dot(x.to(tl.float32), w, acc, input_precision=PRECISION)


@triton.jit
def _router_gemm_kernel(
    x_ptr, router_ptr, cgate_ptr, part_ptr, cpart_ptr, num_tokens, dim, stride_x, dim_per_split,
    N: tl.constexpr, N_CONST: tl.constexpr, NP: tl.constexpr, CP: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, SPLIT_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (i, s): x W_r^T and x W_c^T of tokens block i over D-split s (decode has one token
    block: splitting D keeps the router read off one SM), fp32 partials [split, T, NP | CP]."""
    pid, split = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < num_tokens
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, NP)
    ccols = tl.arange(0, CP)
    acc = tl.zeros((BLOCK_T, NP), tl.float32)
    cacc = tl.zeros((BLOCK_T, CP), tl.float32)
    d_end = tl.minimum(dim, (split + 1) * dim_per_split)
    for d0 in range(split * dim_per_split, d_end, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < d_end
        xt = tl.load(x_ptr + rows64[:, None] * stride_x + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        w = tl.load(router_ptr + cols[None, :] * dim + d[:, None], mask=(cols < N)[None, :] & dmask[:, None],
                    other=0.0).to(tl.float32)
        acc = _split_dot(xt, w, acc, SPLIT_BF16, PRECISION)
        if N_CONST > 0:
            wc = tl.load(cgate_ptr + ccols[None, :] * dim + d[:, None],
                         mask=(ccols < 2 * N_CONST)[None, :] & dmask[:, None], other=0.0).to(tl.float32)
            cacc = _split_dot(xt, wc, cacc, SPLIT_BF16, PRECISION)
    out = (split * num_tokens + rows64)[:, None]
    tl.store(part_ptr + out * NP + cols[None, :], acc, mask=rmask[:, None])
    if N_CONST > 0:
        tl.store(cpart_ptr + out * CP + ccols[None, :], cacc, mask=rmask[:, None])


@triton.jit
def _route_kernel(
    part_ptr, cpart_ptr, prev_ptr, gmap_ptr, forced_ptr,
    logits_ptr, ids_ptr, gates_ptr, s_ptr, b_ptr, rank_ptr, counts_ptr,
    num_tokens, norm_std, eps,
    N: tl.constexpr, N_FFN: tl.constexpr, N_CONST: tl.constexpr, FIRST_COPY: tl.constexpr,
    FIRST_ZERO: tl.constexpr, TOP_K: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr, CP: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_T: tl.constexpr, HAS_PREV: tl.constexpr, NORM: tl.constexpr,
    RENORM: tl.constexpr, FORCED: tl.constexpr, COUNT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < num_tokens
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, NP)
    cmask = cols < N
    ccols = tl.arange(0, CP)
    kcols = tl.arange(0, KP)

    # K0's D-split partials, summed in split order (deterministic); unrolled, so the loads overlap
    acc = tl.zeros((BLOCK_T, NP), tl.float32)
    cacc = tl.zeros((BLOCK_T, CP), tl.float32)
    for split in tl.static_range(SPLITS):
        out = (split * num_tokens + rows64)[:, None]
        acc += tl.load(part_ptr + out * NP + cols[None, :], mask=rmask[:, None], other=0.0)
        if N_CONST > 0:
            cacc += tl.load(cpart_ptr + out * CP + ccols[None, :], mask=rmask[:, None], other=0.0)
    if HAS_PREV:  # + prev_logits @ gate_map^T
        kk = tl.arange(0, NP)
        prev = tl.load(prev_ptr + rows64[:, None] * N + kk[None, :], mask=rmask[:, None] & (kk < N)[None, :],
                       other=0.0)
        gmap = tl.load(gmap_ptr + cols[None, :] * N + kk[:, None], mask=cmask[None, :] & (kk < N)[:, None],
                       other=0.0)
        acc = tl.dot(prev, gmap, acc, input_precision=PRECISION)
    tl.store(logits_ptr + rows64[:, None] * N + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])

    z = acc
    if NORM:  # logits / (unbiased std + eps) * norm_std
        mean = tl.sum(tl.where(cmask[None, :], acc, 0.0), axis=1) / N
        dev = tl.where(cmask[None, :], acc - mean[:, None], 0.0)
        std = tl.sqrt(tl.sum(dev * dev, axis=1) / (N - 1))
        z = acc / (std + eps)[:, None] * norm_std
    z = tl.where(cmask[None, :], z, float("-inf"))
    e = tl.exp(z - tl.max(z, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]

    # top-k (ties: the smallest expert index), or the forced ids of benchmarks and tests
    sel_ids = tl.zeros((BLOCK_T, KP), tl.int32)
    sel_p = tl.zeros((BLOCK_T, KP), tl.float32)
    counts = tl.zeros((BLOCK_T, NP), tl.int32)  # [t, e] = 1 if token t has an FFN slot on expert e
    pw = tl.where(cmask[None, :], p, -1.0)
    for j in tl.static_range(TOP_K):
        if FORCED:
            idx = tl.load(forced_ptr + rows64 * TOP_K + j, mask=rmask, other=0)
            best = tl.sum(tl.where(cols[None, :] == idx[:, None], p, 0.0), axis=1)
        else:
            best = tl.max(pw, axis=1)
            idx = tl.min(tl.where(pw == best[:, None], cols[None, :], NP), axis=1)
            pw = tl.where(cols[None, :] == idx[:, None], -1.0, pw)
        sel_ids = tl.where(kcols[None, :] == j, idx[:, None], sel_ids)
        sel_p = tl.where(kcols[None, :] == j, best[:, None], sel_p)
        counts += ((cols[None, :] == idx[:, None]) & (idx < N_FFN)[:, None] & rmask[:, None]).to(tl.int32)
    kmask = kcols[None, :] < TOP_K

    if RENORM == 0:  # released: zero experts' gates dropped, the rest sum to 1 (all zero: stays 0)
        g = tl.where(kmask & (sel_ids < FIRST_ZERO), sel_p, 0.0)
        total = tl.sum(g, axis=1)
        # correctly rounded: (FFN, zero) and (copy, zero) get exactly 1.0 (approximate division gives 1 + ulp)
        g = tl.math.div_rn(g, tl.where(total > 0, total, 1.0)[:, None])
    elif RENORM == 1:  # paper: raw probabilities
        g = tl.where(kmask, sel_p, 0.0)
    else:  # mixtral: softmax over the k selected logits == p / sum of the selected p
        g = tl.where(kmask, sel_p, 0.0)
        g = tl.math.div_rn(g, tl.sum(g, axis=1)[:, None])
    slot_off = rows64[:, None] * TOP_K + kcols[None, :]
    smask = rmask[:, None] & kmask
    tl.store(ids_ptr + slot_off, sel_ids, mask=smask)
    tl.store(gates_ptr + slot_off, g, mask=smask)

    # the ZC rank update: copy slots add g to s; constant expert c adds g*a1 to s and g*a2 to b_c
    s = tl.sum(tl.where(kmask & (sel_ids >= FIRST_COPY) & (sel_ids < FIRST_ZERO), g, 0.0), axis=1)
    for c in tl.static_range(N_CONST):
        g_c = tl.sum(tl.where(kmask & (sel_ids == N_FFN + c), g, 0.0), axis=1)
        l0 = tl.sum(tl.where(ccols[None, :] == 2 * c, cacc, 0.0), axis=1)
        l1 = tl.sum(tl.where(ccols[None, :] == 2 * c + 1, cacc, 0.0), axis=1)
        m = tl.maximum(l0, l1)
        e0, e1 = tl.exp(l0 - m), tl.exp(l1 - m)
        s += g_c * (e0 / (e0 + e1))
        tl.store(b_ptr + rows64 * N_CONST + c, g_c * (e1 / (e0 + e1)), mask=rmask)
    tl.store(s_ptr + rows, s, mask=rmask)

    if COUNT:  # for K2: the block's count per expert, each slot's rank in the block among its expert's
        # slots (a token holds an expert at most once, so ranks follow token order)
        before = tl.cumsum(counts, axis=0) - counts
        rank = tl.zeros((BLOCK_T, KP), tl.int32)
        for j in tl.static_range(TOP_K):
            idx = tl.sum(tl.where(kcols[None, :] == j, sel_ids, 0), axis=1)
            r = tl.sum(tl.where(cols[None, :] == idx[:, None], before, 0), axis=1)
            rank = tl.where(kcols[None, :] == j, r[:, None], rank)
        tl.store(rank_ptr + slot_off, rank, mask=smask)
        tl.store(counts_ptr + pid * NP + cols, tl.sum(counts, axis=0))


# ---- K2 align ---------------------------------------------------------------------------------------

@triton.jit
def _align_kernel(
    ids_ptr, rank_ptr, counts_ptr, sorted_ptr, ends_ptr, num_tokens, num_blocks,
    N_FFN: tl.constexpr, TOP_K: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr, SCAN_ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, NP)
    total = tl.zeros((NP,), tl.int32)
    before = tl.zeros((NP,), tl.int32)
    for r0 in range(0, num_blocks, SCAN_ROWS):
        r = r0 + tl.arange(0, SCAN_ROWS)
        c = tl.load(counts_ptr + r[:, None] * NP + cols[None, :], mask=(r < num_blocks)[:, None], other=0)
        total += tl.sum(c, axis=0)
        before += tl.sum(tl.where((r < pid)[:, None], c, 0), axis=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    num_slots = num_tokens * TOP_K
    if pid == 0:
        tl.store(ends_ptr + cols, ends)
        pad = tl.arange(0, BLOCK_M)
        pos = (starts + total)[:, None] + pad[None, :]
        tl.store(sorted_ptr + pos, tl.zeros((NP, BLOCK_M), tl.int32) + num_slots, mask=pos < ends[:, None])
    base = starts + before
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    kcols = tl.arange(0, KP)
    slot = rows[:, None] * TOP_K + kcols[None, :]
    smask = (rows < num_tokens)[:, None] & (kcols < TOP_K)[None, :]
    ids = tl.load(ids_ptr + slot, mask=smask, other=N_FFN)
    rank = tl.load(rank_ptr + slot, mask=smask, other=0)
    expert_base = tl.sum(tl.where(ids[:, :, None] == cols[None, None, :], base[None, None, :], 0), axis=2)
    tl.store(sorted_ptr + expert_base + rank, slot, mask=smask & (ids < N_FFN))


# ---- K3 / K4 grouped GEMMs ----------------------------------------------------------------------------

@triton.jit
def _block_rows(pid, num_pid_m, num_pid_n, ids_ptr, sorted_ptr, ends_ptr, num_slots,
                N_FFN: tl.constexpr, NP: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr,
                FAST: tl.constexpr):
    """-> (pid_n, expert (>= N_FFN: nothing to do), slots [BLOCK_M] (num_slots for padding rows))."""
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    offs = tl.arange(0, BLOCK_M)
    if FAST:  # one slot per program
        expert = tl.load(ids_ptr + pid_m)
        slots = tl.where(offs == 0, pid_m, num_slots)
    else:
        row0 = pid_m * BLOCK_M
        cols = tl.arange(0, NP)
        ends = tl.load(ends_ptr + cols)
        num_rows = tl.max(ends, axis=0)
        # the expert whose padded rows hold row0: how many experts end at or before it
        expert = tl.sum(((ends <= row0) & (cols < N_FFN)).to(tl.int32), axis=0)
        expert = tl.where(row0 < num_rows, expert, N_FFN)
        slots = tl.load(sorted_ptr + row0 + offs, mask=(row0 + offs) < num_rows, other=num_slots)
    return pid_n, expert, slots


@triton.jit
def _gemm1_kernel(
    x_ptr, w13_ptr, h_ptr, ids_ptr, sorted_ptr, ends_ptr,
    num_slots, num_pid_m, dim, inter, stride_x,
    N_FFN: tl.constexpr, TOP_K: tl.constexpr, NP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, FAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """h[slot, n] = SiLU(x[slot // k] . w13[e, n]) * (x[slot // k] . w13[e, I + n])."""
    num_pid_n = tl.cdiv(inter, BLOCK_N)
    pid_n, expert, slots = _block_rows(tl.program_id(0), num_pid_m, num_pid_n, ids_ptr, sorted_ptr, ends_ptr,
                                       num_slots, N_FFN, NP, BLOCK_M, GROUP_M, FAST)
    if expert >= N_FFN:
        return
    mmask = slots < num_slots
    tokens = (slots // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_x + offs_k[None, :]
    wg_ptrs = w13_ptr + expert.to(tl.int64) * 2 * inter * dim + offs_n[None, :].to(tl.int64) * dim + offs_k[:, None]
    wu_ptrs = wg_ptrs + inter * dim
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        kmask = offs_k < dim - k0
        a = tl.load(a_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        wu = tl.load(wu_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    h_ptrs = h_ptr + slots[:, None].to(tl.int64) * inter + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _gemm2_kernel(
    h_ptr, w2_ptr, out_ptr, gates_ptr, ids_ptr, sorted_ptr, ends_ptr,
    num_slots, num_pid_m, dim, inter,
    N_FFN: tl.constexpr, NP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, FAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out_slot[slot, d] = gate[slot] * (h[slot] . w2[e, d])."""
    num_pid_n = tl.cdiv(dim, BLOCK_N)
    pid_n, expert, slots = _block_rows(tl.program_id(0), num_pid_m, num_pid_n, ids_ptr, sorted_ptr, ends_ptr,
                                       num_slots, N_FFN, NP, BLOCK_M, GROUP_M, FAST)
    if expert >= N_FFN:
        return
    mmask = slots < num_slots
    slots64 = slots.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < dim
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + slots64[:, None] * inter + offs_k[None, :]
    b_ptrs = w2_ptr + expert.to(tl.int64) * dim * inter + offs_n[None, :].to(tl.int64) * inter + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        kmask = offs_k < inter - k0
        a = tl.load(a_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    gate = tl.load(gates_ptr + slots64, mask=mmask, other=0.0)
    out = acc * gate[:, None]
    tl.store(out_ptr + slots64[:, None] * dim + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


# ---- K5 combine ---------------------------------------------------------------------------------------

@triton.jit
def _combine_kernel(
    x_ptr, out_slot_ptr, ids_ptr, s_ptr, b_ptr, v_ptr, y_ptr, num_tokens, dim, stride_x,
    N_FFN: tl.constexpr, N_CONST: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < num_tokens
    dmask = d < dim
    mask = rmask[:, None] & dmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + d[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + rows, mask=rmask, other=0.0)
    y = s[:, None] * x
    for j in tl.static_range(TOP_K):
        slot = rows64 * TOP_K + j
        is_ffn = tl.load(ids_ptr + slot, mask=rmask, other=N_FFN) < N_FFN
        # a ZC slot's row was never written: masked, not read
        y += tl.load(out_slot_ptr + slot[:, None] * dim + d[None, :], mask=mask & is_ffn[:, None],
                     other=0.0).to(tl.float32)
    for c in tl.static_range(N_CONST):
        b = tl.load(b_ptr + rows64 * N_CONST + c, mask=rmask, other=0.0)
        v = tl.load(v_ptr + c * dim + d, mask=dmask, other=0.0).to(tl.float32)
        y += b[:, None] * v[None, :]
    tl.store(y_ptr + rows64[:, None] * dim + d[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# ---- host side ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemmTiles:
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MoETiles:
    block_m: int  # the alignment's padding: shared by both GEMMs
    gemm1: GemmTiles
    gemm2: GemmTiles


def use_fast_path(num_slots: int, n_ffn: int) -> bool:
    """Few slots against many experts: a 16-row tile per slot beats padding every expert's rows."""
    return num_slots * 4 <= n_ffn


def default_tiles(num_slots: int, n_ffn: int) -> MoETiles:
    """Measured on an H200 at the 7B layer (D 1536, I 4096, 16 experts; bench_moepp_gpu.py --sweep):
    up to 16 slots per expert (decode, weight-bandwidth bound) 16-row blocks, GEMM1 wide and GEMM2
    narrow (more programs over D); past that, 128x128 tiles with 8 warps (vLLM's untuned 64x64x32
    defaults ran 1.4-1.9x slower there)."""
    if num_slots <= 16 * n_ffn:
        return MoETiles(16, GemmTiles(block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4),
                        GemmTiles(block_n=32, block_k=128, group_m=1, num_warps=4, num_stages=4))
    big = GemmTiles(block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)
    return MoETiles(128, big, big)


@dataclass
class MoEPPWorkspace:
    """The layer's scratch for T tokens: shapes depend on T (and the layout, tiles) only, never on
    the routing. Callers may pass one (tests poison it; a graph may keep one); otherwise each call
    allocates its own (inside a CUDA graph's pool when captured)."""
    router_part: torch.Tensor  # [K0 splits, T, NP] fp32 partial router logits
    const_part: torch.Tensor   # [K0 splits, T, CP] fp32 partial W_c x
    logits: torch.Tensor  # [T, N] fp32
    ids: torch.Tensor     # [T, k] int32
    gates: torch.Tensor   # [T, k] fp32
    s: torch.Tensor       # [T] fp32
    b: torch.Tensor       # [T, max(n_const, 1)] fp32
    rank: torch.Tensor    # [T, k] int32
    counts: torch.Tensor  # [route blocks, NP] int32
    sorted_slots: torch.Tensor  # [T*k + n_ffn*(BLOCK_M - 1)] int32
    expert_ends: torch.Tensor   # [NP] int32
    h: torch.Tensor       # [T*k, I] x.dtype
    out_slot: torch.Tensor  # [T*k, D] x.dtype

    @classmethod
    def allocate(cls, num_tokens: int, layout: MoEPPLayout, dim: int, inter: int, dtype: torch.dtype,
                 device: torch.device | str, tiles: MoETiles) -> MoEPPWorkspace:
        n, k, np_ = layout.n_experts, layout.top_k, _pow2(layout.n_experts)
        num_slots = num_tokens * k

        def empty(*shape, dt=torch.float32):
            return torch.empty(shape, dtype=dt, device=device)
        splits, _ = router_splits(num_tokens, dim, torch.device(device))
        return cls(router_part=empty(splits, num_tokens, np_),
                   const_part=empty(splits, num_tokens, _pow2(2 * layout.n_const)),
                   logits=empty(num_tokens, n), ids=empty(num_tokens, k, dt=torch.int32),
                   gates=empty(num_tokens, k), s=empty(num_tokens), b=empty(num_tokens, max(layout.n_const, 1)),
                   rank=empty(num_tokens, k, dt=torch.int32),
                   counts=empty(triton.cdiv(num_tokens, BLOCK_T), np_, dt=torch.int32),
                   sorted_slots=empty(num_slots + layout.n_ffn * (tiles.block_m - 1), dt=torch.int32),
                   expert_ends=empty(np_, dt=torch.int32),
                   h=empty(num_slots, inter, dt=dtype), out_slot=empty(num_slots, dim, dt=dtype))


def router_splits(num_tokens: int, dim: int, device: torch.device) -> tuple[int, int]:
    """(D-splits of K0, D columns per split): about two programs per SM, whole BLOCK_D chunks each."""
    from leanserve.kernels import num_sms

    chunks = triton.cdiv(dim, ROUTE_BLOCK_D)
    wanted = max(1, min(chunks, triton.cdiv(2 * num_sms(device), triton.cdiv(num_tokens, BLOCK_T))))
    per_split = triton.cdiv(chunks, wanted)
    return triton.cdiv(chunks, per_split), per_split * ROUTE_BLOCK_D


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot's smallest tile side


def _check(x, router_w, const_gate, prev_logits, gate_map, w13, w2, const_v, layout):
    num_tokens, dim = x.shape
    n, e = layout.n_experts, layout.n_ffn
    if n > MAX_EXPERTS:
        raise ValueError(f"the fused kernel handles up to {MAX_EXPERTS} experts, got {n}")
    if router_w.shape != (n, dim) or w13.dim() != 3 or w13.shape[0] != e or w13.shape[2] != dim \
            or w2.shape != (e, dim, w13.shape[1] // 2):
        raise ValueError(f"need router_w [{n}, {dim}], w13 [{e}, 2I, {dim}], w2 [{e}, {dim}, I]; got "
                         f"{tuple(router_w.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}")
    if layout.n_const and (const_gate is None or const_gate.shape != (2 * layout.n_const, dim)
                           or const_v is None or const_v.shape != (layout.n_const, dim)):
        raise ValueError(f"{layout.n_const} constant experts need const_gate [{2 * layout.n_const}, {dim}] and "
                         f"const_v [{layout.n_const}, {dim}]")
    if prev_logits is not None and (gate_map is None or prev_logits.shape != (num_tokens, n)
                                    or gate_map.shape != (n, n)):
        raise ValueError(f"the gating residual needs prev_logits [{num_tokens}, {n}] and gate_map [{n}, {n}]")
    operands = (router_w, const_gate, prev_logits, gate_map, w13, w2, const_v)
    if x.stride(1) != 1 or not all(t is None or t.is_contiguous() for t in operands):
        raise ValueError("x's rows and the other operands must be contiguous")
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"w13/w2 must be in x's dtype {x.dtype}, got {w13.dtype}/{w2.dtype}")


def moepp_forward(x: torch.Tensor, router_w: torch.Tensor, const_gate: torch.Tensor | None,
                  prev_logits: torch.Tensor | None, gate_map: torch.Tensor | None, w13: torch.Tensor,
                  w2: torch.Tensor, const_v: torch.Tensor | None, layout: MoEPPLayout, *,
                  tiles: MoETiles | None = None, workspace: MoEPPWorkspace | None = None,
                  forced_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One MoE++ layer: x [T, D] (post-norm hidden) -> (y [T, D] in x's dtype, logits [T, N] fp32,
    the next layer's prev_logits). router_w [N, D] (fp32), const_gate [2*n_const, D] (rows 2c,
    2c+1 = W_c), gate_map [N, N] with prev_logits [T, N] (the gating residual; None: none),
    w13 [E_ffn, 2I, D] (gate rows then up rows), w2 [E_ffn, D, I], const_v [n_const, D].
    `forced_ids` [T, k] replaces the router's top-k (the router still runs and its probabilities
    give the gates): forced routing for benchmarks and tests."""
    _check(x, router_w, const_gate, prev_logits, gate_map, w13, w2, const_v, layout)
    num_tokens, dim = x.shape
    inter = w2.shape[2]
    k, num_slots = layout.top_k, num_tokens * layout.top_k
    fast = use_fast_path(num_slots, layout.n_ffn)
    tiles = tiles or default_tiles(num_slots, layout.n_ffn)
    ws = workspace or MoEPPWorkspace.allocate(num_tokens, layout, dim, inter, x.dtype, x.device, tiles)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return y, ws.logits
    np_ = _pow2(layout.n_experts)
    route_blocks = triton.cdiv(num_tokens, BLOCK_T)
    dummy = ws.s  # stands in for absent optional operands (never read)
    splits, dim_per_split = router_splits(num_tokens, dim, x.device)
    cp = _pow2(2 * layout.n_const)
    _router_gemm_kernel[(route_blocks, splits)](
        x, router_w, const_gate if layout.n_const else dummy, ws.router_part, ws.const_part, num_tokens, dim,
        x.stride(0), dim_per_split, N=layout.n_experts, N_CONST=layout.n_const, NP=np_, CP=cp, BLOCK_T=BLOCK_T,
        BLOCK_D=ROUTE_BLOCK_D, SPLIT_BF16=x.dtype == torch.bfloat16, PRECISION=ROUTE_PRECISION, num_warps=4)
    _route_kernel[(route_blocks,)](
        ws.router_part, ws.const_part, prev_logits if prev_logits is not None else dummy,
        gate_map if prev_logits is not None else dummy, forced_ids if forced_ids is not None else dummy,
        ws.logits, ws.ids, ws.gates, ws.s, ws.b, ws.rank, ws.counts,
        num_tokens, float(layout.logit_norm_std or 1.0), layout.eps,
        N=layout.n_experts, N_FFN=layout.n_ffn, N_CONST=layout.n_const, FIRST_COPY=layout.first_copy,
        FIRST_ZERO=layout.first_zero, TOP_K=k, KP=triton.next_power_of_2(k), NP=np_, CP=cp, SPLITS=splits,
        BLOCK_T=BLOCK_T, HAS_PREV=prev_logits is not None, NORM=layout.logit_norm_std is not None,
        RENORM=RENORM_CODES[layout.renorm_mode], FORCED=forced_ids is not None, COUNT=not fast,
        PRECISION=ROUTE_PRECISION, num_warps=4)
    if fast:
        num_pid_m = num_slots
    else:
        _align_kernel[(route_blocks,)](
            ws.ids, ws.rank, ws.counts, ws.sorted_slots, ws.expert_ends, num_tokens, route_blocks,
            N_FFN=layout.n_ffn, TOP_K=k, KP=triton.next_power_of_2(k), NP=np_, BLOCK_T=BLOCK_T,
            BLOCK_M=tiles.block_m, SCAN_ROWS=128, num_warps=4)
        num_pid_m = triton.cdiv(ws.sorted_slots.shape[0], tiles.block_m)
    gemm_precision = "ieee" if x.dtype == torch.float32 else "tf32"
    t1, t2 = tiles.gemm1, tiles.gemm2
    _gemm1_kernel[(num_pid_m * triton.cdiv(inter, t1.block_n),)](
        x, w13, ws.h, ws.ids, ws.sorted_slots, ws.expert_ends, num_slots, num_pid_m, dim, inter, x.stride(0),
        N_FFN=layout.n_ffn, TOP_K=k, NP=np_, BLOCK_M=tiles.block_m, BLOCK_N=t1.block_n, BLOCK_K=t1.block_k,
        GROUP_M=t1.group_m, FAST=fast, PRECISION=gemm_precision, num_warps=t1.num_warps, num_stages=t1.num_stages)
    _gemm2_kernel[(num_pid_m * triton.cdiv(dim, t2.block_n),)](
        ws.h, w2, ws.out_slot, ws.gates, ws.ids, ws.sorted_slots, ws.expert_ends, num_slots, num_pid_m, dim, inter,
        N_FFN=layout.n_ffn, NP=np_, BLOCK_M=tiles.block_m, BLOCK_N=t2.block_n, BLOCK_K=t2.block_k,
        GROUP_M=t2.group_m, FAST=fast, PRECISION=gemm_precision, num_warps=t2.num_warps, num_stages=t2.num_stages)
    block_d = min(128, triton.next_power_of_2(dim))
    _combine_kernel[(route_blocks, triton.cdiv(dim, block_d))](
        x, ws.out_slot, ws.ids, ws.s, ws.b, const_v if layout.n_const else dummy, y, num_tokens, dim, x.stride(0),
        N_FFN=layout.n_ffn, N_CONST=layout.n_const, TOP_K=k, BLOCK_T=BLOCK_T, BLOCK_D=block_d, num_warps=4)
    return y, ws.logits
