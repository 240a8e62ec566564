"""The engine's MoE++ model (models/moepp.py) on hand-written tiny directories: the offline engine's
greedy tokens and logprobs equal a naive eager forward of the same weights (chunked prefill, paged
KV, batched decode, the gating residual chained through the layers); the router stays fp32 in a
bf16 model; on CUDA, graph-replayed decode equals eager decode and the oracle."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from moepp_builders import EagerMoEPP, write_moepp_dir
from safetensors.torch import load_file

from transformers import AutoConfig

from leanserve.models.loader import build_model, load_model
from leanserve.models.moepp import MoEPPForCausalLM
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = ["1 + 2 =", "The json module formats", "Hello"]
ARCHS = {
    "moepp": {},
    "moepp-paper-no-residual": dict(renorm_mode="paper", gating_residual=False, n_const=1, n_zero=2),
    "plain-moe": dict(n_const=0, n_copy=0, n_zero=0, gating_residual=False),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def model_dir(request, tiny_llm_dir, tmp_path_factory):
    return write_moepp_dir(tmp_path_factory.mktemp(request.param), tiny_llm_dir, **ARCHS[request.param])


def engine_config(model_dir, **overrides) -> EngineConfig:
    # small blocks and step budget: prompts are prefilled in chunks next to other sequences' decode
    kwargs = dict(model=str(model_dir), device="cpu", block_size=4, num_kv_blocks=128, max_model_len=64,
                  max_num_batched_tokens=8, max_num_seqs=4, enable_prefix_caching=False)
    return EngineConfig(**(kwargs | overrides))


def test_engine_greedy_tokens_and_logprobs_match_eager_forward(model_dir):
    engine = LLMEngine(engine_config(model_dir))
    assert isinstance(engine.model_runner.model, MoEPPForCausalLM)
    prompts = [engine.tokenizer(t)["input_ids"] for t in PROMPTS]
    results = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0))
    oracle = EagerMoEPP(model_dir)
    outputs = []
    for prompt, res in zip(prompts, results):
        tokens, logprobs = oracle.greedy(prompt, 6)
        assert res.token_ids == tokens
        assert [lp.logprob for lp in res.logprobs] == pytest.approx(logprobs, abs=1e-4)
        outputs += tokens
    assert len(set(outputs)) > 2  # random weights that do not collapse onto one token


def test_router_stays_fp32_in_a_bf16_model(model_dir):
    model, config = load_model(str(model_dir), "cpu", torch.bfloat16)
    mlp = model.model.layers[1].mlp
    ckpt = load_file(model_dir / "model.safetensors")
    assert mlp.router.weight.dtype == torch.float32 and mlp.w13.dtype == torch.bfloat16
    assert torch.equal(mlp.router.weight, ckpt["model.layers.1.mlp.router.weight"])  # not rounded through bf16
    if config.gating_residual:
        assert mlp.gate_map.weight.dtype == torch.float32
    assert config.model_type == "leanserve_moepp" and AutoConfig.from_pretrained(model_dir).n_ffn_experts == 4


def test_dummy_weights_are_random_and_finite(model_dir):
    model = build_model(AutoConfig.from_pretrained(model_dir), "cpu", torch.float32, random_weights=True)
    mlp = model.model.layers[0].mlp
    for p in (mlp.w13, mlp.w2, mlp.router.weight):
        assert torch.isfinite(p).all() and 0.01 < p.std() < 0.03


def test_missing_moe_tensor_is_an_error(model_dir, tmp_path):
    from safetensors.torch import save_file
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(model_dir / "model.safetensors")
    del weights["model.layers.1.mlp.w2"]
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(ValueError, match="missing"):
        load_model(str(broken), "cpu", torch.float32)


@cuda
def test_cuda_graph_decode_equals_eager_and_the_oracle(model_dir, monkeypatch):
    """fp32 on CUDA: the Triton MoE++ kernel inside the model; decode graphs captured at batch 1..4."""
    kw = dict(device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=32)
    eager = LLMEngine(engine_config(model_dir, enforce_eager=True, **kw))
    graphed = LLMEngine(engine_config(model_dir, **kw))
    runner = graphed.model_runner.graph_runner
    assert runner is not None and sorted(runner.graphs) == [1, 2, 4]
    replays = Counter()
    run = runner.run
    monkeypatch.setattr(runner, "run", lambda inputs: replays.update([inputs.num_seqs]) or run(inputs))
    prompts = [eager.tokenizer(t)["input_ids"] for t in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    want, got = eager.generate(prompts, params), graphed.generate(prompts, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert replays[3] > 0
    oracle = EagerMoEPP(model_dir)
    for prompt, res in zip(prompts, got):
        tokens, logprobs = oracle.greedy(prompt, 12)
        assert res.token_ids == tokens
        assert [lp.logprob for lp in res.logprobs] == pytest.approx(logprobs, abs=1e-3)
