"""Tiny leanserve_moepp model directories written by hand (config.json + random safetensors under the
HF training model's parameter names), and a naive eager forward of the same weights: the oracle of
the engine's MoE++ model. Built in milliseconds; the tokenizer comes from another tiny directory."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from leanserve.kernels.moepp_reference import MoEPPLayout, moepp_forward_reference, route

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def moepp_config(vocab_size: int, **overrides) -> dict:
    config = dict(model_type="leanserve_moepp", architectures=["MoEPPForCausalLM"], vocab_size=vocab_size,
                  hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                  max_position_embeddings=128, tie_word_embeddings=False, n_ffn_experts=4, n_zero=1, n_copy=1,
                  n_const=2, num_experts_per_tok=2, tau=0.75, router_logit_norm=True, router_norm_std=1.0, gating_residual=True,
                  renorm_mode="released", bos_token_id=0, eos_token_id=[2, 1], pad_token_id=3)
    return config | overrides


def random_weights(config: dict, seed: int = 0, std: float = 0.2) -> dict[str, torch.Tensor]:
    """Every tensor the checkpoint has, random (norms near 1; std 0.2 keeps greedy decoding from
    repeating one token; the routers at std 1 spread tokens over all experts)."""
    g = torch.Generator().manual_seed(seed)
    d, inter, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    e, c = config["n_ffn_experts"], config["n_const"]
    n = e + c + config["n_copy"] + config["n_zero"]

    def rnd(*shape, scale=std):
        return torch.randn(*shape, generator=g) * scale

    w = {"model.embed_tokens.weight": rnd(config["vocab_size"], d), "model.norm.weight": 1 + rnd(d, scale=0.1)}
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = rnd(config["vocab_size"], d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "self_attn.q_proj.weight": rnd(nq * hd, d), p + "self_attn.k_proj.weight": rnd(nkv * hd, d),
              p + "self_attn.v_proj.weight": rnd(nkv * hd, d), p + "self_attn.o_proj.weight": rnd(d, nq * hd),
              p + "input_layernorm.weight": 1 + rnd(d, scale=0.1),
              p + "post_attention_layernorm.weight": 1 + rnd(d, scale=0.1),
              p + "mlp.router.weight": rnd(n, d, scale=1.0),
              p + "mlp.w13": rnd(e, 2 * inter, d), p + "mlp.w2": rnd(e, d, inter)}
        if config["gating_residual"]:
            w[p + "mlp.gate_map.weight"] = rnd(n, n, scale=0.3)
        if c:
            w[p + "mlp.const_gate.weight"] = rnd(2 * c, d, scale=1.0)
            w[p + "mlp.const_v"] = rnd(c, d, scale=0.5)
    return w


def write_moepp_dir(out_dir: Path, tokenizer_dir: Path | None = None, seed: int = 0, **overrides) -> Path:
    """config.json + model.safetensors (+ the tokenizer files of `tokenizer_dir`, whose vocabulary
    size the config takes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = 64
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            shutil.copy(Path(tokenizer_dir) / name, out_dir / name)
        vocab = json.loads((Path(tokenizer_dir) / "config.json").read_text())["vocab_size"]
    config = moepp_config(vocab, **overrides)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_weights(config, seed), out_dir / "model.safetensors")
    return out_dir


# ---- the oracle: one sequence, no cache, everything recomputed --------------------------------------------

def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, positions, theta):
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = positions.float()[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class EagerMoEPP:
    """Naive fp32 forward of a written directory: causal attention over the whole sequence and the
    reference MoE++ layer (route + moepp_forward_reference) with the gating residual chained."""

    def __init__(self, model_dir: Path):
        self.c = json.loads((Path(model_dir) / "config.json").read_text())
        self.w = load_file(Path(model_dir) / "model.safetensors")
        self.layout = MoEPPLayout(n_ffn=self.c["n_ffn_experts"], n_const=self.c["n_const"], n_copy=self.c["n_copy"],
                                  n_zero=self.c["n_zero"], top_k=self.c["num_experts_per_tok"], renorm_mode=self.c["renorm_mode"],
                                  logit_norm_std=self.c["router_norm_std"] if self.c["router_logit_norm"] else None)

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        c, w, eps = self.c, self.w, self.c["rms_norm_eps"]
        nq, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        pos = torch.arange(len(ids))
        h = w["model.embed_tokens.weight"][ids]
        prev = None
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = _rms(h, w[p + "input_layernorm.weight"], eps)
            q = _rope((x @ w[p + "self_attn.q_proj.weight"].T).view(-1, nq, hd), pos, c["rope_theta"])
            k = _rope((x @ w[p + "self_attn.k_proj.weight"].T).view(-1, nkv, hd), pos, c["rope_theta"])
            v = (x @ w[p + "self_attn.v_proj.weight"].T).view(-1, nkv, hd)
            k, v = k.repeat_interleave(nq // nkv, dim=1), v.repeat_interleave(nq // nkv, dim=1)
            attn = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                  is_causal=True)
            h = h + attn.transpose(0, 1).reshape(len(ids), -1) @ w[p + "self_attn.o_proj.weight"].T
            x = _rms(h, w[p + "post_attention_layernorm.weight"], eps)
            gate_map = w.get(p + "mlp.gate_map.weight")
            routing = route(x, w[p + "mlp.router.weight"], self.layout, prev if gate_map is not None else None,
                            gate_map)
            h = h + moepp_forward_reference(x, routing, w[p + "mlp.w13"], w[p + "mlp.w2"],
                                            w.get(p + "mlp.const_gate.weight"), w.get(p + "mlp.const_v"), self.layout)
            prev = routing.logits
        head = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
        return _rms(h, w["model.norm.weight"], eps) @ head.T

    def greedy(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        ids, out, logprobs = list(prompt), [], []
        for _ in range(max_tokens):
            lp = self.logits(ids)[-1].log_softmax(-1)
            tok = int(lp.argmax())
            out.append(tok)
            logprobs.append(float(lp[tok]))
            ids.append(tok)
        return out, logprobs
