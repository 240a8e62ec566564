"""The MoE++ reference layer against a per-token reading of the spec, and its ZC edge cases."""
import pytest
import torch
import torch.nn.functional as F

from leanserve.kernels.moepp_reference import MoEPPLayout, Routing, moepp_forward_reference, route

D, I = 16, 24


def _weights(layout: MoEPPLayout, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = layout.n_experts
    return dict(router_w=torch.randn(n, D, generator=g), gate_map=torch.randn(n, n, generator=g) * 0.3,
                w13=torch.randn(layout.n_ffn, 2 * I, D, generator=g) * 0.2,
                w2=torch.randn(layout.n_ffn, D, I, generator=g) * 0.2,
                const_gate=torch.randn(2 * layout.n_const, D, generator=g),
                const_v=torch.randn(layout.n_const, D, generator=g))


def _per_token(x, routing, w, layout):
    """y[t] = sum_j g_j E_{id_j}(x_t), each expert as the spec defines it, one token at a time."""
    out = []
    for t in range(x.shape[0]):
        y = torch.zeros(D)
        for e, g in zip(routing.ids[t].tolist(), routing.gates[t].tolist()):
            if e < layout.n_ffn:
                gate, up = (w["w13"][e] @ x[t]).chunk(2)
                y += g * (w["w2"][e] @ (F.silu(gate) * up))
            elif e < layout.first_copy:
                c = e - layout.n_ffn
                a1, a2 = (w["const_gate"][2 * c:2 * c + 2] @ x[t]).softmax(0)
                y += g * (a1 * x[t] + a2 * w["const_v"][c])
            elif e < layout.first_zero:
                y += g * x[t]
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["released", "paper", "mixtral"])
def test_layer_matches_per_token_definition(mode):
    layout = MoEPPLayout(n_ffn=4, n_const=2, renorm_mode=mode)
    w = _weights(layout)
    x, prev = torch.randn(17, D), torch.randn(17, layout.n_experts)
    routing = route(x, w["router_w"], layout, prev, w["gate_map"])
    y = moepp_forward_reference(x, routing, w["w13"], w["w2"], w["const_gate"], w["const_v"], layout)
    torch.testing.assert_close(y, _per_token(x, routing, w, layout), rtol=1e-4, atol=1e-5)
    if mode == "released":  # zero slots carry no weight, the rest sum to 1
        on_zero = routing.ids >= layout.first_zero
        assert torch.all(routing.gates[on_zero] == 0)
        sums = routing.gates.sum(-1)
        torch.testing.assert_close(sums[~on_zero.all(-1)], torch.ones_like(sums[~on_zero.all(-1)]))


def test_copy_plus_zero_is_exactly_x_and_zero_only_is_zero():
    layout = MoEPPLayout(n_ffn=2, n_const=1, n_copy=1, n_zero=2)
    w = _weights(layout)
    x = torch.randn(3, D, dtype=torch.bfloat16)
    copy, z0, z1 = layout.first_copy, layout.first_zero, layout.first_zero + 1
    ids = torch.tensor([[copy, z0], [z0, z1], [z1, copy]])
    # released renormalisation: the zero slots drop out, (copy, zero) -> copy with weight 1
    gates = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    routing = Routing(torch.zeros(3, layout.n_experts), torch.zeros(3, layout.n_experts), ids, gates)
    y = moepp_forward_reference(x, routing, w["w13"], w["w2"], w["const_gate"], w["const_v"], layout)
    assert torch.equal(y[0], x[0]) and torch.equal(y[2], x[2])
    assert torch.equal(y[1], torch.zeros_like(y[1]))


def test_all_zero_slots_give_zero_without_nan_and_constant_logits_do_not_nan():
    layout = MoEPPLayout(n_ffn=2, n_const=0, n_copy=0, n_zero=2, top_k=2)
    router_w = torch.zeros(layout.n_experts, D)
    router_w[layout.first_zero:] = 5.0  # every token prefers the two zero experts
    x = torch.rand(4, D) + 0.1
    routing = route(x, router_w, layout)
    assert torch.all(routing.ids >= layout.first_zero)
    assert torch.equal(routing.gates, torch.zeros_like(routing.gates))
    flat = route(x, torch.zeros(layout.n_experts, D), layout)  # constant logit row: std 0
    assert torch.isfinite(flat.probs).all() and torch.isfinite(flat.gates).all()


def test_gradients_reach_router_and_zc_parameters():
    layout = MoEPPLayout(n_ffn=3, n_const=2)
    w = {k: v.requires_grad_() for k, v in _weights(layout, seed=1).items()}
    x = torch.randn(32, D)
    routing = route(x, w["router_w"], layout, torch.randn(32, layout.n_experts), w["gate_map"])
    moepp_forward_reference(x, routing, w["w13"], w["w2"], w["const_gate"], w["const_v"], layout).square().sum().backward()
    for name in ("router_w", "gate_map", "w13", "w2", "const_gate", "const_v"):
        assert w[name].grad is not None and w[name].grad.abs().sum() > 0, name
