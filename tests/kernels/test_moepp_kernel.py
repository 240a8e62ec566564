"""The fused MoE++ kernel (bf16) against the fp32 eager reference (kernels/moepp_reference.py), with
the spec's edge cases: ZC-only tokens, forced slot pairs, empty and hot experts, poisoned scratch,
determinism, the gating-residual chain, constant logits, all-zero gates. On CPU the kernels run in
Triton's interpreter (tiny shapes); on a GPU the compiled kernels are tested, plus graph replay."""
from __future__ import annotations

import pytest
import torch

from leanserve.kernels import moepp
from leanserve.kernels.moepp import GemmTiles, MoEPPWorkspace, MoETiles, default_tiles, moepp_forward, use_fast_path
from leanserve.kernels.moepp_reference import MoEPPLayout, force_routing, moepp_forward_reference, route

pytestmark = pytest.mark.usefixtures("interpreter_bf16_dot", "one_thread")  # tests/conftest.py
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
D, I = 40, 48  # neither a multiple of the K tiles: masked tails
LAYOUT = MoEPPLayout(n_ffn=8, n_const=2)  # 8 FFN, const 8-9, copy 10, zero 11


def weights(layout: MoEPPLayout, seed: int = 0, dim: int = D, inter: int = I) -> dict:
    g = torch.Generator().manual_seed(seed)
    n, e, c = layout.n_experts, layout.n_ffn, layout.n_const
    return dict(router_w=torch.randn(n, dim, generator=g) * 0.5, gate_map=torch.randn(n, n, generator=g) * 0.3,
                w13=(torch.randn(e, 2 * inter, dim, generator=g) / dim ** 0.5).bfloat16(),
                w2=(torch.randn(e, dim, inter, generator=g) / inter ** 0.5).bfloat16(),
                const_gate=torch.randn(2 * c, dim, generator=g) * 0.3 if c else None,
                const_v=torch.randn(c, dim, generator=g).bfloat16() if c else None)


def tokens(num_tokens: int, seed: int = 1, dim: int = D) -> torch.Tensor:
    return torch.randn(num_tokens, dim, generator=torch.Generator().manual_seed(seed)).bfloat16()


def reference(x, w, layout, prev=None, forced_ids=None):
    routing = route(x.float(), w["router_w"], layout, prev, w["gate_map"] if prev is not None else None)
    if forced_ids is not None:
        routing = force_routing(routing, forced_ids, layout)
    f = {k: (v.float() if v is not None else None) for k, v in w.items()}
    y = moepp_forward_reference(x.float(), routing, f["w13"], f["w2"], f["const_gate"], f["const_v"], layout)
    return y, routing


def kernel(x, w, layout, prev=None, forced_ids=None, workspace=None, tiles=None):
    dev = {k: (v.to(DEVICE) if v is not None else None) for k, v in w.items()}
    y, logits = moepp_forward(x.to(DEVICE), dev["router_w"], dev["const_gate"],
                              prev.to(DEVICE) if prev is not None else None,
                              dev["gate_map"] if prev is not None else None, dev["w13"], dev["w2"], dev["const_v"],
                              layout, workspace=workspace, tiles=tiles,
                              forced_ids=forced_ids.to(DEVICE) if forced_ids is not None else None)
    return y.cpu(), logits.cpu()


def workspace(num_tokens, layout, poison=True, tiles=None):
    ws = MoEPPWorkspace.allocate(num_tokens, layout, D, I, torch.bfloat16, DEVICE,
                                 tiles or default_tiles(num_tokens * layout.top_k, layout.n_ffn))
    if poison:  # any read of a row nobody wrote shows up: NaN rows, or slot 0's data in a wrong place
        for t in (ws.h, ws.out_slot, ws.logits, ws.gates, ws.s, ws.b):
            t.fill_(float("nan"))
        for t in (ws.sorted_slots, ws.expert_ends, ws.counts, ws.rank):
            t.zero_()
    return ws


def assert_close_rel(y, ref, tol=1e-2):
    assert torch.isfinite(y).all()
    err = (y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)
    assert err <= tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("num_tokens", [1, 2, 17])
