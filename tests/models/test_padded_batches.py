"""Left-padded batches stay finite when SDPA returns NaN for a query row with no key to attend to, as
CUDA's kernels do (CPU's return zeros, so the test makes SDPA behave like CUDA)."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from leanserve.data.lm_data import load_tokenizer
from leanserve.eval.lm import greedy_answers
from leanserve.models.hf_causal_lm import load_for_padded_batches, padding_safe
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


def _plain(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_greedy_left_padded_batch_equals_one_prompt_at_a_time(tiny_llm_dir, cuda_like_sdpa):
    tok, model = load_tokenizer(tiny_llm_dir), _plain(tiny_llm_dir)
    batched = greedy_answers(model, tok, PROMPTS, batch_size=3, max_new_tokens=6, device="cpu")
    alone = [greedy_answers(model, tok, [p], batch_size=1, max_new_tokens=6, device="cpu")[0] for p in PROMPTS]
    assert batched == alone and any(batched)
    assert model.config._attn_implementation == "sdpa"  # restored: unpadded work keeps SDPA


def test_sdpa_turns_padded_rows_nan_and_eager_does_not(tiny_llm_dir, cuda_like_sdpa):
    # the control: under the CUDA-like SDPA every left-padded row of a plain model is NaN
    tok = load_tokenizer(tiny_llm_dir)
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    ids, mask = grpo.left_pad(encoded, tok.pad_token_id)
    padded = (mask == 0).any(1)
    plain = _plain(tiny_llm_dir)
    with torch.no_grad():
        assert padded.any() and plain(input_ids=ids, attention_mask=mask).logits[:, -1][padded].isnan().all()
        with padding_safe(plain):
            assert torch.isfinite(plain(input_ids=ids, attention_mask=mask).logits).all()
        policy = load_for_padded_batches(tiny_llm_dir, torch.float32, "cpu")  # GRPO's: eager for good
        assert torch.isfinite(policy(input_ids=ids, attention_mask=mask).logits).all()
