"""Named Llama shapes for `leanserve train lm --preset NAME`.

The vocabulary is not part of a preset: it comes from the tokenizer the model is trained with.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelPreset:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    save_dtype: str = "float32"  # what `--save-dtype` defaults to for this preset

    def num_params(self, vocab_size: int) -> int:
        """Parameter count of the LlamaForCausalLM this preset builds (no biases, RMSNorm weights only)."""
        head_dim = self.hidden_size // self.num_heads
        attn = 2 * self.hidden_size * self.hidden_size + 2 * self.hidden_size * self.num_kv_heads * head_dim
        mlp = 3 * self.hidden_size * self.intermediate_size
        layer = attn + mlp + 2 * self.hidden_size
        embed = vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_layers * layer + self.hidden_size


PRESETS: dict[str, ModelPreset] = {
    # unit tests and smoke runs: trains in seconds on a CPU
    "tiny": ModelPreset(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192,
                        max_position_embeddings=512),
    # the default zoo chat model: 6.82M params with an 8192 vocab -> 13.6 MB in bf16, under the
    # zoo's 15 MB per model. Width 256 keeps the tied 8192x256 embedding at 2.1M (a third of the
    # budget); the rest buys 6 layers with a 3x MLP. A 7th layer would reach 15.2 MB.
    "chat-tiny": ModelPreset(hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=768,
                             max_position_embeddings=1024, save_dtype="bfloat16"),
    # GPU-scale experiments: 27.8M params with an 8192 vocab
    "small": ModelPreset(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1408,
                         max_position_embeddings=2048, save_dtype="bfloat16"),
}
