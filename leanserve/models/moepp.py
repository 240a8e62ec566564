"""The engine's MoE++ model (model_type "leanserve_moepp"): the Llama decoder (attention, norms, rotary
from llama.py) whose every MLP is an MoE++ layer: FFN experts plus zero-computation experts (zero,
copy, constant) and the router's gating residual, whose logits pass from layer to layer.

The layer runs the fused Triton kernel (kernels/moepp.py) on CUDA: no host sync and routing-
independent shapes, so decode steps are captured in CUDA graphs like a dense model's. Elsewhere it
runs the eager reference (kernels/moepp_reference.py). Plain MoE is the same model with no ZC
experts and no gating residual.

Checkpoint names (the HF training model's): Llama's for embeddings, attention, norms and lm_head
(q/k/v fused on load), and per layer `mlp.router.weight` [N, D] fp32, `mlp.gate_map.weight` [N, N]
fp32 (every layer when gating_residual; layer 0's is unused), `mlp.w13` [E, 2I, D] (gate rows then
up rows), `mlp.w2` [E, D, I], `mlp.const_gate.weight` [2*n_const, D] and `mlp.const_v`
[n_const, D] (with constant experts)."""
from __future__ import annotations

import torch
from torch import nn

from leanserve.kernels.moepp import moepp_forward
from leanserve.kernels.moepp_reference import MoEPPLayout, moepp_forward_reference, route
from leanserve.models.attention.kv_spec import KVCache
from leanserve.models.attention.metadata import AttentionMetadata
from leanserve.models.layers import RotaryEmbedding
from leanserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
# the training model's block; importing it registers MoEPPConfig with AutoConfig, which the loader reads
from leanserve.models.moepp_hf import MoEPPBlock


class MoEPPMLP(MoEPPBlock):
    """The training block's parameters (same names, fp32 router chain), with a serving forward: the fused
    kernel on CUDA, the reference elsewhere, the router logits passed explicitly."""

    def forward(self, x: torch.Tensor, prev_logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] post-norm hidden, prev_logits [T, N] (the previous layer's; None in layer 0 or
        without the gating residual) -> (y [T, D], this layer's logits [T, N] fp32)."""
        gate_map = self.gate_map.weight if self.gate_map is not None and prev_logits is not None else None
        prev = prev_logits if gate_map is not None else None
        const_gate = self.const_gate.weight if self.const_gate is not None else None
        if x.is_cuda:
            return moepp_forward(x, self.router.weight, const_gate, prev, gate_map, self.w13, self.w2, self.const_v,
                                 self.layout)
        routing = route(x, self.router.weight, self.layout, prev, gate_map)
        y = moepp_forward_reference(x, routing, self.w13, self.w2, const_gate, self.const_v, self.layout)
        return y, routing.logits


class MoEPPDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, sliding_window: int | None):
        super().__init__(config, sliding_window, mlp=MoEPPMLP(config))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                rotary_emb: RotaryEmbedding, kv_cache: KVCache, meta: AttentionMetadata,
                prev_logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, residual = self.attention_block(positions, hidden, residual, rotary_emb, kv_cache, meta)
        out, logits = self.mlp(hidden, prev_logits)
        return out, residual, logits


class MoEPPModel(LlamaModel):
    def decoder_layer(self, config, layer_idx: int, sliding_window: int | None) -> nn.Module:
        return MoEPPDecoderLayer(config, sliding_window)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual, logits = self.embed_tokens(input_ids), None, None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual, logits = layer(positions, hidden, residual, self.rotary_emb, kv_cache, meta, logits)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class MoEPPForCausalLM(LlamaForCausalLM):
    base_model_class = MoEPPModel
    packed_modules_mapping = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}
