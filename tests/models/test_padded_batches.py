"""Left-padded batches stay finite when SDPA returns NaN for a query row with no key to attend to, as
CUDA's kernels do (CPU's return zeros, so the test makes SDPA behave like CUDA)."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from leanserve.data.lm_data import load_tokenizer
from leanserve.eval.lm import greedy_answers
from leanserve.models.hf_causal_lm import load_for_padded_batches
from leanserve.trainers import grpo


@pytest.fixture
def cuda_like_sdpa(monkeypatch):
    sdpa = F.scaled_dot_product_attention

    def nan_on_empty_rows(query, key, value, attn_mask=None, *args, **kwargs):
        out = sdpa(query, key, value, attn_mask, *args, **kwargs)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            empty = ~attn_mask.any(-1, keepdim=True)  # [B, 1|H, Q, 1]
            out = out.masked_fill(empty, float("nan"))
        return out

    monkeypatch.setattr(F, "scaled_dot_product_attention", nan_on_empty_rows)


PROMPTS = ["1 + 2 =", "json is a lightweight data interchange format and", "x"]


def test_greedy_left_padded_batch_equals_one_prompt_at_a_time(tiny_llm_dir, cuda_like_sdpa):
    tok = load_tokenizer(tiny_llm_dir)
    model = load_for_padded_batches(tiny_llm_dir, torch.float32, "cpu")
    batched = greedy_answers(model, tok, PROMPTS, batch_size=3, max_new_tokens=6, device="cpu")
    alone = [greedy_answers(model, tok, [p], batch_size=1, max_new_tokens=6, device="cpu")[0] for p in PROMPTS]
    assert batched == alone and any(batched)


def test_the_default_sdpa_load_would_turn_padded_rows_nan(tiny_llm_dir, cuda_like_sdpa):
    # the control: without eager attention the CUDA-like SDPA poisons every left-padded row
    tok = load_tokenizer(tiny_llm_dir)
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    ids, mask = grpo.left_pad(encoded, tok.pad_token_id)
    padded = (mask == 0).any(1)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32).eval()
    safe = load_for_padded_batches(tiny_llm_dir, torch.float32, "cpu")
    with torch.no_grad():
        last_plain = plain(input_ids=ids, attention_mask=mask).logits[:, -1]
        last_safe = safe(input_ids=ids, attention_mask=mask).logits[:, -1]
    assert padded.any() and last_plain[padded].isnan().all()
    assert torch.isfinite(last_safe).all()
