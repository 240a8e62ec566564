"""MoE++ as a transformers model: a Llama decoder whose FFNs are MoE++ layers (FFN experts plus
zero, copy and constant experts, with the gating residual chaining each layer's router logits into
the next), trainable with the heterogeneous load-balance loss.

    L = CE + lb_coef * reduce_over_layers(sum_i eta_i f_i P_i),  eta_i = 1 (FFN experts), tau (ZC experts)

f_i is the fraction of tokens routed to expert i (no gradient; sum_i f_i = top_k), P_i the mean router
probability. The loss is lowest when eta_i f_i is equal across experts, so tau sets the FFN share of
routed slots: tau * n_ffn / (tau * n_ffn + n_zc). Plain MoE is n_zero = n_copy = n_const = 0 (every
eta_i = 1: the Switch loss without its N prefactor), usually with gating_residual False.

Routing and the layer forward are leanserve.kernels.moepp_reference's (the oracle of the fused
serving kernel), differentiable end to end. The router and gate_map weights stay fp32 whatever the
model is cast to, and routing runs outside autocast. Attention, norms and rotary embeddings are
transformers' Llama modules, and the decoder loop is LlamaModel.forward, so caches, masks and
`generate` work as they do for Llama under whichever transformers version is installed.

Parameter names (the engine's inference model loads them): Llama's for embeddings, attention,
norms and lm_head; per layer `mlp.router.weight` [N, D], `mlp.gate_map.weight` [N, N] (gating
residual only; layer 0's is unused, kept for shape parity with the released checkpoint),
`mlp.w13` [E, 2I, D] (gate rows, then up rows), `mlp.w2` [E, D, I], `mlp.const_gate.weight`
[2 * n_const, D] and `mlp.const_v` [n_const, D] (constant experts only).

Importing this module registers model_type "leanserve_moepp" with AutoConfig and
AutoModelForCausalLM. `save_pretrained` also writes this file and the reference beside the weights
(config.json's auto_map names them), so plain transformers loads a saved directory with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` without leanserve installed.
"""
from __future__ import annotations

import inspect
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig
from transformers import initialization as init
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from leanserve.kernels.moepp_reference import MoEPPLayout, Routing, moepp_forward_reference, route

MODEL_TYPE = "leanserve_moepp"
# the copies save_pretrained writes beside the weights: this module imports the reference by a
# relative import there (transformers copies a remote module's relative imports along with it)
_REMOTE_MODULE, _REMOTE_REFERENCE = "moepp_hf", "moepp_reference"
_ABSOLUTE_IMPORT = "from leanserve.kernels.moepp_reference import"
_RELATIVE_IMPORT = f"from .{_REMOTE_REFERENCE} import"


class MoEPPConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 65536, hidden_size: int = 768, intermediate_size: int = 2048,
                 num_hidden_layers: int = 12, num_attention_heads: int = 12, num_key_value_heads: int | None = None,
                 head_dim: int | None = None, rms_norm_eps: float = 1e-6, rope_theta: float = 1e4,
                 rope_parameters: dict | None = None, max_position_embeddings: int = 2048,
                 tie_word_embeddings: bool = False, initializer_range: float = 0.02,
                 n_ffn_experts: int = 8, n_zero: int = 1, n_copy: int = 1, n_const: int = 2,
                 num_experts_per_tok: int = 2,
                 tau: float = 0.75, lb_coef: float = 0.01, lb_layer_reduce: str = "mean",
                 router_logit_norm: bool = True, router_norm_std: float = 1.0, gating_residual: bool = True,
                 renorm_mode: str = "released", attention_bias: bool = False, attention_dropout: float = 0.0,
                 use_cache: bool = True, pad_token_id: int | None = None, bos_token_id: int | None = None,
                 eos_token_id: int | list[int] | None = None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size  # per FFN expert
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": rope_theta}
        self.max_position_embeddings = max_position_embeddings
        self.tie_word_embeddings = tie_word_embeddings
        self.initializer_range = initializer_range
        self.n_ffn_experts, self.n_zero, self.n_copy, self.n_const = n_ffn_experts, n_zero, n_copy, n_const
        # top-k; not `top_k`, which transformers takes for a generation setting on the model config
        self.num_experts_per_tok = num_experts_per_tok
        self.tau = tau
        self.lb_coef = lb_coef
        self.lb_layer_reduce = lb_layer_reduce
        self.router_logit_norm = router_logit_norm
        self.router_norm_std = router_norm_std
        self.gating_residual = gating_residual
        self.renorm_mode = renorm_mode
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.use_cache = use_cache
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id
        if lb_layer_reduce not in ("mean", "sum"):
            raise ValueError(f"lb_layer_reduce must be 'mean' or 'sum', got {lb_layer_reduce!r}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.layout  # validates the expert counts, the top-k and renorm_mode
        super().__init__(**kwargs)

    @property
    def layout(self) -> MoEPPLayout:
        return MoEPPLayout(n_ffn=self.n_ffn_experts, n_const=self.n_const, n_copy=self.n_copy, n_zero=self.n_zero,
                           top_k=self.num_experts_per_tok, renorm_mode=self.renorm_mode,
                           logit_norm_std=self.router_norm_std if self.router_logit_norm else None)

    @property
    def ffn_share_theory(self) -> float:
        """FFN share of routed slots where the load-balance loss is lowest (eta_i f_i equal)."""
        layout = self.layout
        return self.tau * layout.n_ffn / (self.tau * layout.n_ffn + layout.n_zc)


# --------------------------------------------------------------------------- the MoE++ layer

@dataclass
class RouterChain:
    """One forward's routing, layer by layer: the last layer's logits (the next one's gating
    residual) and every layer's Routing for the load-balance loss and the routing stats."""
    routings: list[Routing] = field(default_factory=list)

    @property
    def prev_logits(self) -> torch.Tensor | None:
        return self.routings[-1].logits if self.routings else None


class FP32Linear(nn.Linear):
    """A bias-free Linear whose weight stays fp32 when the model is cast (`model.to(torch.bfloat16)`):
    the router chain is fp32 (std-normalised logits and their residual chain need the precision)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False, dtype=torch.float32)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.weight.data = self.weight.data.float()
        if self.weight.grad is not None:
            self.weight.grad.data = self.weight.grad.data.float()
        return self


class MoEPPBlock(nn.Module):
    def __init__(self, config: MoEPPConfig):
        super().__init__()
        self.layout = layout = config.layout
        d, i, n = config.hidden_size, config.intermediate_size, layout.n_experts
        self.router = FP32Linear(d, n)
        self.gate_map = FP32Linear(n, n) if config.gating_residual else None
        self.w13 = nn.Parameter(torch.empty(layout.n_ffn, 2 * i, d))
        self.w2 = nn.Parameter(torch.empty(layout.n_ffn, d, i))
        if layout.n_const:
            self.const_gate = nn.Linear(d, 2 * layout.n_const, bias=False)
            self.const_v = nn.Parameter(torch.empty(layout.n_const, d))
        else:
            self.const_gate = self.const_v = None

    def forward(self, x: torch.Tensor, chain: RouterChain) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            routing = route(flat, self.router.weight, self.layout, chain.prev_logits,
                            None if self.gate_map is None else self.gate_map.weight)
        chain.routings.append(routing)
        const_gate = None if self.const_gate is None else self.const_gate.weight
        y = moepp_forward_reference(flat, routing, self.w13, self.w2, const_gate, self.const_v, self.layout)
        return y.view_as(x)


class MoEPPDecoderLayer(nn.Module):
    """Llama's pre-norm block with the MoE++ layer as its FFN."""

    def __init__(self, config: MoEPPConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = MoEPPBlock(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, router_chain: RouterChain, **kwargs) -> torch.Tensor:
        # kwargs are what LlamaModel.forward gives a decoder layer (mask, rotary, cache, ...): attention's
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states), router_chain)


# --------------------------------------------------------------------------- the models

