"""transformers causal LMs over left-padded batches (batched greedy eval, GRPO group sampling and its
log-probs): eager attention while they run.

Why: transformers 5's SDPA mask gives a left-pad query row no key at all (the padding mask removes the
only keys its causal mask allows). CUDA's SDPA kernels return NaN for such a row, the NaN becomes the
padded positions' keys and values in the next layer, and 0 x NaN in the probabilities-times-values product
carries it into the real rows: NaN logits, which crash multinomial sampling or silently corrupt greedy
argmax (found on H100 and H200 with transformers 5.17; CPU's SDPA returns zeros there and hides it). Eager
attention masks with the dtype's finite minimum, so a fully masked row is a finite average that no real
row ever reads. Unpadded work (fixed-window losses) keeps SDPA, whose memory does not grow with L².
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


@contextmanager
def padding_safe(model) -> Iterator:
    """`model` with eager attention inside the block, its own implementation restored after."""
    previous = model.config._attn_implementation
    if previous == "eager":
        yield model
        return
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def load_for_padded_batches(model_dir: str | Path, dtype: torch.dtype, device) -> torch.nn.Module:
    """A model whose every forward sees left-padded batches (GRPO's policy and reference), eager for good."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").to(device).eval()
