"""The MoA plan file and the one definition of what a rule keeps (models/moa_plan.py)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from leanserve.errors import UserError
from leanserve.models import moa_plan as mp


@pytest.mark.parametrize("alpha,beta,n,block,expected", [
    (0, 0.5, 4096, 64, 2048),        # half the tokens
    (0, 0.5, 100, 64, 128),          # the 2-block minimum
    (0, 0.125, 1000, 64, 128),       # 125 tokens -> rounded up to whole blocks
    (-1024, 1.0, 2048, 64, 1024),    # a span that grows with N
    (8192, 0.0, 4096, 64, 4096),     # capped at N (dense)
    (0, 1.0, 70, 16, 80),            # dense, rounded up to a block
    (40, 0.0, 512, 16, 48),
])
def test_kv_slots(alpha, beta, n, block, expected):
    assert mp.kv_slots(alpha, beta, n, block) == expected
    assert mp.kv_blocks(alpha, beta, n, block) * block == expected


def test_kv_slots_tensor_is_kv_slots():
    gen = torch.Generator().manual_seed(0)
    alphas = (torch.randint(-8, 33, (40,), generator=gen) * 32.0).double()
    betas = (torch.randint(0, 9, (40,), generator=gen) / 8).double()
    n = torch.arange(1, 1500, 7)
    got = mp.kv_slots_tensor(alphas[:, None], betas[:, None], n[None, :], 32)
    want = [[mp.kv_slots(a, b, m, 32) for m in n.tolist()] for a, b in zip(alphas.tolist(), betas.tolist())]
    assert got.tolist() == want


def test_span_mask_keeps_the_sink_and_the_last_ring_keys():
    n, sink, ring = 20, 4, 6
    mask = mp.span_mask(n, sink, ring)
    for i in range(n):
        visible = {j for j in range(n) if mask[i, j]}
        assert visible == {j for j in range(i + 1) if j < sink or i - j < ring}
        assert len(visible) == min(i + 1, sink + ring)  # exactly C = S + R slots once the ring is full
    assert torch.equal(mp.span_mask(8, 4, 60), torch.ones(8, 8, dtype=torch.bool).tril())
    assert mp.sink_and_ring(128, 64) == (64, 64) and mp.sink_and_ring(2048, 64) == (64, 1984)


def make_plan(**changes) -> mp.MoAPlan:
    plan = mp.MoAPlan(
        model={"name": "t", "num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16},
        alphas=[[0.0, -32.0], [64.0, 64.0]], betas=[[0.5, 1.0], [0.0, 0.0]],
        profile_lengths=[64, 128, 256], extend_length=512, validation_length=384, density_target=0.5,
        block_size=16)
    for key, value in changes.items():
        setattr(plan, key, value)
    return plan


def test_density_is_the_mean_of_the_units_slots():
    plan = make_plan()
    # at 256: C = 128, 224, 64, 64 -> 480 / (4 * 256)
    assert plan.slots(256) == [[128, 224], [64, 64]]
    assert plan.density(256) == pytest.approx(480 / 1024)


def test_save_and_load_round_trip(tmp_path):
    plan = make_plan()
    plan.density_at = {str(n): plan.density(n) for n in plan.lengths()}
    mp.save_plan(tmp_path / mp.PLAN_FILE, plan)
    raw = json.loads((tmp_path / mp.PLAN_FILE).read_text())
    assert raw["format"] == mp.FORMAT and raw["sink_tokens"] == 16 and raw["min_cache_tokens"] == 32
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    assert mp.load_plan(tmp_path / mp.PLAN_FILE, config) == plan


@pytest.mark.parametrize("changes,message", [
    ({"alphas": [[0.0, -32.0]]}, "alphas must be 2 lists"),
    ({"betas": [[0.5, 1.0], [0.0]]}, "betas must be 2 lists"),
    ({"alphas": [[-64.0, -32.0], [64.0, 64.0]]}, "keeps no tokens at the shortest length 64"),
    ({"betas": [[1.5, 1.0], [0.0, 0.0]]}, "outside"),
    ({"rule_cap_per_layer": 1}, "layer 0 has 2 distinct rules"),
    ({"block_size": 24}, "power of two"),
    ({"profile_lengths": [128, 64]}, "increasing"),
    ({"extend_length": 128}, "below the longest profile length"),
    ({"density_at": {"256": 0.5}}, "not the plan's density"),
    ({"unit": "layer"}, "unit must be"),
    ({"model": {"num_layers": 2, "num_q_heads": 3, "num_kv_heads": 2, "head_dim": 16}}, "not a multiple"),
])
def test_invalid_plans_are_refused(changes, message):
    with pytest.raises(UserError, match=message):
        mp.validate_plan(make_plan(**changes))


def test_load_refuses_other_files_and_other_models(tmp_path):
    path = tmp_path / mp.PLAN_FILE
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        mp.load_plan(path)
    path.write_text(json.dumps({"alphas": [], "betas": []}))
    with pytest.raises(UserError, match="not a MoA plan"):
        mp.load_plan(path)
    raw = make_plan().to_json()
    path.write_text(json.dumps({**raw, "colour": "red"}))
    with pytest.raises(UserError, match="unknown keys"):
        mp.load_plan(path)
    path.write_text(json.dumps({**raw, "sink_tokens": 64}))
    with pytest.raises(UserError, match="sink_tokens must equal block_size"):
        mp.load_plan(path)
    path.write_text(json.dumps(raw))
    other = SimpleNamespace(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, hidden_size=64)
    with pytest.raises(UserError, match="num_layers 2 != 3, num_kv_heads 2 != 4"):
        mp.load_plan(path, other)
