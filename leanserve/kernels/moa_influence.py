"""MoA influence profiling: how much the loss would change if one attention entry were masked, summed
by query block and query-key distance. A fused Triton kernel with its PyTorch reference beside it.

For softmax row i (A_i = softmax(q_i K^T * scale + causal), O_i = sum_j A_ij v_j, upstream gradient
dO_i), masking key j and renormalising gives O'_i = (O_i - A_ij v_j) / (1 - A_ij), whose first-order
loss change is

    E_ij = dO_i . (O'_i - O_i) = A_ij (D_i - dO_i . v_j) / (1 - A_ij),    D_i = dO_i . O_i

(1 - A_ij clamped at 1e-6). Output: I[h, m, e] = sum |E_ij| over query i in block m (B rows) and keys
j >= B (past the sink block, which every rule keeps) with floor((i - j) / B) = e. A rule that keeps
R ring slots (a multiple of B) drops exactly the pairs with i - j >= R, i.e. the buckets e >= R / B.
Inputs are one sequence: q, o, do [Hq, N, D], k, v [Hkv, N, D] (post-RoPE), query head h reading KV
head h // (Hq / Hkv). Everything accumulates in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

EPS = 1e-6
REF_ELEMENTS = 1 << 24  # [Hq, rows, N] elements per step of the reference


def _check(q, k, v, o, do, block_size: int) -> None:
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3 or o.shape != q.shape or do.shape != q.shape:
        raise ValueError(f"need q, o, do [Hq, N, D] and k, v [Hkv, N, D]; got q {tuple(q.shape)}, k {tuple(k.shape)},"
                         f" v {tuple(v.shape)}, o {tuple(o.shape)}, do {tuple(do.shape)}")
    if q.shape[1:] != k.shape[1:] or q.shape[0] % k.shape[0]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: same N and D, Hq a multiple of Hkv")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")


def num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def influence_entries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
                      sm_scale: float, rows: torch.Tensor) -> torch.Tensor:
    """E [Hq, len(rows), N] (signed, fp32, zero above the diagonal) of the query positions `rows`."""
    group = q.shape[0] // k.shape[0]
    kf, vf = k.float().repeat_interleave(group, 0), v.float().repeat_interleave(group, 0)
    causal = torch.arange(q.shape[1], device=q.device)[None, :] <= rows[:, None]
    s = (q[:, rows].float() @ kf.transpose(1, 2) * sm_scale).masked_fill(~causal, float("-inf"))
    a = torch.softmax(s, dim=-1)
    d = (do[:, rows].float() * o[:, rows].float()).sum(-1, keepdim=True)
    return a * (d - do[:, rows].float() @ vf.transpose(1, 2)) / (1 - a).clamp_min(EPS)


def influence_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
                  sm_scale: float, block_size: int, *, rows: int | None = None) -> torch.Tensor:
    """Reference: I [Hq, nb, nb] from the dense [Hq, rows, N] entries of `rows` queries at a time."""
    _check(q, k, v, o, do, block_size)
    hq, n, _ = q.shape
    nb = num_blocks(n, block_size)
    out = torch.zeros(hq, nb * nb, dtype=torch.float32, device=q.device)
    rows = rows or max(1, REF_ELEMENTS // (hq * n))
    j = torch.arange(n, device=q.device)
    for start in range(0, n, rows):
        i = torch.arange(start, min(start + rows, n), device=q.device)
        e = influence_entries(q, k, v, o, do, sm_scale, i).abs() * (j[None, :] >= block_size)
        bucket = (i[:, None] - j[None, :]).clamp_min(0) // block_size  # above the diagonal e is 0
        index = (i[:, None] // block_size) * nb + bucket
        out.scatter_add_(1, index.flatten().expand(hq, -1), e.flatten(1))
    return out.view(hq, nb, nb)


@triton.jit
def _influence_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, out_ptr,
    n, head_dim, group, nb, sm_scale,
    s_qh, s_qn, s_kh, s_kn, s_vh, s_vn, s_oh, s_on, s_dh, s_dn,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, CLAMP: tl.constexpr,
):
    """Program (p, h): query block m = nb - 1 - p (longest rows first) of query head h. Pass 1 finds
    each row's log-sum-exp over its causal keys; pass 2 walks the key blocks past the sink. A B x B
    tile of key block kb holds distances in buckets m - kb (pairs with i - j >= (m - kb) B) and
    m - kb - 1, so bucket m - kb is this tile's upper part plus the previous tile's lower part: one
    store per bucket, no atomics."""
    m = nb - 1 - tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // group
    rows = m * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    tile_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + h * s_qh + rows[:, None].to(tl.int64) * s_qn + d[None, :], mask=tile_mask, other=0.0)
    o = tl.load(o_ptr + h * s_oh + rows[:, None].to(tl.int64) * s_on + d[None, :], mask=tile_mask, other=0.0)
    do = tl.load(do_ptr + h * s_dh + rows[:, None].to(tl.int64) * s_dn + d[None, :], mask=tile_mask, other=0.0)
    row_d = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)

    m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK,), tl.float32)
    for kb in range(0, m + 1):
        cols = kb * BLOCK + tl.arange(0, BLOCK)
        col_ok = cols < n
        kt = tl.load(k_ptr + kvh * s_kh + cols[None, :].to(tl.int64) * s_kn + d[:, None],
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * sm_scale
        s = tl.where((cols[None, :] <= rows[:, None]) & col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: key 0 is in every row's first tile
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(l_i)

    carry = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)
    out_row = out_ptr + (h.to(tl.int64) * nb + m) * nb
    for kb in range(1, m + 1):
        cols = kb * BLOCK + tl.arange(0, BLOCK)
        col_ok = cols < n
        kt = tl.load(k_ptr + kvh * s_kh + cols[None, :].to(tl.int64) * s_kn + d[:, None],
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(v_ptr + kvh * s_vh + cols[None, :].to(tl.int64) * s_vn + d[:, None],
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * sm_scale
        valid = (cols[None, :] <= rows[:, None]) & col_ok[None, :] & row_ok[:, None]
        a = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        t = tl.dot(do, vt, input_precision=PRECISION)
        e = tl.abs(a * (row_d[:, None] - t) / tl.maximum(1.0 - a, CLAMP))
        e = tl.where(valid, e, 0.0)
        upper = (rows[:, None] - cols[None, :]) >= (m - kb) * BLOCK
        hi = tl.sum(tl.sum(tl.where(upper, e, 0.0), axis=1), axis=0)
        lo = tl.sum(tl.sum(e, axis=1), axis=0) - hi
        tl.store(out_row + (m - kb), hi + carry)
        carry = lo


def influence_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
                     sm_scale: float, block_size: int, *, num_warps: int = 4) -> torch.Tensor:
    """I [Hq, nb, nb] by the fused kernel; block_size a power of two >= 16 (tl.dot's smallest tile)."""
    _check(q, k, v, o, do, block_size)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"the fused kernel needs a power-of-two block_size >= 16, got {block_size}")
    if len({t.dtype for t in (q, k, v, o, do)}) != 1:
        raise ValueError("q, k, v, o and do must share a dtype")
    for t in (q, k, v, o, do):
        if t.stride(2) != 1:
            raise ValueError("the last dimension of q, k, v, o and do must be contiguous")
    hq, n, head_dim = q.shape
    nb = num_blocks(n, block_size)
    out = torch.zeros(hq, nb, nb, dtype=torch.float32, device=q.device)
    # fp32 inputs get exact products: tf32 would move A_ij by ~1e-3 relative, the test tolerance
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _influence_kernel[(nb, hq)](
        q, k, v, o, do, out, n, head_dim, hq // k.shape[0], nb, sm_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), do.stride(0), do.stride(1),
        BLOCK=block_size, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PRECISION=precision,
        CLAMP=EPS, num_warps=num_warps,
    )
    return out


def block_influence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
                    sm_scale: float, block_size: int) -> torch.Tensor:
    """The fused kernel on CUDA, the reference elsewhere (Triton's CPU interpreter is a test vehicle)."""
    if q.is_cuda:
        return influence_triton(q, k, v, o, do, sm_scale, block_size)
    return influence_ref(q, k, v, o, do, sm_scale, block_size)