class MoEPPPreTrainedModel(LlamaPreTrainedModel):
    config_class = MoEPPConfig
    _no_split_modules = ["MoEPPDecoderLayer"]
    _keep_in_fp32_modules_strict = ["router", "gate_map"]
    _can_record_outputs = {"hidden_states": MoEPPDecoderLayer, "attentions": LlamaAttention}
    # the router chain is threaded through the layers; a recomputed layer would record its routing twice
    supports_gradient_checkpointing = False
    _can_compile_fullgraph = False  # the eager expert loop syncs with the host

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MoEPPBlock):
            std = self.config.initializer_range
            init.normal_(module.w13, mean=0.0, std=std)
            init.normal_(module.w2, mean=0.0, std=std)
            if module.const_v is not None:  # the released code draws v ~ N(0, 1): far too large for small models
                init.normal_(module.const_v, mean=0.0, std=std)


class MoEPPModel(MoEPPPreTrainedModel, LlamaModel):
    """LlamaModel with MoE++ decoder layers; its forward is LlamaModel's, which hands the
    `router_chain` keyword on to every layer."""

    def __init__(self, config: MoEPPConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(MoEPPDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


@dataclass
class MoEPPCausalLMOutput(MoeCausalLMOutputWithPast):
    """MoeCausalLMOutputWithPast (loss = CE + lb_coef * aux_loss; router_logits: each layer's
    residual-augmented logits [T, N]) plus expert_load [layers, N]: f_i, the fraction of (unmasked)
    tokens routed to expert i, per layer (sums to top_k over i)."""
    expert_load: torch.Tensor | None = None


def load_balance_loss(routing: Routing, layout: MoEPPLayout, tau: float,
                      token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (L_b = sum_i eta_i f_i P_i, f [N]) for one layer; token_mask [T] leaves padding out."""
    chosen = F.one_hot(routing.ids, layout.n_experts).sum(dim=1).float()  # [T, N], no gradient
    probs = routing.probs
    if token_mask is None:
        count = probs.shape[0]
    else:
        weight = token_mask.to(probs.dtype)[:, None]
        chosen, probs = chosen * weight, probs * weight
        count = weight.sum().clamp_min(1.0)
    f, p = chosen.sum(dim=0) / count, probs.sum(dim=0) / count
    eta = torch.ones_like(p)
    eta[layout.n_ffn:] = tau
    return (eta * f * p).sum(), f


class MoEPPForCausalLM(MoEPPPreTrainedModel, GenerationMixin):
    _tied_weights_keys = LlamaForCausalLM._tied_weights_keys

    def __init__(self, config: MoEPPConfig):
        super().__init__(config)
        self.model = MoEPPModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> MoEPPCausalLMOutput:
        # kwargs carry the KV cache under the installed transformers' name for it, and go to LlamaModel
        chain = RouterChain()
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, router_chain=chain, **kwargs)
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])

        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:  # the step's tokens are the last columns
            token_mask = attention_mask[:, -hidden.shape[1]:].reshape(-1)
        layout = self.config.layout
        losses, loads = zip(*(load_balance_loss(r, layout, self.config.tau, token_mask) for r in chain.routings))
        aux_loss = torch.stack(losses).sum()
        if self.config.lb_layer_reduce == "mean":
            aux_loss = aux_loss / len(losses)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
            loss = loss + self.config.lb_coef * aux_loss
        rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}  # cache, hidden_states, attentions
        return MoEPPCausalLMOutput(loss=loss, aux_loss=aux_loss, logits=logits,
                                   router_logits=tuple(r.logits for r in chain.routings),
                                   expert_load=torch.stack(loads), **rest)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, plus the modeling code beside the weights for trust_remote_code loading."""
        self.config.auto_map = {"AutoConfig": f"{_REMOTE_MODULE}.MoEPPConfig",
                                "AutoModelForCausalLM": f"{_REMOTE_MODULE}.MoEPPForCausalLM"}
        super().save_pretrained(save_directory, *args, **kwargs)
        out = Path(save_directory)
        source = Path(__file__).read_text()
        (out / f"{_REMOTE_MODULE}.py").write_text(source.replace(_ABSOLUTE_IMPORT, _RELATIVE_IMPORT))
        # the reference this module runs: leanserve's, or the copy beside a directory loaded as remote code
        shutil.copyfile(inspect.getfile(route), out / f"{_REMOTE_REFERENCE}.py")


AutoConfig.register(MODEL_TYPE, MoEPPConfig, exist_ok=True)
AutoModelForCausalLM.register(MoEPPConfig, MoEPPForCausalLM, exist_ok=True)
