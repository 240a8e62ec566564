"""Triton varlen paged attention (prefill chunks and decode rows in one launch) vs its PyTorch
reference. On CPU the kernel runs in Triton's interpreter; on a GPU the compiled kernel is tested
(plus the CUDA dispatch in models/attention/paged)."""
from __future__ import annotations

import pytest
import torch
from paged_kv_builders import TOL, make_paged_kv

from leanserve.kernels import paged_varlen_attention as pva

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("interpreter_bf16_dot")  # tests/conftest.py

# (cached prefix, new tokens) per sequence: a fresh prompt, decode rows (q_len 1) at several context
# lengths, chunks after prefixes that end mid-block and on block and tile boundaries
STEP = [(0, 37), (20, 1), (5, 70), (64, 16), (0, 1), (130, 3), (47, 1)]


def run_case(step: list[tuple[int, int]], num_kv_heads: int, group: int, head_dim: int, dtype: torch.dtype,
             block_size: int = 16, padding_rows: int = 3, seed: int = 0, **kwargs) -> None:
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in step]
    k_cache, v_cache, tables = make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, DEVICE)
    qsl = torch.tensor([0] + [n for _, n in step], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
    num_tokens = int(qsl[-1])
    q = torch.randn(num_tokens + padding_rows, num_kv_heads * group, head_dim, generator=gen).to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    pva.paged_varlen_attention(q, k_cache, v_cache, qsl, lens, tables, scale, out=out, **kwargs)
    ref = pva.paged_varlen_attention_ref(q, k_cache, v_cache, qsl, lens, tables, scale,
                                         sliding_window=kwargs.get("sliding_window"))
    assert not ref[:num_tokens].isnan().any()
    torch.testing.assert_close(out[:num_tokens], ref[:num_tokens], **TOL[dtype])
    assert out[num_tokens:].isnan().all()  # rows outside every sequence are the caller's: untouched


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(dtype, group):
    run_case(STEP, num_kv_heads=2, group=group, head_dim=32, dtype=dtype)


def test_fp16_small_tiles_and_block_size():
    # 4 query tokens per tile: a chunk spans many tiles, each with its own causal range
    run_case(STEP, num_kv_heads=2, group=4, head_dim=64, dtype=torch.float16, block_size=8, block_m=16, block_n=16)


def test_one_sequence_many_tiles():
    # a lone prompt chunk after a prefix: 8 query tiles of 4 tokens, no padding rows past it
    run_case([(9, 32)], num_kv_heads=1, group=4, head_dim=16, dtype=torch.float32, padding_rows=0, block_m=16)


def test_group_not_dividing_the_tile():
    # group 3: a 64-row tile holds 21 tokens and one padding row
    run_case(STEP, num_kv_heads=1, group=3, head_dim=16, dtype=torch.float32)


@pytest.mark.parametrize("block_m", [16, 64])
def test_sliding_window(block_m):
    # windows shorter than a chunk, starting mid-block and mid-tile; rows of one tile whose windows
    # begin in different key tiles (some see nothing in the first tile the program loads)
    run_case(STEP + [(100, 50)], num_kv_heads=2, group=4, head_dim=32, dtype=torch.float32,
             sliding_window=21, block_m=block_m, block_n=16)


def test_rejects_unsupported_shapes():
    qsl = torch.tensor([0, 1], dtype=torch.int32)
    lens = torch.ones(1, dtype=torch.int32)
    tables = torch.zeros(1, 1, dtype=torch.int32)
    cache = torch.zeros(2, 16, 2, 96)
    with pytest.raises(ValueError, match="power-of-2 head_dim"):
        pva.paged_varlen_attention(torch.zeros(1, 4, 96), cache, cache, qsl, lens, tables, 1.0)
    cache = torch.zeros(2, 12, 2, 64)
    with pytest.raises(ValueError, match="power-of-2 block_size"):
        pva.paged_varlen_attention(torch.zeros(1, 4, 64), cache, cache, qsl, lens, tables, 1.0)
    cache = torch.zeros(2, 16, 3, 64)
    with pytest.raises(ValueError, match="not a multiple"):
        pva.paged_varlen_attention(torch.zeros(1, 4, 64), cache, cache, qsl, lens, tables, 1.0)
