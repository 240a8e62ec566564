"""Paged KV caches for attention tests (the Triton kernels in tests/kernels and the PyTorch paths
in tests/models): random contexts in shuffled, non-contiguous blocks, NaN everywhere else."""
from __future__ import annotations

import torch

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def make_paged_kv(seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                  gen: torch.Generator, device: str | torch.device = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V for each sequence in shuffled, non-contiguous blocks; every slot no sequence owns
    (block tails, spare blocks) holds NaN, so a read past seq_len poisons the output."""
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    tables = torch.full((len(seq_lens), max(blocks_per_seq) + 1), -1, dtype=torch.int32)  # -1 padded
    used = 0
    for b, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        blocks = perm[used:used + nb]
        used += nb
        tables[b, :nb] = blocks.int()
        pos = torch.arange(n)
        k_cache[blocks[pos // block_size], pos % block_size] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_cache[blocks[pos // block_size], pos % block_size] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
    return k_cache.to(device), v_cache.to(device), tables.to(device)
