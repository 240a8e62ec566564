"""MoA influence: the per-entry formula against autograd, an explicit mask-and-renormalise recompute
and the finite-difference loss change; the distance-bucket aggregation against a plain loop; the
fused Triton kernel (Triton's interpreter on CPU) against the reference."""
from __future__ import annotations

import pytest
import torch

from leanserve.kernels import moa_influence as mi

pytestmark = pytest.mark.usefixtures("one_thread")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(hq, hkv, n, d, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(h, n, d, generator=gen, dtype=dtype) for h in (hq, hkv, hkv))
    w = torch.randn(hq, n, d, generator=gen, dtype=dtype)
    return q, k, v, w


def _attention(q, k, v, scale, masked: tuple[int, int, int] | None = None):
    """(A, O) with causal softmax; `masked` = (head, i, j) removes that one entry before the softmax."""
    group = q.shape[0] // k.shape[0]
    kk, vv = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    n = q.shape[1]
    s = q @ kk.transpose(1, 2) * scale
    keep = torch.ones(n, n, dtype=torch.bool).tril().expand(q.shape[0], n, n).clone()
    if masked is not None:
        keep[masked] = False
    a = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
    return a, a @ vv


def _loss(o, w):
    return (torch.tanh(o) * w).sum()  # nonlinear in O: the first-order estimate is not exact


def _dense_case(hq=4, hkv=2, n=40, d=8, seed=0, scale=0.5):
    q, k, v, w = _inputs(hq, hkv, n, d, seed)
    a, o = _attention(q.requires_grad_(True), k, v, scale)
    q = q.detach()
    a.retain_grad()
    o.retain_grad()
    _loss(o, w).backward()
    return q, k, v, w, a.detach(), o.detach(), o.grad, a.grad, scale


def test_entries_match_autograd_through_the_attention_matrix():
    # MoA's form: D_i = sum_k A_ik G_ik with G = dL/dA, E = A (D - G) / (1 - A)
    q, k, v, w, a, o, do, g, scale = _dense_case()
    d = (a * g).sum(-1, keepdim=True)
    expected = a * (d - g) / (1 - a).clamp_min(mi.EPS)
    got = mi.influence_entries(q, k, v, o, do, scale, torch.arange(q.shape[1])).double()
    # row 0 (A_00 = 1) cannot be renormalised: 0/0, clamped; it lies in the always-kept sink
    torch.testing.assert_close(got[:, 1:], expected[:, 1:], rtol=1e-4, atol=1e-6)


def test_entries_equal_the_explicit_mask_and_renormalise_change():
    q, k, v, w, a, o, do, g, scale = _dense_case(seed=1)
    entries = mi.influence_entries(q, k, v, o, do, scale, torch.arange(q.shape[1])).double()
    for h, i, j in [(0, 5, 0), (1, 17, 9), (3, 39, 38), (2, 30, 1), (1, 12, 12)]:
        _, masked = _attention(q, k, v, scale, masked=(h, i, j))
        exact = (do[h, i] * (masked[h, i] - o[h, i])).sum()  # dO . (O' - O), O' recomputed without key j
        assert entries[h, i, j].item() == pytest.approx(exact.item(), rel=1e-5, abs=1e-9)


def test_entries_predict_the_loss_change_for_small_weights():
    q, k, v, w, a, o, do, g, scale = _dense_case(seed=2, n=64)
    entries = mi.influence_entries(q, k, v, o, do, scale, torch.arange(64)).double()
    base = _loss(o, w)
    small = [(h, i, j) for h in range(4) for i in range(8, 64, 7) for j in range(0, i, 5) if a[h, i, j] < 0.05]
    assert len(small) > 20
    errors, changes = [], []
    for h, i, j in small:
        _, masked = _attention(q, k, v, scale, masked=(h, i, j))
        change = (_loss(masked, w) - base).item()
        # Taylor: only O[h, i] moves, and |d2 tanh| <= 0.77, so the error is at most 0.385 |w| |dO|^2
        remainder = 0.385 * w[h, i].abs().max().item() * (masked[h, i] - o[h, i]).pow(2).sum().item()
        assert abs(entries[h, i, j].item() - change) <= remainder + 1e-9
        errors.append(abs(entries[h, i, j].item() - change))
        changes.append(abs(change))
    assert sum(errors) < 0.1 * sum(changes)


def test_reference_buckets_by_distance_past_the_sink():
    q, k, v, w, a, o, do, g, scale = _dense_case(n=45, seed=3)
    block = 8
    entries = mi.influence_entries(q, k, v, o, do, scale, torch.arange(45)).abs()
    expected = torch.zeros(4, 6, 6, dtype=torch.float64)
    for i in range(45):
        for j in range(block, i + 1):  # keys of the sink block are never dropped
            expected[:, i // block, (i - j) // block] += entries[:, i, j]
    got = mi.influence_ref(q, k, v, o, do, scale, block, rows=7)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("hq,hkv,n,d,block", [(4, 2, 70, 8, 16), (2, 2, 64, 32, 16), (4, 1, 100, 24, 32),
                                              (2, 1, 12, 16, 16)])
def test_kernel_matches_the_reference(hq, hkv, n, d, block):
    # ragged last block, MHA, GQA 4:1 with a head size that is not a power of two, N below one block
    gen = torch.Generator().manual_seed(n)
    q, k, v, o, do = (torch.randn(h, n, d, generator=gen) for h in (hq, hkv, hkv, hq, hq))
    expected = mi.influence_ref(q, k, v, o, do, 0.3, block)
    got = mi.influence_triton(*(t.to(DEVICE) for t in (q, k, v, o, do)), 0.3, block).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)
    if n <= block:
        assert not got.any()  # only sink keys: nothing a rule can drop


def test_kernel_bf16(interpreter_bf16_dot):
    gen = torch.Generator().manual_seed(5)
    q, k, v, o, do = (torch.randn(h, 48, 16, generator=gen).bfloat16() for h in (2, 1, 1, 2, 2))
    expected = mi.influence_ref(q, k, v, o, do, 0.25, 16)
    got = mi.influence_triton(*(t.to(DEVICE) for t in (q, k, v, o, do)), 0.25, 16).cpu()
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-3)


def test_kernel_rejects_block_sizes_it_cannot_tile():
    q = torch.randn(2, 32, 16)
    with pytest.raises(ValueError, match="power-of-two"):
        mi.influence_triton(q, q, q, q, q, 0.25, 24)
