"""A model directory's transformers causal LM, loaded for left-padded batches (batched greedy eval, GRPO
group sampling and its log-probs).

Why eager attention: transformers 5's SDPA mask gives a left-pad query row no key at all (the padding mask
removes the only keys its causal mask allows). CUDA's SDPA kernels return NaN for such a row, the NaN
becomes the padded positions' keys and values in the next layer, and 0 x NaN in the probabilities-times-
values product carries it into the real rows: NaN logits, which crash multinomial sampling or silently
corrupt greedy argmax (found on H100 and H200 with transformers 5.17; CPU's SDPA returns zeros there and
hides it). Eager attention masks with the dtype's finite minimum, so a fully masked row is a finite average
that no real row ever reads. The models these paths load are small; eager costs them little.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def load_for_padded_batches(model_dir: str | Path, dtype: torch.dtype, device) -> torch.nn.Module:
    """The model of `model_dir` on `device` in eval mode, with attention that is safe under left padding."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").to(device).eval()
