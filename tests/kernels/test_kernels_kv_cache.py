"""Triton KV-cache store vs its PyTorch reference. On CPU the kernel runs in Triton's interpreter;
on a GPU the compiled kernel is tested."""
from __future__ import annotations

import pytest
import torch

from leanserve.kernels import kv_cache as kvc

# on CPU, tests/conftest.py has turned Triton's interpreter on before this module was imported
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (3, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_store_writes_slots_and_skips_padding(dtype, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, num_tokens = 6, 16, 20
    # k and v as views into a fused qkv row, like the model's split of qkv_proj's output
    qkv = torch.randn(num_tokens, 4 * num_kv_heads * head_dim, generator=gen).to(dtype).to(DEVICE)
    k = qkv[:, : num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, 2 * num_kv_heads * head_dim: 3 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    # distinct shuffled slots across blocks, every third token padding (-1)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1
    slots = slots.to(DEVICE)
    # the layer's caches are views into one [2, layers, blocks, ...] tensor
    cache = torch.full((2, 2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    k_cache, v_cache = cache[0, 1], cache[1, 1]
    expected = cache.clone()
    kvc.store_kvcache_ref(k, v, expected[0, 1], expected[1, 1], slots)

    kvc.store_kvcache(k, v, k_cache, v_cache, slots)

    # bit-exact everywhere: written slots hold k/v, every other slot (and the other layer) keeps its NaN
    assert torch.equal(cache.view(BITS[dtype]), expected.view(BITS[dtype]))
    valid = slots >= 0
    flat = slots[valid]
    assert torch.equal(k_cache.view(-1, num_kv_heads, head_dim)[flat], k[valid])
    assert torch.equal(v_cache.view(-1, num_kv_heads, head_dim)[flat], v[valid])
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    written[flat] = True
    assert k_cache.view(-1, num_kv_heads, head_dim)[~written].isnan().all()
    assert v_cache.view(-1, num_kv_heads, head_dim)[~written].isnan().all()
    assert cache[:, 0].isnan().all()


def test_empty_step_is_a_no_op():
    cache = torch.zeros(2, 16, 2, 64, device=DEVICE)
    empty = torch.zeros(0, 2, 64, device=DEVICE)
    kvc.store_kvcache(empty, empty, cache, cache.clone(), torch.zeros(0, dtype=torch.int64, device=DEVICE))
    assert not cache.any()
