"""leanserve's Llama-family implementation against transformers (tiny random configs, fp32, CPU),
through the paged KV cache: chunked prefill, decode, mixed batches, non-contiguous block tables."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from leanserve.errors import UserError
from leanserve.models.attention.metadata import AttentionMetadata
from leanserve.models.loader import build_model, load_model

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128)

CONFIGS = {
    "llama2-mha-bias": (LlamaForCausalLM, LlamaConfig(**TINY, num_key_value_heads=4, attention_bias=True,
                                                      mlp_bias=True, tie_word_embeddings=False)),
    # original_max_position_embeddings small enough that llama3 scaling changes most frequencies
    "llama3-gqa-rope": (LlamaForCausalLM, LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=False,
                                                      rope_parameters=dict(rope_type="llama3", rope_theta=500000.0,
                                                                           factor=8.0, low_freq_factor=1.0,
                                                                           high_freq_factor=4.0,
                                                                           original_max_position_embeddings=16))),
    "llama-tied-linear-rope": (LlamaForCausalLM, LlamaConfig(**TINY, num_key_value_heads=1, tie_word_embeddings=True,
                                                             rope_parameters=dict(rope_type="linear", factor=2.0,
                                                                                  rope_theta=10000.0))),
    # window smaller than the test sequences, so masking old keys matters
    "mistral-window": (MistralForCausalLM, MistralConfig(**TINY, num_key_value_heads=2, head_dim=24,
                                                         sliding_window=6, tie_word_embeddings=False)),
    "qwen2-bias": (Qwen2ForCausalLM, Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True)),
}


def save_reference(name: str, out_dir, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A transformers model with every weight (biases, norms too) randomised, saved as safetensors;
    returns it in fp32 with the saved (possibly rounded) weights."""
    model_cls, config = CONFIGS[name]
    torch.manual_seed(0)
    ref = model_cls(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # HF zero-inits biases and unit-inits norms
    ref.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    return ref.float()


@torch.no_grad()
def reference_logits(ref: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return ref(torch.tensor([ids])).logits[0].float()


class PagedRun:
    """Drives a leanserve model like the engine does: one flattened step at a time, each sequence
    with its own shuffled block table in a NaN-poisoned paged cache (reading any slot that was not
    written makes the logits NaN)."""

    def __init__(self, model, block_size: int, num_blocks: int = 32, seed: int = 0):
        self.model, self.block_size = model, block_size
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        weight = model.lm_head.weight
        self.device = weight.device
        self.kv_caches = [tuple(torch.full(shape, float("nan"), dtype=weight.dtype, device=self.device)
                                for _ in range(2)) for _ in range(model.num_layers)]
        self.free_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.block_tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    @torch.no_grad()
    def step(self, chunks: dict[int, list[int]], num_padding: int = 0) -> dict[int, torch.Tensor]:
        """chunks: seq id -> its new tokens this step. Returns seq id -> logits [len(chunk), vocab].
        `num_padding` tokens with slot -1 and no sequence are appended, as a padded batch has."""
        ids, positions, slots, qsl, seq_lens = [], [], [], [0], []
        for sid, tokens in chunks.items():
            start = self.lens.get(sid, 0)
            end = start + len(tokens)
            table = self.block_tables.setdefault(sid, [])
            while len(table) * self.block_size < end:
                table.append(self.free_blocks.pop())
            ids += tokens
            positions += range(start, end)
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)]
            qsl.append(len(ids))
            seq_lens.append(end)
            self.lens[sid] = end
        ids += [0] * num_padding
        positions += [0] * num_padding
        slots += [-1] * num_padding
        width = max(len(self.block_tables[sid]) for sid in chunks)
        tables = [self.block_tables[sid] + [-1] * (width - len(self.block_tables[sid])) for sid in chunks]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            max_query_len=max(map(len, chunks.values())), max_seq_len=max(seq_lens), block_size=self.block_size,
            query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
        hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), self.kv_caches, meta)
        logits = self.model.compute_logits(hidden).cpu()
        return {sid: logits[qsl[i]:qsl[i + 1]] for i, sid in enumerate(chunks)}


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    ref = save_reference(name, tmp_path)
    model, hf_config = load_model(str(tmp_path), "cpu", torch.float32)
    assert hf_config.model_type == CONFIGS[name][1].model_type
    ids = random_ids(20, seed=1)  # longer than the rope/window settings above
    ours = PagedRun(model, block_size=4).step({0: ids})[0]
    torch.testing.assert_close(ours, reference_logits(ref, ids), atol=1e-4, rtol=1e-4)


