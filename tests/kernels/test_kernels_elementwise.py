"""The fused RMSNorm(+residual), rotary and SiLU*mul Triton kernels against the PyTorch layers they replace on
CUDA (models/layers.py). On CPU the kernels run in Triton's interpreter (tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leanserve.kernels import elementwise as ew
from leanserve.models.layers import RotaryEmbedding, _apply_rotary, rms_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16: Triton's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest, one ulp (2^-8 relative)
# per rounding, and these kernels round twice (the normalised row or the gate, then the product)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=2.0 ** -6, atol=2.0 ** -6) if DEVICE == "cpu" else dict(rtol=2.0 ** -8, atol=2.0 ** -8)}


def _randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96])  # 96: a row shorter than its power-of-2 block
def test_rms_norm_with_and_without_residual(dtype, hidden):
    x, res = _randn(5, hidden, dtype=dtype), _randn(5, hidden, dtype=dtype, seed=1)
    w = (1 + 0.1 * _randn(hidden, dtype=torch.float32, seed=2)).to(dtype)
    torch.testing.assert_close(ew.rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6), **TOL[dtype])
    out, summed = ew.rms_norm(x, w, 1e-6, residual=res)
    torch.testing.assert_close(summed, x + res, **TOL[dtype])  # the residual stream, rounded once as x + residual
    torch.testing.assert_close(out, rms_norm(x + res, w, 1e-6), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_of_strided_q_and_k_views(dtype):
    """q and k as views into a fused qkv row (the model's split), GQA 6:2, positions out of order."""
    num_tokens, hq, hkv, d = 7, 6, 2, 16
    qkv = _randn(num_tokens, (hq + 2 * hkv) * d, dtype=dtype)
    q = qkv[:, :hq * d].view(num_tokens, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(num_tokens, hkv, d)
    rope = RotaryEmbedding(d, 64, {"rope_theta": 10000.0})
    positions = torch.tensor([5, 0, 63, 17, 17, 2, 40], device=DEVICE)
    # the PyTorch path itself (on CUDA the module dispatches to the kernel under test)
    cos, sin = rope.cos_sin_cache.to(DEVICE)[positions].unsqueeze(1).chunk(2, dim=-1)
    want_q, want_k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
    got_q, got_k = ew.rotary(q, k, rope.cos_sin_cache.to(DEVICE), positions)
    assert got_q.is_contiguous() and got_k.is_contiguous()
    torch.testing.assert_close(got_q, want_q, **TOL[dtype])
    torch.testing.assert_close(got_k, want_k, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [48, 1100])  # 1100: more than one 1024-column block per row
def test_silu_and_mul(dtype, inter):
    x = 3 * _randn(4, 2 * inter, dtype=dtype)
    gate, up = x.chunk(2, dim=-1)  # models/layers.SiluAndMul's PyTorch path
    torch.testing.assert_close(ew.silu_and_mul(x), F.silu(gate) * up, **TOL[dtype])
    torch.testing.assert_close(ew.silu_and_mul(x).float(), F.silu(gate.float()) * up.float(), rtol=2e-2, atol=2e-2)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="rms_norm"):
        ew.rms_norm(_randn(2, 8, dtype=torch.float32), _randn(4, dtype=torch.float32), 1e-6)
    with pytest.raises(ValueError, match="silu_and_mul"):
        ew.silu_and_mul(_randn(2, 7, dtype=torch.float32))
