"""Semi-discrete OT assignment: for queries x [N, D], targets y [M, D] and potentials h [M],
i*(x) = argmax_j (<x, y_j> + h_j), as a fused Triton GEMM + running argmax with its PyTorch
reference beside it.

This is the score of specs/dpm_ot.md (cost -<x, y>); the squared-distance form
argmax_j (<x, y_j> - ||y_j||^2 / 2 + h_j) is the same call with h - ||y||^2 / 2 folded into h.
Neither implementation materialises the [N, M] score matrix: both stream over target tiles and
keep a running (max, argmax) per query, so memory stays O((N + M) * D).

Ties resolve to the smallest target index (torch.argmax's rule): tiles are visited in
increasing index order, a later tile replaces the running best only when strictly greater, and
inside a tile the smallest index among the maxima wins. Scores accumulate in fp32 whatever the
input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

REF_TILE = 4096  # targets per step of the reference: bounds its [N, tile] score block


@triton.jit
def _ot_argmax_kernel(
    x_ptr, y_ptr, h_ptr, best_ptr, idx_ptr,
    num_queries, num_targets, dim, stride_x, stride_y,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program per block of BLOCK_N queries; it loops over every target tile (and over D in
    BLOCK_D chunks), so each query row's running best lives in registers and only (max, argmax)
    is written."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < num_queries
    cols_in_tile = tl.arange(0, BLOCK_M)
    ds = tl.arange(0, BLOCK_D)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    for start in range(0, num_targets, BLOCK_M):
        cols = start + cols_in_tile
        col_mask = cols < num_targets
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + ds
            d_mask = d < dim
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + d[None, :],
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            y = tl.load(y_ptr + cols[None, :].to(tl.int64) * stride_y + d[:, None],
                        mask=col_mask[None, :] & d_mask[:, None], other=0.0)
            acc = tl.dot(x, y, acc, input_precision=INPUT_PRECISION)
        h = tl.load(h_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        # padding columns can never win
        score = tl.where(col_mask[None, :], acc + h[None, :], float("-inf"))
        tile_best = tl.max(score, axis=1)
        # the smallest column holding the tile's maximum (num_targets marks "not a maximum")
        tile_idx = tl.min(tl.where(score == tile_best[:, None], cols[None, :], num_targets), axis=1)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx, best_idx)
    tl.store(best_ptr + rows, best, mask=row_mask)
    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_mask)


def _check(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor):
    if x.dim() != 2 or y.dim() != 2 or h.dim() != 1 or x.shape[1] != y.shape[1] or h.shape[0] != y.shape[0]:
        raise ValueError(f"need x [N, D], y [M, D], h [M]; got x {tuple(x.shape)}, y {tuple(y.shape)}, "
                         f"h {tuple(h.shape)}")
    if y.shape[0] == 0:
        raise ValueError("no targets")
    if x.dtype != y.dtype:
        raise ValueError(f"x and y must share a dtype, got {x.dtype} and {y.dtype}")


def ot_argmax_triton(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, *,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None, block_n: int = 32, block_m: int = 32,
                     block_d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(max score [N] fp32, argmax [N] int64) by the fused kernel; rows of x and y must be contiguous.
    `out` = preallocated contiguous (best, idx) buffers (e.g. static ones under a CUDA graph)."""
    _check(x, y, h)
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("the rows of x and y must be contiguous")
    num_queries, dim = x.shape
    if out is None:
        best = torch.empty(num_queries, dtype=torch.float32, device=x.device)
        idx = torch.empty(num_queries, dtype=torch.int64, device=x.device)
    else:
        best, idx = out
        if best.shape != (num_queries,) or idx.shape != (num_queries,) or best.dtype != torch.float32 \
                or idx.dtype != torch.int64 or not (best.is_contiguous() and idx.is_contiguous()):
            raise ValueError(f"out must be contiguous float32 and int64 tensors of shape ({num_queries},)")
    if num_queries == 0:
        return best, idx
    # fp32 inputs get full-precision products: tf32's 10-bit mantissa would move the argmax of
    # near-ties, and the sampling map must be exact; bf16/fp16 inputs use tensor cores as they are
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _ot_argmax_kernel[(triton.cdiv(num_queries, block_n),)](
        x, y, h.contiguous(), best, idx, num_queries, y.shape[0], dim, x.stride(0), y.stride(0),
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, INPUT_PRECISION=precision,
    )
    return best, idx


def ot_argmax_ref(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, *, tile: int = REF_TILE
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the same streaming (max, argmax) with one fp32 matmul per tile of `tile` targets."""
    _check(x, y, h)
    best = torch.full((x.shape[0],), float("-inf"), dtype=torch.float32, device=x.device)
    idx = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    xf = x.float()
    for start in range(0, y.shape[0], tile):
        score = xf @ y[start:start + tile].float().T + h[start:start + tile].float()
        tile_idx = score.argmax(dim=1)  # first maximum on ties
        tile_best = score.gather(1, tile_idx[:, None]).squeeze(1)
        better = tile_best > best
        best = torch.where(better, tile_best, best)
        idx = torch.where(better, tile_idx + start, idx)
    return best, idx


def ot_argmax(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel on CUDA, the streaming reference elsewhere (Triton's CPU interpreter is a
    test vehicle, orders of magnitude too slow for a solve)."""
    if x.is_cuda:
        return ot_argmax_triton(x, y, h)
    return ot_argmax_ref(x, y, h)
