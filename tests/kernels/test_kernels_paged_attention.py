"""Triton paged decode attention vs its PyTorch reference. On CPU the kernels run in Triton's
interpreter; on a GPU the compiled kernels are tested (plus the CUDA dispatch in models/attention/paged)."""
from __future__ import annotations

import math

import pytest
import torch
from paged_kv_builders import TOL, make_paged_kv

from leanserve.kernels import paged_attention as pa

# on CPU, tests/conftest.py has turned Triton's interpreter on before this module was imported
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("interpreter_bf16_dot")  # tests/conftest.py


def run_case(seq_lens: list[int], num_kv_heads: int, group: int, head_dim: int, dtype: torch.dtype,
             block_size: int = 16, seed: int = 0, **kwargs) -> None:
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables = make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, DEVICE)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    pa.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, max(seq_lens), out=out, **kwargs)
    ref = pa.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale,
                                        sliding_window=kwargs.get("sliding_window"))
    assert not ref.isnan().any()
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("num_splits", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(dtype, head_dim, group, num_splits):
    # ragged: 1 token, inside one block, exact block multiples, several 64-token tiles
    gen = torch.Generator().manual_seed(head_dim + group)
    seq_lens = [1, 16, 64] + torch.randint(2, 160, (2,), generator=gen).tolist() + [150]
    run_case(seq_lens, num_kv_heads=2, group=group, head_dim=head_dim, dtype=dtype, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp16_and_other_block_size(num_splits):
    run_case([5, 33, 97], num_kv_heads=2, group=4, head_dim=64, dtype=torch.float16, block_size=8,
             num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [None, 1, 2])
def test_sliding_window(num_splits):
    # windows shorter than, equal to and longer than the contexts, starting mid-block and mid-tile
    run_case([1, 30, 40, 41, 150, 200], num_kv_heads=2, group=4, head_dim=64, dtype=torch.float32,
             sliding_window=40, num_splits=num_splits)


def test_split_heuristic():
    # short contexts and full batches: one split; one long sequence: many, capped
    assert pa.num_kv_splits(num_seqs=1, num_kv_heads=8, max_seq_len=100, num_sms=132) == 1
    assert pa.num_kv_splits(num_seqs=256, num_kv_heads=8, max_seq_len=32768, num_sms=132) == 1
    long = pa.num_kv_splits(num_seqs=1, num_kv_heads=8, max_seq_len=32768, num_sms=132)
    assert 1 < long <= pa.MAX_SPLITS
    assert 1 < pa.num_kv_splits(num_seqs=8, num_kv_heads=8, max_seq_len=4096, num_sms=132) < long
    # the heuristic's own choice (here 2 splits for 600 tokens) runs end to end
    assert pa.num_kv_splits(num_seqs=1, num_kv_heads=1, max_seq_len=600, num_sms=132) == 2
    run_case([600], num_kv_heads=1, group=4, head_dim=64, dtype=torch.float32)


def test_rejects_unsupported_shapes():
    q = torch.zeros(1, 4, 96)
    cache = torch.zeros(2, 16, 2, 96)
    tables = torch.zeros(1, 1, dtype=torch.int32)
    lens = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="power-of-2 head_dim"):
        pa.paged_decode_attention(q, cache, cache, tables, lens, 1.0, 1)
    cache = torch.zeros(2, 12, 2, 64)
    with pytest.raises(ValueError, match="power-of-2 block_size"):
        pa.paged_decode_attention(q[..., :64], cache, cache, tables, lens, 1.0, 1)


@pytest.mark.skipif(DEVICE != "cuda", reason="the Triton dispatch in models/attention/paged is CUDA-only")
def test_layers_dispatch_matches_torch_path():
    from leanserve.models.attention.metadata import AttentionMetadata
    from leanserve.models.attention.paged import paged_attention, paged_decode_attention_torch

    seq_lens = [3, 70, 300]
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache, tables = make_paged_kv(seq_lens, 2, 64, 16, torch.bfloat16, gen, DEVICE)
    k_cache, v_cache = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)  # the engine zero-fills its cache
    q = torch.randn(len(seq_lens) + 2, 8, 64, generator=gen).bfloat16().cuda()  # 2 padding rows
    meta = AttentionMetadata(slot_mapping=torch.full((5,), -1, device="cuda"),
                             query_start_loc=torch.arange(4, dtype=torch.int32, device="cuda"),
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
                             block_tables=tables, max_query_len=1, max_seq_len=max(seq_lens), block_size=16)
    out = paged_attention(q, k_cache, v_cache, meta, 1 / math.sqrt(64))
    torch.testing.assert_close(out, paged_decode_attention_torch(q, k_cache, v_cache, meta, 1 / math.sqrt(64)),
                               **TOL[torch.bfloat16])