def test_matches_reference_with_gating_residual(num_tokens, monkeypatch):
    monkeypatch.setattr(moepp, "ROUTE_BLOCK_D", 16)  # the router GEMM in 3 D-splits, the last one ragged
    assert moepp.router_splits(num_tokens, D, torch.device(DEVICE)) == (3, 16)
    w, x = weights(LAYOUT), tokens(num_tokens)
    prev = torch.randn(num_tokens, LAYOUT.n_experts, generator=torch.Generator().manual_seed(2))
    assert use_fast_path(num_tokens * 2, LAYOUT.n_ffn) == (num_tokens == 1)  # T = 1 takes the decode path
    ws = workspace(num_tokens, LAYOUT)
    y, logits = kernel(x, w, LAYOUT, prev, workspace=ws)
    ref_y, routing = reference(x, w, LAYOUT, prev)
    torch.testing.assert_close(logits, routing.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(ws.ids.cpu().long(), routing.ids)
    torch.testing.assert_close(ws.gates.cpu(), routing.gates, rtol=1e-5, atol=1e-6)
    assert y.dtype == torch.bfloat16
    assert_close_rel(y, ref_y)


@pytest.mark.parametrize("mode", ["paper", "mixtral"])
def test_other_renorm_modes(mode):
    layout = MoEPPLayout(n_ffn=8, n_const=2, renorm_mode=mode)
    w, x = weights(layout, seed=3), tokens(17, seed=4)
    ws = workspace(17, layout)
    y, _ = kernel(x, w, layout, workspace=ws)
    ref_y, routing = reference(x, w, layout)
    assert torch.equal(ws.ids.cpu().long(), routing.ids)
    torch.testing.assert_close(ws.gates.cpu(), routing.gates, rtol=1e-5, atol=1e-6)
    assert_close_rel(y, ref_y)


def test_zc_only_tokens_give_x_exactly_with_empty_grids():
    layout, num_tokens = LAYOUT, 17
    w, x = weights(layout), tokens(num_tokens)
    pairs = [[layout.first_copy, layout.first_zero], [layout.first_zero, layout.first_copy]]
    ids = torch.tensor(pairs * 9)[:num_tokens]
    ws = workspace(num_tokens, layout)
    y, _ = kernel(x, w, layout, forced_ids=ids, workspace=ws)
    assert torch.equal(y, x)
    assert ws.expert_ends.max().item() == 0  # no FFN row at all: every GEMM program exits


def test_forced_slot_pairs():
    """(FFN, zero) -> the FFN output with weight 1 (released) or p (paper); (copy, zero) -> x bit-exact;
    (const, const); (copy, const); (FFN, FFN); (FFN, const), token by token."""
    L = LAYOUT
    c0, c1, cp, z = L.n_ffn, L.n_ffn + 1, L.first_copy, L.first_zero
    ids = torch.tensor([[3, z], [cp, z], [c0, c1], [cp, c1], [z, 5], [2, 6], [7, c0], [c1, cp]])
    for mode in ("released", "paper"):
        layout = MoEPPLayout(n_ffn=8, n_const=2, renorm_mode=mode)
        w, x = weights(layout, seed=5), tokens(len(ids), seed=6)
        ws = workspace(len(ids), layout)
        y, _ = kernel(x, w, layout, forced_ids=ids, workspace=ws)
        ref_y, routing = reference(x, w, layout, forced_ids=ids)
        gates = ws.gates.cpu()
        torch.testing.assert_close(gates, routing.gates, rtol=1e-5, atol=1e-6)
        if mode == "released":
            assert gates[0].tolist() == [1.0, 0.0] and gates[4].tolist() == [0.0, 1.0]
            assert torch.equal(y[1], x[1])
        else:
            torch.testing.assert_close(gates[0, 0], routing.probs[0, 3])
        assert_close_rel(y, ref_y)


def test_empty_experts_and_one_hot_expert():
    """17 tokens: every one on expert 3 (two 16-row blocks), some also on expert 6; the other FFN
    experts get none. The alignment lays each expert's slots out in slot order, then sentinels."""
    layout, num_tokens = LAYOUT, 17
    w, x = weights(layout, seed=7), tokens(num_tokens, seed=8)
    second = torch.tensor([6 if t % 3 == 0 else layout.first_copy + (t % 2) for t in range(num_tokens)])
    ids = torch.stack([torch.full((num_tokens,), 3), second], dim=1)
    tiles = default_tiles(1, layout.n_ffn)  # 16-row blocks
    ws = workspace(num_tokens, layout, tiles=tiles)
    y, _ = kernel(x, w, layout, forced_ids=ids, workspace=ws, tiles=tiles)
    ref_y, _ = reference(x, w, layout, forced_ids=ids)
    assert_close_rel(y, ref_y)

    bm, sentinel = 16, num_tokens * 2
    ends = ws.expert_ends.cpu()[:layout.n_ffn].tolist()
    six = [2 * t + 1 for t in range(num_tokens) if t % 3 == 0]
    assert ends == [0, 0, 0, 2 * bm, 2 * bm, 2 * bm, 3 * bm, 3 * bm]  # expert 3: 17 slots in 2 blocks
    rows = ws.sorted_slots.cpu()[:3 * bm].tolist()
    assert rows[:2 * bm] == [2 * t for t in range(num_tokens)] + [sentinel] * (2 * bm - num_tokens)
    assert rows[2 * bm:] == six + [sentinel] * (bm - len(six))


# the default small tiles, and 32-row blocks in groups of 4 (several row blocks per expert and group)
TILES = [None, MoETiles(32, GemmTiles(32, 32, 4, 4, 2), GemmTiles(16, 32, 4, 4, 2))]


@pytest.mark.parametrize("tiles", TILES, ids=["default", "grouped"])
def test_poisoned_scratch_and_determinism(tiles):
    """h, out_slot and the routing outputs start as NaN, the sorted slots as 0 (slot 0's rows read in
    the wrong place would show): y has no NaN and is bitwise the same on a second run."""
    layout, num_tokens = LAYOUT, 40
    w, x = weights(layout, seed=9), tokens(num_tokens, seed=10)
    ids = torch.tensor([[t % 8, layout.first_zero if t % 2 else layout.n_ffn] for t in range(num_tokens)])
    first, _ = kernel(x, w, layout, forced_ids=ids, workspace=workspace(num_tokens, layout, tiles=tiles), tiles=tiles)
    again, _ = kernel(x, w, layout, forced_ids=ids, workspace=workspace(num_tokens, layout, tiles=tiles), tiles=tiles)
    assert not first.isnan().any() and torch.equal(first, again)
    assert_close_rel(first, reference(x, w, layout, forced_ids=ids)[0])
    y1, l1 = kernel(x, w, layout, tiles=tiles)
    y2, l2 = kernel(x, w, layout, tiles=tiles)
    assert torch.equal(y1, y2) and torch.equal(l1, l2)


def test_four_layer_chain_with_gating_residual():
    layout, num_tokens = LAYOUT, 9
    layers = [weights(layout, seed=20 + j) for j in range(4)]
    x = tokens(num_tokens, seed=11)
    prev = ref_prev = None
    for w in layers:
        y, prev = kernel(x, w, layout, prev)
        ref_y, routing = reference(x, w, layout, ref_prev)
        ref_prev = routing.logits
        torch.testing.assert_close(prev, ref_prev, rtol=1e-5, atol=1e-4)
        assert_close_rel(y, ref_y)
        x = (x.float() + y.float()).bfloat16()  # as the decoder's residual stream would feed the next layer


def test_constant_logit_row_and_all_zero_gates_have_no_nan():
    w, x = weights(LAYOUT), tokens(5)
    w["router_w"] = torch.zeros_like(w["router_w"])  # std 0: the eps keeps z finite
    ws = workspace(5, LAYOUT)
    y, logits = kernel(x, w, LAYOUT, workspace=ws)
    assert torch.isfinite(y).all() and torch.equal(logits, torch.zeros_like(logits))
    gates = ws.gates.cpu()
    assert torch.isfinite(gates).all()
    on_zero = ws.ids.cpu() >= LAYOUT.first_zero
    torch.testing.assert_close(gates.sum(-1)[~on_zero.all(-1)], torch.ones(int((~on_zero.all(-1)).sum())))

    two_zero = MoEPPLayout(n_ffn=8, n_const=0, n_copy=0, n_zero=2)
    w = weights(two_zero)
    ids = torch.tensor([[two_zero.first_zero, two_zero.first_zero + 1]] * 5)
    y, _ = kernel(x, w, two_zero, forced_ids=ids)
    assert torch.equal(y, torch.zeros_like(y))


def test_plain_moe_is_the_same_kernel_without_zc_experts():
    layout = MoEPPLayout(n_ffn=4, n_const=0, n_copy=0, n_zero=0)
    w, x = weights(layout, seed=12), tokens(17, seed=13)
    y, _ = kernel(x, w, layout)
    assert_close_rel(y, reference(x, w, layout)[0])


# ---- CUDA only -------------------------------------------------------------------------------------------

@cuda
def test_many_tokens_full_width():
    """65,536 tokens at a wider shape: many route blocks, many row blocks per expert."""
    layout = MoEPPLayout(n_ffn=16, n_const=2)
    w, x = weights(layout, seed=14, dim=256, inter=512), tokens(65536, seed=15, dim=256)
    dev = {k: v.cuda() for k, v in w.items()}
    y, _ = moepp_forward(x.cuda(), dev["router_w"], dev["const_gate"], None, None, dev["w13"], dev["w2"],
                         dev["const_v"], layout)
    assert_close_rel(y, reference(x.cuda(), dev, layout)[0])


@cuda
def test_graph_captured_with_one_routing_replays_another():
    """Captured while every token is ZC-only (empty GEMM grids), replayed with FFN routing and back."""
    layout, num_tokens = LAYOUT, 24
    w = {k: v.cuda() for k, v in weights(layout, seed=16).items()}
    x = tokens(num_tokens, seed=17).cuda()
    zc = torch.tensor([[layout.first_copy, layout.first_zero]] * num_tokens, device="cuda")
    ids = zc.clone()

    def step():
        return moepp_forward(x, w["router_w"], w["const_gate"], None, None, w["w13"], w["w2"], w["const_v"], layout,
                             forced_ids=ids)[0]
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    ffn = torch.stack([torch.arange(num_tokens, device="cuda") % 8, torch.full((num_tokens,), 9, device="cuda")], 1)
    for routing in (ffn, zc, ffn):
        ids.copy_(routing)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, step())
    assert_close_rel(out.cpu(), reference(x.cpu(), {k: v.cpu() for k, v in w.items()}, layout,
                                          forced_ids=ffn.cpu())[0])
