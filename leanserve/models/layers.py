"""Building blocks of the Llama family: RMSNorm, rotary embedding, fused linears and the SiLU gate.
Attention, and the KV cache it reads, live in leanserve/models/attention/; the tensor-parallel
linears and the MLP built from them in tensor_parallel.py and llama.py."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x normalised over its last axis, times `weight` (broadcast: a per-member weight may differ by
    row). Statistics in fp32, weight applied after casting back: transformers' order, so bf16
    checkpoints see the same rounding they were trained/evaluated with."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """With `residual` (vLLM's fused add): normalises x + residual and also returns that sum,
        which is the residual stream for the next sub-layer. CUDA: one Triton launch (kernels/elementwise.py)."""
        fusable = residual is None or (residual.dtype == x.dtype and residual.stride(-1) == 1)
        if x.is_cuda and x.dim() == 2 and x.stride(-1) == 1 and self.weight.dtype == x.dtype and fusable:
            from leanserve.kernels.elementwise import rms_norm as fused  # CPU installs may lack Triton
            return fused(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class MergedLinear(nn.Linear):
    """Several Linears sharing one input, stored as one matmul (q/k/v -> qkv_proj, gate/up ->
    gate_up_proj). Checkpoints keep them separate; the loader copies shard i into its rows."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool):
        super().__init__(input_size, sum(output_sizes), bias=bias)
        self.output_sizes = output_sizes

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: int) -> None:
        start = sum(self.output_sizes[:shard])
        dst = param.data.narrow(0, start, self.output_sizes[shard])
        if dst.shape != loaded.shape:
            raise ValueError(f"shard {shard}: checkpoint shape {tuple(loaded.shape)} != expected {tuple(dst.shape)}")
        dst.copy_(loaded)


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 2 and x.stride(-1) == 1:
            from leanserve.kernels.elementwise import silu_and_mul  # one launch instead of three
            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def rope_inv_freq(head_dim: int, rope_parameters: dict) -> torch.Tensor:
    """Inverse frequencies for the rope types the Llama family ships with (transformers' formulas)."""
    if rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial_rotary_factor != 1 is not supported by the Llama family implementation")
    base = rope_parameters.get("rope_theta", 10000.0)
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        # scaling positions by 1/factor == scaling frequencies by 1/factor
        return inv_freq / rope_parameters["factor"]
    if rope_type == "llama3":
        factor = rope_parameters["factor"]
        low, high = rope_parameters["low_freq_factor"], rope_parameters["high_freq_factor"]
        old_ctx = rope_parameters["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths (low frequencies) are interpolated by `factor`, short ones kept,
        # and the band in between blended smoothly
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(is_medium, smoothed, scaled)
    raise NotImplementedError(f"rope type {rope_type!r} is not supported (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Rotate-half (GPT-NeoX layout) rotary embedding, as HF Llama checkpoints expect.

    The cos/sin table is an fp32 plain attribute, not a buffer: model-wide dtype casts must not
    round it to bf16, and it has to survive building the model on the meta device."""

    def __init__(self, head_dim: int, max_position: int, rope_parameters: dict):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = rope_inv_freq(head_dim, rope_parameters)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float, device="cpu"), inv_freq)
        self.cos_sin_cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [max_position, head_dim]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D] -> rotated, same dtype."""
        if self.cos_sin_cache.device != positions.device:
            self.cos_sin_cache = self.cos_sin_cache.to(positions.device)  # one-time move to the model's device
        if q.is_cuda:
            from leanserve.kernels.elementwise import rotary  # q and k in one launch instead of ~20
            return rotary(q, k, self.cos_sin_cache, positions)
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
        return _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
