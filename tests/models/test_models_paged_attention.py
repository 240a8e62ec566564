"""The one attention dispatch (`paged_attention`: the PyTorch paths on CPU, the Triton kernels on
CUDA) against the varlen reference, on caches whose unowned slots hold NaN."""
from __future__ import annotations

import pytest
import torch
from paged_kv_builders import TOL, make_paged_kv

from leanserve.kernels.paged_varlen_attention import paged_varlen_attention_ref
from leanserve.models.attention.metadata import AttentionMetadata
from leanserve.models.attention.paged import context_slots, paged_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 16

# (cached prefix, new tokens) per sequence
MIXED = [(0, 37), (20, 1), (5, 70), (64, 16), (0, 1), (130, 1)]
DECODE = [(0, 1), (20, 1), (64, 1), (130, 1)]


def step(chunks: list[tuple[int, int]], padding_rows: int, precomputed: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in chunks]
    k_cache, v_cache, tables = make_paged_kv(seq_lens, 2, 64, BLOCK_SIZE, torch.float32, gen, DEVICE)
    qsl = [0]
    for _, n in chunks:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1] + padding_rows, 8, 64, generator=gen).to(DEVICE)
    meta = AttentionMetadata(
        slot_mapping=torch.full((q.shape[0],), -1, device=DEVICE),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), block_tables=tables,
        max_query_len=max(n for _, n in chunks), max_seq_len=max(seq_lens), block_size=BLOCK_SIZE,
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
    if precomputed:
        meta.context_slots = context_slots(tables, meta.seq_lens, meta.max_seq_len, BLOCK_SIZE)
    return q, k_cache, v_cache, meta


@pytest.mark.parametrize("sliding_window", [None, 21])
@pytest.mark.parametrize("precomputed", [False, True])
@pytest.mark.parametrize("chunks", [MIXED, DECODE], ids=["mixed", "decode"])
def test_dispatch_matches_reference(chunks, precomputed, sliding_window):
    q, k_cache, v_cache, meta = step(chunks, padding_rows=2, precomputed=precomputed)
    out = paged_attention(q, k_cache, v_cache, meta, 0.125, sliding_window)
    ref = paged_varlen_attention_ref(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                     0.125, sliding_window)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    assert (out[-2:] == 0).all()  # padding tokens' rows


def test_context_slots_pad_with_written_slots():
    tables = torch.tensor([[3, 1, -1], [0, 2, 4]], dtype=torch.int32)
    slots = context_slots(tables, torch.tensor([20, 3], dtype=torch.int32), 20, 16)
    assert slots[0].tolist() == list(range(48, 64)) + [16, 17, 18, 19]
    assert slots[1].tolist() == [0, 1, 2] + [0] * 17  # past seq_len: position 0's slot, never a -1 block
