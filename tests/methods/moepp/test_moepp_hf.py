"""MoEPPForCausalLM: parameter names, save/load (registered and trust_remote_code without leanserve),
generate with a KV cache, the heterogeneous load-balance loss and its gradient, the gating residual."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from leanserve.kernels.moepp_reference import MoEPPLayout, Routing, route
from leanserve.models.moepp_hf import MoEPPConfig, MoEPPForCausalLM, load_balance_loss

VOCAB = 96


def tiny_config(**overrides) -> MoEPPConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, n_ffn_experts=4, initializer_range=0.2,
                  pad_token_id=0, eos_token_id=1)
    return MoEPPConfig(**(fields | overrides))


def tiny_model(seed: int = 0, **overrides) -> MoEPPForCausalLM:
    torch.manual_seed(seed)
    return MoEPPForCausalLM(tiny_config(**overrides)).eval()


def test_parameter_names_and_shapes_are_the_engine_contract():
    model = tiny_model()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    n, d, i = 4 + 4, 32, 48  # 4 FFN experts + zero, copy and 2 constant experts
    for layer in range(3):
        mlp = f"model.layers.{layer}.mlp"
        assert shapes[f"{mlp}.router.weight"] == (n, d)
        assert shapes[f"{mlp}.gate_map.weight"] == (n, n)
        assert shapes[f"{mlp}.w13"] == (4, 2 * i, d) and shapes[f"{mlp}.w2"] == (4, d, i)
        assert shapes[f"{mlp}.const_gate.weight"] == (2 * 2, d) and shapes[f"{mlp}.const_v"] == (2, d)
        for proj in "qkvo":
            assert f"model.layers.{layer}.self_attn.{proj}_proj.weight" in shapes
        assert {f"model.layers.{layer}.input_layernorm.weight",
                f"model.layers.{layer}.post_attention_layernorm.weight"} <= shapes.keys()
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= shapes.keys()
    assert len(shapes) == 3 + 3 * (4 + 2 + 6)


def test_plain_moe_has_no_zc_parameters_and_routes_only_to_ffn_experts():
    model = tiny_model(n_zero=0, n_copy=0, n_const=0, gating_residual=False)
    names = [name for name, _ in model.named_parameters()]
    assert not [n for n in names if "const" in n or "gate_map" in n]
    assert model.model.layers[0].mlp.router.weight.shape == (4, 32)
    out = model(input_ids=torch.randint(2, VOCAB, (2, 9)))
    torch.testing.assert_close(out.expert_load.sum(dim=1), torch.full((3,), 2.0))  # f sums to top-k
    assert model.config.ffn_share_theory == 1.0


def test_save_load_round_trip_keeps_logits_and_fp32_routers(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    ids = torch.randint(2, VOCAB, (2, 11))
    model.save_pretrained(tmp_path / "fp32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32).eval()
    assert type(loaded) is MoEPPForCausalLM
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)

    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # the router chain stays fp32 on disk
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {dtypes[k] for k in dtypes if k.endswith(("router.weight", "gate_map.weight"))} == {"F32"}
    assert dtypes["model.layers.0.mlp.w13"] == "BF16"
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert bf16.model.layers[1].mlp.router.weight.dtype == torch.float32
    assert bf16.model.layers[1].mlp.w2.dtype == torch.bfloat16


def test_trust_remote_code_loads_without_leanserve(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(2, VOCAB, (2, 11))
    torch.save(ids, tmp_path / "ids.pt")
    code = (f"import sys, torch\nsys.modules['leanserve'] = None  # importing leanserve now fails\n"
            f"from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True,"
            f" dtype=torch.float32).eval()\n"
            f"assert not type(m).__module__.startswith('leanserve'), type(m).__module__\n"
            f"with torch.no_grad():\n"
            f"    logits = m(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits\n"
            f"torch.save(logits, {str(tmp_path / 'out.pt')!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), model(input_ids=ids).logits)


def test_generate_with_kv_cache_matches_full_forward_greedy():
    model = tiny_model(seed=1)
    prompt = torch.randint(2, VOCAB, (2, 5))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):  # no cache: the whole sequence each step
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_loss_is_cross_entropy_plus_weighted_aux_loss():
    model = tiny_model(lb_coef=0.5)
    ids = torch.randint(2, VOCAB, (2, 9))
    out = model(input_ids=ids, labels=ids)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, ce + 0.5 * out.aux_loss)
    assert out.aux_loss > 0 and len(out.router_logits) == 3


def test_hetero_load_balance_loss_by_hand():
    # 2 FFN experts, 1 constant, 1 copy, 1 zero (indices 0, 1 | 2 | 3 | 4), top-2, tau 0.5
    layout = MoEPPLayout(n_ffn=2, n_const=1, n_copy=1, n_zero=1, top_k=2)
    probs = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.2],
                          [0.1, 0.4, 0.3, 0.1, 0.1],
                          [0.3, 0.1, 0.1, 0.4, 0.1]])
    ids = torch.tensor([[0, 4], [1, 2], [3, 0]])
    routing = Routing(logits=probs.log(), probs=probs, ids=ids, gates=torch.full((3, 2), 0.5))
    loss, f = load_balance_loss(routing, layout, tau=0.5)
    # f = selections / 3 tokens: expert 0 twice, 1, 2, 3, 4 once each; P = column means
    assert torch.allclose(f, torch.tensor([2, 1, 1, 1, 1]) / 3)
    p = [0.9 / 3, 0.6 / 3, 0.5 / 3, 0.6 / 3, 0.4 / 3]
    by_hand = 1 * (2 / 3) * p[0] + 1 * (1 / 3) * p[1] + 0.5 * (1 / 3) * (p[2] + p[3] + p[4])
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # a padding token (the last) counts neither in f nor in P
    masked, f2 = load_balance_loss(routing, layout, tau=0.5, token_mask=torch.tensor([1, 1, 0]))
    p2 = [0.6 / 2, 0.5 / 2, 0.4 / 2, 0.2 / 2, 0.3 / 2]
    assert torch.allclose(f2, torch.tensor([1, 1, 1, 0, 1]) / 2)
    assert masked.item() == pytest.approx(0.5 * p2[0] + 0.5 * p2[1] + 0.5 * 0.5 * (p2[2] + p2[4]), rel=1e-6)


def test_load_balance_gradient_wrt_router_matches_finite_differences():
    layout = MoEPPLayout(n_ffn=4, n_const=2, n_copy=1, n_zero=1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=gen)
    weight = torch.randn(layout.n_experts, 16, generator=gen).requires_grad_()

    def lb(w):
        return load_balance_loss(route(x, w, layout), layout, tau=0.75)[0]

    lb(weight).backward()
    ids = route(x, weight, layout).ids
    eps, numeric = 1e-2, torch.zeros_like(weight)
    with torch.no_grad():
        for idx in [(r, c) for r in range(layout.n_experts) for c in (0, 5, 11)]:
            shift = torch.zeros_like(weight)
            shift[idx] = eps
            # f has no gradient: the check is only valid while the top-k choice stays put
            assert torch.equal(route(x, weight + shift, layout).ids, ids)
            assert torch.equal(route(x, weight - shift, layout).ids, ids)
            numeric[idx] = (lb(weight + shift) - lb(weight - shift)) / (2 * eps)
    checked = numeric != 0
    assert checked.sum() >= layout.n_experts * 2
    torch.testing.assert_close(weight.grad[checked], numeric[checked], rtol=2e-2, atol=2e-5)


def test_gating_residual_chains_layer_logits():
    model = tiny_model()
    ids = torch.randint(2, VOCAB, (2, 7))
    with torch.no_grad():
        model.model.layers[1].mlp.router.weight.zero_()  # layer 1's own term vanishes
        out = model(input_ids=ids)
    gate_map = model.model.layers[1].mlp.gate_map.weight
    torch.testing.assert_close(out.router_logits[1], out.router_logits[0] @ gate_map.t())
    assert out.router_logits[1].abs().sum() > 0
    # and layer 2 sees layer 1's residual-augmented logits, not only its own router's
    x2 = None

    def grab(_module, args):
        nonlocal x2
        x2 = args[0].reshape(-1, 32)

    model.model.layers[2].mlp.register_forward_pre_hook(grab)
    with torch.no_grad():
        out = model(input_ids=ids)
    own = x2 @ model.model.layers[2].mlp.router.weight.t()
    chained = own + out.router_logits[1] @ model.model.layers[2].mlp.gate_map.weight.t()
    torch.testing.assert_close(out.router_logits[2], chained)

    plain = tiny_model(gating_residual=False)
    with torch.no_grad():
        plain.model.layers[1].mlp.router.weight.zero_()
        assert torch.equal(plain(input_ids=ids).router_logits[1], torch.zeros(14, 8))


def test_router_runs_fp32_under_bf16_autocast():
    model = tiny_model()
    ids = torch.randint(2, VOCAB, (2, 7))
    inputs = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].reshape(-1, 32)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids)
    assert out.logits.dtype == torch.bfloat16  # the rest of the model did run in bf16
    assert all(r.dtype == torch.float32 for r in out.router_logits)
    router = model.model.layers[0].mlp.router.weight
    torch.testing.assert_close(out.router_logits[0], inputs[0].float() @ router.t(), rtol=1e-6, atol=1e-6)
    model.to(torch.bfloat16)  # a cast of the model leaves the router chain in fp32
    assert model.model.layers[0].mlp.router.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.gate_map.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.w13.dtype == torch.bfloat16


@pytest.mark.parametrize("bad, message", [
    (dict(num_experts_per_tok=9), "top_k"),
    (dict(renorm_mode="softmax"), "renorm_mode"),
    (dict(tau=0.0), "tau"),
    (dict(lb_layer_reduce="max"), "lb_layer_reduce"),
])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**bad)
