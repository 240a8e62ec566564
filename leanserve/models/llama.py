"""leanserve's inference implementation of the Llama family (Llama 2/3, Mistral, Qwen2).

Weights follow HF names except the fused projections (qkv_proj, gate_up_proj) that the loader
fills from the checkpoint's separate ones (`packed_modules_mapping`). All tokens of an engine
step are flattened into one [T] batch; attention reads and writes the paged KV cache.

Tensor parallel (models/tensor_parallel.py): a rank holds H/N query heads, H_kv/N KV heads (and
their cache), 1/N of the MLP's hidden units and of the vocabulary; two all-reduces per layer, one
all-gather of the logits. At size 1 the same classes are the dense model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanserve.models.attention.kv_spec import KVCache, PagedKVSpec
from leanserve.models.attention.metadata import AttentionMetadata
from leanserve.models.attention.paged import PagedAttention
from leanserve.models.layers import RMSNorm, RotaryEmbedding, SiluAndMul
from leanserve.models.tensor_parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    divide,
    gather_logits,
)


def rope_parameters(config) -> dict:
    """transformers 5 normalises rope settings into `rope_parameters`; older configs (or custom
    config classes) keep `rope_theta` / `rope_scaling` at top level."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_windows(config) -> list[int | None]:
    """Per-layer sliding window. Mistral windows every layer; Qwen2 marks windowed layers in
    `layer_types` (only with use_sliding_window); Llama has none. Keys older than the window are
    masked out, the cache still keeps them (blocks are not recycled within a sequence)."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return [None] * config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [window] * config.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in layer_types]


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused; a rank holds 1/N of the hidden units."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias, "intermediate_size")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, "intermediate_size")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    """num_heads / num_kv_heads are this rank's (all of them at tensor-parallel size 1)."""

    def __init__(self, config, sliding_window: int | None):
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        # KV heads are the unit of the split: a rank keeps whole GQA groups, so it attends to its own cache only
        self.num_kv_heads = divide(total_kv_heads, "number of KV heads (num_key_value_heads)")
        self.num_heads = self.num_kv_heads * (total_heads // total_kv_heads)
        self.head_dim = head_dim_of(config)
        # Qwen2 has q/k/v biases but no o_proj bias; Llama's `attention_bias` covers all four
        qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        o_bias = getattr(config, "attention_bias", False)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        total_q, total_kv = total_heads * self.head_dim, total_kv_heads * self.head_dim
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, [total_q, total_kv, total_kv], qkv_bias, "heads")
        self.o_proj = RowParallelLinear(total_q, config.hidden_size, o_bias, "heads")
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5,
                                   sliding_window)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, rotary_emb: RotaryEmbedding,
                kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention then MLP. `mlp` replaces the dense SwiGLU (MoE++ passes its MoE layer)."""

    def __init__(self, config, sliding_window: int | None, mlp: nn.Module | None = None):
        super().__init__()
        self.self_attn = LlamaAttention(config, sliding_window)
        self.mlp = mlp if mlp is not None else GatedMLP(config.hidden_size, config.intermediate_size,
                                                        bias=getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def attention_block(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                        rotary_emb: RotaryEmbedding, kv_cache: KVCache, meta: AttentionMetadata
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the MLP's input: post-attention-normed hidden, the residual stream)."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, rotary_emb, kv_cache, meta)
        return self.post_attention_layernorm(hidden, residual)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                rotary_emb: RotaryEmbedding, kv_cache: KVCache, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.attention_block(positions, hidden, residual, rotary_emb, kv_cache, meta)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.decoder_layer(config, i, window)
                                    for i, window in enumerate(sliding_windows(config)))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # one table shared by all layers
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), config.max_position_embeddings,
                                          rope_parameters(config))

    def decoder_layer(self, config, layer_idx: int, sliding_window: int | None) -> nn.Module:
        """Layer `layer_idx`; architectures with another MLP (MoE++) override this."""
        return LlamaDecoderLayer(config, sliding_window)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, self.rotary_emb, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # checkpoint projection name -> (our fused module, shard index)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    base_model_class = LlamaModel  # the decoder stack (MoE++ swaps in its own)

    def __init__(self, config):
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (Llama family uses silu)")
        self.config = config
        self.model = self.base_model_class(config)
        # tied: the same module, not a shared Parameter, so the tie survives meta -> device
        # materialisation (to_empty re-creates parameters per module)
        self.lm_head = (self.model.embed_tokens if getattr(config, "tie_word_embeddings", False)
                        else ParallelLMHead(config.hidden_size, config.vocab_size))
        attn = self.model.layers[0].self_attn
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim
        self.vocab_size = config.vocab_size

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                attn_meta: AttentionMetadata) -> torch.Tensor:
        """Flattened step tokens [T] -> final-normed hidden states [T, hidden_size]."""
        return self.model(input_ids, positions, kv_caches, attn_meta)

    def kv_cache_spec(self, block_size: int, dtype: torch.dtype) -> PagedKVSpec:
        """The cache the engine allocates for this model: dense paged, the same in every layer
        (sliding-window layers mask old keys but keep them)."""
        return PagedKVSpec(self.num_layers, block_size, self.num_kv_heads, self.head_dim, dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32 on every rank (each computes its vocabulary slice)."""
        return gather_logits(F.linear(hidden, self.lm_head.weight), self.vocab_size).float()
