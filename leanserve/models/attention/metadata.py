from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Describes one engine step: T new tokens from B sequences, flattened (prefill chunks and
    decodes mixed). Sequence b owns new tokens query_start_loc[b]:query_start_loc[b+1]; their
    K/V are written to the paged cache at slot_mapping, then they attend causally to the first
    seq_lens[b] tokens of the sequence (cached + new), read through block_tables[b].

    Paged cache per layer: k_cache, v_cache of shape [num_blocks, block_size, kv_heads, head_dim];
    slot = block_id * block_size + offset; slot -1 = do not write (padding).
    """
    slot_mapping: torch.Tensor     # [T] int64
    query_start_loc: torch.Tensor  # [B+1] int32, on the model's device
    seq_lens: torch.Tensor         # [B] int32, context length after this step
    # [B, max_blocks_per_seq] int32; columns past a sequence's own blocks hold -1 or stale block
    # ids (the engine's rows of its persistent table), which attention never reads
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    block_size: int
    # [B] int32: each sequence's planned length, prompt + max_tokens (Sequence.planned_len); a cache
    # sized once per request (MoA's sink + ring pages) derives its layout from it. None where a
    # caller builds a step for a dense cache only
    planned_lens: torch.Tensor | None = None
    # host copies, so the CPU path loops over sequences without device syncs
    query_start_loc_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    # [B, max_seq_len] int64 slot of each context position (paged.context_slots), computed once per
    # step for the PyTorch attention paths; they compute it per layer when it is None
    context_slots: torch.Tensor | None = None
    # models with num_variants > 1 (several weight sets behind one model, e.g. ensemble members
    # sampled per request): [T] int64, the variant each token runs through; None for other models.
    # The host copy is there on eager steps (a model may group tokens by variant without a device
    # sync), None in captured CUDA graphs
    variants: torch.Tensor | None = None
    variants_cpu: list[int] | None = None
