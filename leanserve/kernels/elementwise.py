"""The decoder layer's small ops, one Triton launch each: RMSNorm (with the residual add fused), rotary
embedding of q and k together, and SiLU(gate) * up. Unfused, they are ~45 kernels per layer (casts,
reductions, the rotary halves), which at batch 1 cost 2.4 of a 6.2 ms decode step on an H200 against
3.8 ms of weight-bound GEMMs (BENCHMARKS.md). Each is memory-bound: it reads and writes its activations
once. PyTorch references: models/layers.py (rms_norm, _apply_rotary, SiluAndMul), whose rounding order
these follow (fp32 statistics; the sum, the normalised row and the gate rounded to the input dtype where
transformers rounds them): bf16 outputs differ from them only where fp32 summation order or Triton's
approximate exp / rsqrt / division moves a value across a bf16 rounding boundary.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro, n, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)  # rounded to the input dtype, as x + residual
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    normed = (xf * tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] (rows contiguous) -> weight * rmsnorm(x); with `residual`, normalises x + residual and
    also returns that sum (models/layers.RMSNorm.forward's contract). weight [H], x's dtype."""
    if x.dim() != 2 or x.stride(-1) != 1 or weight.shape != (x.shape[1],) or weight.stride(0) != 1:
        raise ValueError(f"rms_norm needs x [T, H] with contiguous rows and a contiguous weight [H]: x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1):
        raise ValueError(f"residual must match x {tuple(x.shape)} {x.dtype} with contiguous rows")
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    res = residual if residual is not None else x
    block = triton.next_power_of_2(x.shape[1])
    if x.shape[0]:  # a whole row per program; wider rows get more warps (4,096 -> 8) to stay in registers
        _rms_norm_kernel[(x.shape[0],)](x, res, weight, out, res_out, x.stride(0), res.stride(0), out.stride(0),
                                        res_out.stride(0), x.shape[1], eps, HAS_RESIDUAL=residual is not None,
                                        BLOCK=block, num_warps=max(1, min(16, block // 512)))
    return out if residual is None else (out, res_out)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_sin_ptr, pos_ptr, stride_qt, stride_qh, stride_kt,
                   stride_kh, stride_cs, num_q_heads, num_kv_heads,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr):
    """One program per token: every head of q and k, rotate-half layout, cos/sin in fp32."""
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    d = tl.arange(0, HALF_PAD)
    h = tl.arange(0, HEADS_PAD)
    dmask = d < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + d, mask=dmask, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + d, mask=dmask, other=0.0)[None, :]
    for which in tl.static_range(2):
        if which == 0:
            src, dst, stride_t, stride_h, heads = q_ptr, q_out_ptr, stride_qt, stride_qh, num_q_heads
        else:
            src, dst, stride_t, stride_h, heads = k_ptr, k_out_ptr, stride_kt, stride_kh, num_kv_heads
        mask = (h[:, None] < heads) & dmask[None, :]
        at = token * stride_t + h[:, None] * stride_h + d[None, :]
        x1 = tl.load(src + at, mask=mask, other=0.0)
        x2 = tl.load(src + at + HALF, mask=mask, other=0.0)
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        out = token * heads * 2 * HALF + h[:, None] * 2 * HALF + d[None, :]  # contiguous [T, heads, D]
        tl.store(dst + out, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
        tl.store(dst + out + HALF, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


def rotary(q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, positions: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D] (any token/head strides, contiguous head rows) rotated at `positions`
    [T] with cos_sin_cache [max_position, D] fp32 (cos halves then sin halves); new contiguous tensors."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2 or k.shape[2] != head_dim or k.shape[0] != num_tokens or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"rotary needs an even head_dim shared by q {tuple(q.shape)} and k {tuple(k.shape)}, "
                         "contiguous along it")
    if cos_sin_cache.dtype != torch.float32 or cos_sin_cache.shape[1] != head_dim or cos_sin_cache.stride(1) != 1:
        raise ValueError(f"cos_sin_cache must be fp32 [max_position, {head_dim}]")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            q, k, q_out, k_out, cos_sin_cache, positions.contiguous(), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos_sin_cache.stride(0), num_q_heads, num_kv_heads, HALF=head_dim // 2,
            HALF_PAD=triton.next_power_of_2(head_dim // 2), HEADS_PAD=triton.next_power_of_2(max(num_q_heads,
                                                                                                    num_kv_heads)))
    return q_out, k_out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # F.silu rounds its output to the input dtype
    tl.store(out_ptr + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] (gate | up, rows contiguous) -> silu(gate) * up [T, I]."""
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"silu_and_mul needs x [T, 2I] with contiguous rows, got {tuple(x.shape)}")
    n = x.shape[1] // 2
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if x.shape[0]:
        _silu_mul_kernel[(x.shape[0], triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n, BLOCK=block)
    return out
