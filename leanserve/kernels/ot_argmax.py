"""Semi-discrete OT assignment: for queries x [N, D], targets y [M, D] and potentials h [M],
i*(x) = argmax_j (<x, y_j> + h_j), as a fused Triton GEMM + running argmax with its PyTorch
reference beside it.

This is DPM-OT's semi-discrete OT score (cost -<x, y>); the squared-distance form
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
    num_queries, num_targets, dim, stride_x, stride_y, targets_per_split,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Program (i, s): queries i*BLOCK_N.. against split s of the targets (targets_per_split, a
    multiple of BLOCK_M); it loops over the split's target tiles (and over D in BLOCK_D chunks), so
    each query row's running best lives in registers and only (max, argmax) is written, to row s of
    the [splits, num_queries] outputs."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < num_queries
    cols_in_tile = tl.arange(0, BLOCK_M)
    ds = tl.arange(0, BLOCK_D)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    first = split * targets_per_split
    end = tl.minimum(first + targets_per_split, num_targets)
    for start in range(first, end, BLOCK_M):
        cols = start + cols_in_tile
        col_mask = cols < end
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
    out = split.to(tl.int64) * num_queries + rows
    tl.store(best_ptr + out, best, mask=row_mask)
    tl.store(idx_ptr + out, best_idx.to(tl.int64), mask=row_mask)


# (BLOCK_N, BLOCK_M, BLOCK_D, num_warps, num_stages): tensor-core tiles for half inputs; smaller
# tiles for fp32, whose exact (IEEE) products run on the FMA units
HALF_CONFIG = (128, 128, 64, 8, 3)
FP32_CONFIG = (64, 64, 32, 4, 3)
MIN_BLOCK_N = 16  # tl.dot's smallest tile side


def num_target_splits(num_queries: int, num_targets: int, block_n: int, block_m: int, num_sms: int) -> int:
    """Target splits so that the grid has about two programs per SM: a sampler's lookup (a few
    queries against N targets) would otherwise run on one or two SMs; a solver step has enough
    query blocks and gets 1."""
    query_blocks = triton.cdiv(num_queries, block_n)
    tiles = triton.cdiv(num_targets, block_m)
    wanted = max(1, min(triton.cdiv(2 * num_sms, query_blocks), tiles))
    return triton.cdiv(tiles, triton.cdiv(tiles, wanted))  # no empty split


def _check(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor):
    if x.dim() != 2 or y.dim() != 2 or h.dim() != 1 or x.shape[1] != y.shape[1] or h.shape[0] != y.shape[0]:
        raise ValueError(f"need x [N, D], y [M, D], h [M]; got x {tuple(x.shape)}, y {tuple(y.shape)}, "
                         f"h {tuple(h.shape)}")
    if y.shape[0] == 0:
        raise ValueError("no targets")
    if x.dtype != y.dtype:
        raise ValueError(f"x and y must share a dtype, got {x.dtype} and {y.dtype}")


def ot_argmax_triton(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, *,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None, config: tuple[int, ...] | None = None,
                     num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(max score [N] fp32, argmax [N] int64) by the fused kernel; rows of x and y must be contiguous.
    `out` = preallocated contiguous (best, idx) buffers (e.g. static ones under a CUDA graph).
    `config` (BLOCK_N, BLOCK_M, BLOCK_D, num_warps, num_stages) and `num_splits` override the
    defaults (tuning sweeps, tests)."""
    from leanserve.kernels import num_sms

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
    if config is None:
        block_n, block_m, block_d, num_warps, num_stages = FP32_CONFIG if x.dtype == torch.float32 else HALF_CONFIG
        # a lookup of a few images: the rows of a query tile past the batch would be computed for nothing
        block_n = min(block_n, max(MIN_BLOCK_N, triton.next_power_of_2(num_queries)))
    else:
        block_n, block_m, block_d, num_warps, num_stages = config
    num_targets = y.shape[0]
    if num_splits is None:
        num_splits = num_target_splits(num_queries, num_targets, block_n, block_m, num_sms(x.device))
    tiles = triton.cdiv(num_targets, block_m)
    targets_per_split = triton.cdiv(tiles, num_splits) * block_m
    num_splits = triton.cdiv(num_targets, targets_per_split)
    if num_splits == 1:
        part_best, part_idx = best, idx
    else:
        part_best = torch.empty(num_splits, num_queries, dtype=torch.float32, device=x.device)
        part_idx = torch.empty(num_splits, num_queries, dtype=torch.int64, device=x.device)
    _ot_argmax_kernel[(triton.cdiv(num_queries, block_n), num_splits)](
        x, y, h.contiguous(), part_best, part_idx, num_queries, num_targets, dim, x.stride(0), y.stride(0),
        targets_per_split, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, INPUT_PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        # splits hold increasing target ranges and argmax takes the first maximum: ties still go to
        # the smallest target index
        winner = part_best.argmax(dim=0, keepdim=True)
        best.copy_(part_best.gather(0, winner).squeeze(0))
        idx.copy_(part_idx.gather(0, winner).squeeze(0))
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
