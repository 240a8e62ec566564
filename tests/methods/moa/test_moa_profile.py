"""MoA profiling on a tiny Llama: the per-item influence histogram against dense autograd through the
eager attention weights (RoPE, GQA, the response-only loss and gradient checkpointing included), and
the resumable per-item files."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leanserve.compressors.moa_calibration import Item
from leanserve.compressors.moa_profile import prepare_for_profiling, profile_item, profile_items

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCK = 16


def _model(model_dir, attn):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()


def _item(n: int, start: int, seed: int) -> Item:
    ids = torch.randint(5, 400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return Item(f"t{seed}", "retrieval", ids, start, "", "")


def autograd_hist(model, item: Item) -> torch.Tensor:
    """G = dL/dA from autograd on the eager attention weights; E = A (D - G) / (1 - A), D = sum A G
    (MoA's form); |E| summed per query head and distance bucket, keys of the sink block left out."""
    ids = torch.tensor(item.ids)[None]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    F.cross_entropy(out.logits[0, item.response_start - 1:-1], ids[0, item.response_start:]).backward()
    n = len(item.ids)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    keep = (j <= i) & (j >= BLOCK)
    bucket = ((i - j).clamp_min(0) // BLOCK).expand(n, n)[keep]
    hists = []
    for a in out.attentions:
        a, g = a[0].double(), a.grad[0].double()
        e = (a * ((a * g).sum(-1, keepdim=True) - g) / (1 - a).clamp_min(1e-6)).abs()
        hist = torch.zeros(a.shape[0], -(-n // BLOCK), dtype=torch.float64)
        hists.append(hist.index_add_(1, bucket, e[:, keep]))
    return torch.stack(hists)


@pytest.mark.parametrize("n,start", [(100, 90), (64, 40)])
def test_profile_equals_autograd_through_the_attention_weights(tiny_llm_dir, n, start):
    item = _item(n, start, seed=n)
    expected = autograd_hist(_model(tiny_llm_dir, "eager"), item)
    model = _model(tiny_llm_dir, "sdpa")
    prepare_for_profiling(model)
    got = torch.from_numpy(profile_item(model, item, BLOCK))
    assert got.shape == (2, 4, -(-n // BLOCK)) and got.sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-7)
    assert not any(p.grad is not None for p in model.parameters())  # no weight gradients


def test_profiled_items_resume_from_their_files(tiny_llm_dir, tmp_path):
    model = _model(tiny_llm_dir, "sdpa")
    prepare_for_profiling(model)
    items = [_item(80, 70, seed=s) for s in range(3)]
    calls = []
    first = profile_items(model, items, tmp_path, BLOCK, on_item=calls.append)
    assert calls == [False] * 3 and len(list(tmp_path.glob("*.safetensors"))) == 3
    (tmp_path / "00001.safetensors").unlink()  # as if the run died while profiling item 1
    calls.clear()
    again = profile_items(model, items, tmp_path, BLOCK, on_item=calls.append)
    assert calls == [True, False, True]
    for (h1, n1), (h2, n2) in zip(first, again):
        assert n1 == n2 == 80 and (h1 == h2).all()
