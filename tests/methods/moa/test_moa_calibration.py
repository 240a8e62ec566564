"""MoA calibration items (lengths, the dense model's own responses, explicit response spans) and the
validation attention (each KV head limited to its rule's span, exactly the serving mask)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from leanserve.compressors import moa_calibration as calib
from leanserve.compressors.moa_validate import _span_attention, spans, validation_ce
from leanserve.data.long_context import LONG_KINDS, Corpus
from leanserve.models.moa_plan import kv_slots, sink_and_ring, span_mask

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llm_dir)


@pytest.mark.parametrize("length,n_min,count", [(2048, 512, 4), (512, 512, 5), (8192, 2048, 50)])
def test_target_lengths_fill_the_top_two_buckets(length, n_min, count):
    lengths = calib.target_lengths(length, n_min, count)
    assert len(lengths) == count and lengths == sorted(lengths) and lengths[-1] == length
    assert lengths[0] > max(length - n_min, length // 2)


def test_items_carry_the_dense_models_greedy_response(model_and_tokenizer):
    model, tok = model_and_tokenizer
    corpus = Corpus.load(held_out=False, max_files=8)
    items = calib.build_items(model, tok, corpus, 400, 256, 4, max_new_tokens=6, targets="model", seed=0,
                              name="calibration")
    assert [item.kind for item in items] == list(LONG_KINDS)
    stops = calib.stop_ids(model, tok)
    for item in items:
        assert len(item.ids) <= 400 and 0 < item.response_start < len(item.ids)
        prompt, response = item.ids[:item.response_start], item.ids[item.response_start:]
        assert tok.decode(prompt).startswith(tok.bos_token + "<|start_header_id|>user")
        assert response == calib.dense_response(model, prompt, 6, stops)
        assert len(response) == 6 or response[-1] in stops
    again = calib.build_items(model, tok, corpus, 400, 256, 4, max_new_tokens=6, targets="model", seed=0,
                              name="calibration")
    assert again == items


def test_answer_targets_supervise_the_tasks_answer(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    items = calib.build_items(model, tok, Corpus.load(held_out=True, max_files=8), 300, 256, 2,
                              max_new_tokens=12, targets="answer", seed=1, name="validation")
    for item in items:
        assert item.response == item.answer
        assert item.ids[-1] in calib.stop_ids(model, tok)
    calib.save_items(tmp_path / "items.jsonl", items)
    assert calib.load_items(tmp_path / "items.jsonl") == items


def test_span_attention_masks_each_kv_head_by_its_rule():
    gen = torch.Generator().manual_seed(0)
    n, block = 90, 16
    q = torch.randn(1, 6, n, 8, generator=gen)
    k, v = torch.randn(1, 3, n, 8, generator=gen), torch.randn(1, 3, n, 8, generator=gen)
    rules = [(0, 1.0), (32, 0.0), (0, 0.5)]  # dense, sink + one ring block, half (48 slots)
    module = SimpleNamespace(moa_rules=rules, moa_block_size=block)
    out, _ = _span_attention(module, q, k, v, None, 0.3)
    for h in range(6):
        sink, ring = sink_and_ring(kv_slots(*rules[h // 2], n, block), block)
        s = (q[0, h] @ k[0, h // 2].T * 0.3).masked_fill(~span_mask(n, sink, ring), float("-inf"))
        torch.testing.assert_close(out[0, :, h], torch.softmax(s, -1) @ v[0, h // 2], rtol=1e-5, atol=1e-6)


def test_spans_change_only_what_a_head_cannot_see(model_and_tokenizer):
    model, _ = model_and_tokenizer
    ids = torch.randint(5, 400, (1, 120), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with spans(model, [[(0, 1.0)] * 2] * 2, 16):
            everything = model(input_ids=ids).logits
        with spans(model, [[(0, 1.0), (48, 0.0)], [(48, 0.0), (0, 1.0)]], 16):
            limited = model(input_ids=ids).logits
    torch.testing.assert_close(everything, dense, rtol=1e-5, atol=1e-5)
    # 48 slots: positions 0..47 still see every earlier key, later ones do not
    torch.testing.assert_close(limited[:, :48], dense[:, :48], rtol=1e-5, atol=1e-5)
    assert (limited[:, 48:] - dense[:, 48:]).abs().amax(-1).min() > 1e-4
    assert model.config._attn_implementation != "leanserve_moa_spans"


def test_validation_ce_averages_kinds(model_and_tokenizer):
    model, _ = model_and_tokenizer
    ids = torch.randint(5, 400, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    items = [calib.Item("a", "copy", ids, 50, "", ""), calib.Item("b", "copy", ids[:40], 30, "", ""),
             calib.Item("c", "passkey", ids, 40, "", "")]
    mean, per_kind = validation_ce(model, items, None, 16)
    assert set(per_kind) == {"copy", "passkey"} and mean == pytest.approx(sum(per_kind.values()) / 2)
    narrow, _ = validation_ce(model, items, [[(32, 0.0)] * 2] * 2, 16)
    assert narrow != mean