def test_bf16_checkpoint_loads_to_fp32(tmp_path):
    ref = save_reference("qwen2-bias", tmp_path, dtype=torch.bfloat16)
    assert load_file(tmp_path / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    model, _ = load_model(str(tmp_path), "cpu", torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = random_ids(12, seed=2)
    torch.testing.assert_close(PagedRun(model, block_size=16).step({0: ids})[0], reference_logits(ref, ids),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,block_size", [("llama3-gqa-rope", 4), ("mistral-window", 4), ("qwen2-bias", 16)])
def test_chunked_prefill_then_decode_matches_full_forward(name, block_size, tmp_path):
    ref = save_reference(name, tmp_path)
    model, _ = load_model(str(tmp_path), "cpu", torch.float32)
    ids = random_ids(19, seed=3)
    run = PagedRun(model, block_size=block_size)
    # prompt of 13 in chunks of 5, 3, 5 (crossing block boundaries mid-chunk), then 6 single-token decodes
    bounds = [0, 5, 8, 13, 14, 15, 16, 17, 18, 19]
    ours = torch.cat([run.step({0: ids[a:b]})[0] for a, b in zip(bounds, bounds[1:])])
    assert run.block_tables[0] != sorted(run.block_tables[0])  # really non-contiguous
    torch.testing.assert_close(ours, reference_logits(ref, ids), atol=1e-4, rtol=1e-4)


def test_mixed_batch_matches_separate_runs(tmp_path):
    ref = save_reference("llama3-gqa-rope", tmp_path)
    model, _ = load_model(str(tmp_path), "cpu", torch.float32)
    a, b = random_ids(14, seed=4), random_ids(9, seed=5)
    run = PagedRun(model, block_size=4)
    out_a, out_b = [], []
    for chunks in ({0: a[:4], 1: b[:7]},        # both prefilling
                   {0: a[4:10], 1: b[7:8]},     # a mid-prefill chunk, b decoding
                   {1: b[8:9], 0: a[10:11]},    # both decoding, order swapped
                   {0: a[11:14]}):              # a alone (chunk)
        out = run.step(chunks, num_padding=2)
        out_a += [out[0]] if 0 in out else []
        out_b += [out[1]] if 1 in out else []
    torch.testing.assert_close(torch.cat(out_a), reference_logits(ref, a[:14]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(out_b), reference_logits(ref, b), atol=1e-4, rtol=1e-4)
    # padding slots (-1) wrote nothing: exactly the real tokens' slots left the poisoned state
    written = ~run.kv_caches[0][0].isnan().flatten(0, 1).any(-1).any(-1)
    assert int(written.sum()) == len(a) + len(b)


def test_sharded_checkpoint_and_missing_tensor(tmp_path):
    ref = save_reference("llama2-mha-bias", tmp_path / "full")
    ref.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model, _ = load_model(str(tmp_path / "sharded"), "cpu", torch.float32)
    ids = random_ids(8, seed=6)
    torch.testing.assert_close(PagedRun(model, block_size=4).step({0: ids})[0], reference_logits(ref, ids),
                               atol=1e-4, rtol=1e-4)

    weights = load_file(tmp_path / "full" / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, tmp_path / "full" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 tensors.*layers\.1\.self_attn\.qkv_proj\.weight\[shard 1\]"):
        load_model(str(tmp_path / "full"), "cpu", torch.float32)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(UserError, match=r"unsupported model_type 'gpt2'.*llama, mistral, qwen2"):
        load_model(str(tmp_path), "cpu", torch.float32)


def test_build_model_random_weights():
    _, config = CONFIGS["llama3-gqa-rope"]
    model = build_model(config, "cpu", torch.bfloat16, random_weights=True)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.num_kv_heads == 2 and model.head_dim == 16
    logits = PagedRun(model, block_size=4).step({0: random_ids(10, seed=7)})[0]
    assert logits.dtype == torch.float32 and logits.shape == (10, VOCAB) and logits.isfinite().all()


def test_kv_cache_spec():
    """The cache the engine allocates for a Llama: one zeroed [2, L, blocks, block_size, Hkv, D]
    tensor seen as per-layer (k, v) views, block counts rounded up to whole blocks."""
    _, config = CONFIGS["mistral-window"]  # head_dim 24 != hidden / heads: the spec must take the model's
    spec = build_model(config, "cpu", torch.bfloat16).kv_cache_spec(4, torch.bfloat16)
    assert (spec.num_layers, spec.block_size, spec.num_kv_heads, spec.head_dim) == (2, 4, 2, 24)
    assert spec.bytes_per_block == 2 * 2 * 4 * 2 * 24 * 2
    caches = spec.allocate(3, torch.device("cpu"))
    assert len(caches) == 2
    for k, v in caches:
        assert k.shape == v.shape == (3, 4, 2, 24) and k.dtype == torch.bfloat16
        assert not k.any() and not v.any()
    assert caches[0][0].untyped_storage().data_ptr() == caches[1][1].untyped_storage().data_ptr()
    assert [spec.blocks_for(n) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]
    assert spec.block_table_width(9) == 3
    assert spec.blocks_at_admission(5, planned_len=105) == 2
    table = [7, 2, 5]  # blocks in token order, not in id order
    assert [spec.slot(table, p) for p in (0, 3, 4, 9)] == [28, 31, 8, 21]
    assert spec.slots(table, 2, 6) == [30, 31, 8, 9]
    assert not spec.graphs_capturable()  # head_dim 24: decode attention has no Triton kernel to capture
    meta = AttentionMetadata(slot_mapping=torch.tensor([9]), query_start_loc=torch.tensor([0, 1]),
                             seq_lens=torch.tensor([6]), block_tables=torch.tensor([table]), max_query_len=1,
                             max_seq_len=6, block_size=4)
    spec.prepare_step(meta, torch.device("cpu"))  # the PyTorch paths gather through these once per step
    assert meta.context_slots.tolist() == [[28, 29, 30, 31, 8, 9]]
