"""Fused OT argmax kernel vs the full score matrix and the streaming reference. On CPU the kernel
runs in Triton's interpreter; on a GPU the compiled kernel is tested."""
from __future__ import annotations

import pytest
import torch

from leanserve.kernels import ot_argmax as ota

# on CPU, tests/conftest.py has turned Triton's interpreter on before this module was imported
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def full_matrix_argmax(x, y, h):
    score = x.double() @ y.double().T + h.double()
    idx = score.argmax(dim=1)
    return score.gather(1, idx[:, None]).squeeze(1), idx


@pytest.mark.parametrize("num_queries,num_targets,dim", [(37, 45, 19), (64, 96, 32), (5, 1, 3), (33, 70, 70)])
def test_kernel_matches_the_full_score_matrix(num_queries, num_targets, dim):
    # sizes not multiples of the 32-wide tiles, D not a multiple of the D-chunk, a single target
    gen = torch.Generator().manual_seed(num_queries * 1000 + num_targets)
    x = torch.randn(num_queries, dim, generator=gen)
    y = torch.randn(num_targets, dim, generator=gen)
    h = torch.randn(num_targets, generator=gen)
    expected_best, expected_idx = full_matrix_argmax(x, y, h)

    best, idx = ota.ot_argmax_triton(x.to(DEVICE), y.to(DEVICE), h.to(DEVICE))
    ref_best, ref_idx = ota.ot_argmax_ref(x, y, h, tile=16)

    for b, i in ((best.cpu(), idx.cpu()), (ref_best, ref_idx)):
        assert i.dtype == torch.int64 and b.dtype == torch.float32
        assert torch.equal(i, expected_idx)
        torch.testing.assert_close(b.double(), expected_best, rtol=1e-5, atol=1e-5)


def test_outputs_are_fully_written():
    # poisoned outputs: every row of a ragged last block is overwritten, nothing past the last row
    gen = torch.Generator().manual_seed(1)
    x, y, h = torch.randn(41, 8, generator=gen), torch.randn(50, 8, generator=gen), torch.randn(50, generator=gen)
    best = torch.full((43,), float("nan"), device=DEVICE)
    idx = torch.full((43,), -7, dtype=torch.int64, device=DEVICE)
    _, got_idx = ota.ot_argmax_triton(x.to(DEVICE), y.to(DEVICE), h.to(DEVICE), out=(best[:41], idx[:41]))
    expected_best, expected_idx = full_matrix_argmax(x, y, h)
    assert torch.equal(idx[:41].cpu(), expected_idx) and torch.equal(got_idx.cpu(), expected_idx)
    torch.testing.assert_close(best[:41].cpu().double(), expected_best, rtol=1e-5, atol=1e-5)
    assert best[41:].isnan().all() and (idx[41:] == -7).all()


def test_ties_go_to_the_smallest_index_across_tiles():
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(80, 16, generator=gen)
    h = torch.randn(80, generator=gen)
    winner = 70
    h[winner] += 100.0
    for twin in (5, 40, 41):  # exact copies: a tie across tiles (0..31 vs 64..79) and inside one tile
        y[twin] = y[winner].clone()
        h[twin] = h[winner].clone()
    x = torch.randn(9, 16, generator=gen)
    _, idx = ota.ot_argmax_triton(x.to(DEVICE), y.to(DEVICE), h.to(DEVICE))
    _, ref_idx = ota.ot_argmax_ref(x, y, h, tile=32)
    assert (idx.cpu() == 5).all() and (ref_idx == 5).all()


# Triton's CPU interpreter computes bf16 tl.dot wrongly; bf16 is tested on the GPU only
HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_inputs_accumulate_in_fp32(dtype):
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(20, 40, generator=gen).to(dtype), torch.randn(35, 40, generator=gen).to(dtype)
    h = torch.randn(35, generator=gen)
    expected_best, _ = full_matrix_argmax(x.float(), y.float(), h)
    best, idx = ota.ot_argmax_triton(x.to(DEVICE), y.to(DEVICE), h.to(DEVICE))
    # half-precision products are exact in fp32, so the only error is fp32 summation
    torch.testing.assert_close(best.cpu().double(), expected_best, rtol=1e-4, atol=1e-4)
    chosen = (x.double() @ y.double().T + h.double()).gather(1, idx.cpu()[:, None]).squeeze(1)
    torch.testing.assert_close(chosen, expected_best, rtol=1e-4, atol=1e-4)


def test_shape_errors_and_dispatch():
    x, y, h = torch.randn(4, 3), torch.randn(5, 3), torch.randn(5)
    with pytest.raises(ValueError):
        ota.ot_argmax(x, y, h[:4])
    with pytest.raises(ValueError):
        ota.ot_argmax(x, torch.randn(0, 3), torch.randn(0))
    assert torch.equal(ota.ot_argmax(x, y, h)[1], full_matrix_argmax(x, y, h)[1])


@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_target_splits_match_one_pass_and_keep_the_tie_rule(num_splits):
    # a lookup's grid: few queries, the targets split over programs and reduced after the kernel
    gen = torch.Generator().manual_seed(4)
    y, h = torch.randn(150, 24, generator=gen), torch.randn(150, generator=gen)
    winner = 140
    h[winner] += 100.0
    y[7], h[7] = y[winner].clone(), h[winner].clone()  # a tie between the first and the last split
    x = torch.randn(6, 24, generator=gen)
    expected_best, expected_idx = full_matrix_argmax(x, y, h)
    config = (16, 32, 16, 4, 1)  # 32-target tiles: 5 tiles over 150 targets
    best, idx = ota.ot_argmax_triton(x.to(DEVICE), y.to(DEVICE), h.to(DEVICE), config=config, num_splits=num_splits)
    assert torch.equal(idx.cpu(), expected_idx) and (idx.cpu() == 7).all()
    torch.testing.assert_close(best.cpu().double(), expected_best, rtol=1e-5, atol=1e-5)


def test_split_choice_fills_the_gpu_only_when_queries_do_not():
    # one query block: as many splits as 2 programs per SM want, at most one per target tile
    # (splits hold equal whole numbers of tiles, so the count lands just under the wish)
    assert ota.num_target_splits(1, 100_000, 64, 64, 132) == 261  # 1563 tiles, 6 per split
    assert ota.num_target_splits(1, 10_000, 64, 64, 132) == 157  # 157 tiles, 1 per split
    assert ota.num_target_splits(256, 10_000, 64, 64, 132) == 53  # 4 query blocks x 53 splits, 3 tiles each
    assert ota.num_target_splits(100_000, 10_000, 64, 64, 132) == 1  # 1563 query blocks already fill it
    assert ota.num_target_splits(1, 50, 64, 64, 132) == 1  # one tile cannot be split
