"""An ensemble directory served as one model by the offline engine (LLMEngine, fp32 CPU, the tiny
tied-embedding Llama): token_mean equals a naive loop over transformers member models, sequence_sample
decodes each completion with the member it drew, the KV spec's bytes are what is allocated, and bad
directories are clear errors."""
from __future__ import annotations

import shutil

import pytest
import torch
from ensemble_dirs import build_ensemble_dir, greedy, member_models, mixture_logprobs
from graph_replay import attach_runner

from leanserve.errors import UserError
from leanserve.models.ensemble_dir import MEMBERS_FILE, read_members, write_members
from leanserve.models.loader import load_model
from leanserve.models.model_dir import load_model_info, save_model_info
from leanserve.models.tensor_parallel import set_tensor_parallel
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
S = 3
TEXTS = ["1 + 2 =", "The json module", "Wrap text: the textwrap module formats paragraphs of text",
         "7 + 14 = 21", "39 + 35 = 74 and 3 + 28 = 31, so", "Wrap text: the textwrap module wraps"]


def engine_config(model_dir, **overrides) -> EngineConfig:
    # blocks of 4 and a 16-token step budget: prompts span blocks, prefills are chunked and share
    # steps with decodes; 3 sequences at most, so later requests are admitted as earlier ones finish
    kwargs = dict(model=str(model_dir), block_size=4, num_kv_blocks=256, max_model_len=128,
                  max_num_batched_tokens=16, max_num_seqs=3, dtype="float32")
    return EngineConfig(**(kwargs | overrides))


@pytest.fixture(scope="module")
def ensemble_dirs(tiny_llm_dir, tmp_path_factory):
    """(scope, S) -> an ensemble directory, built once."""
    root = tmp_path_factory.mktemp("ensembles")
    built = {}

    def get(scope: str, num_members: int = S, noise: float = 0.1):
        key = (scope, num_members, noise)
        if key not in built:
            built[key] = build_ensemble_dir(tiny_llm_dir, root / f"{scope}-{num_members}-{noise}".replace(":", "_"),
                                            num_members=num_members, scope=scope, noise=noise)
        return built[key]
    return get


@pytest.fixture(scope="module")
def prompts(tiny_llm_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    return [tok(t)["input_ids"] for t in TEXTS]


def check_against_mixture(results, prompts, models, k: int) -> None:
    """Every greedy token is the argmax of the naive mixture, and its logprob and top-k are the mixture's."""
    for prompt, res in zip(prompts, results):
        ref = mixture_logprobs(models, prompt + res.token_ids)
        for j, (token, lp) in enumerate(zip(res.token_ids, res.logprobs)):
            row = ref[len(prompt) + j - 1]  # the distribution this token was chosen from
            top = row.topk(k)
            assert token == int(top.indices[0])
            assert lp.logprob == pytest.approx(float(row[token]), abs=1e-4)
            assert [i for i, _, _ in lp.top] == top.indices.tolist()
            assert [v for _, _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("scope, num_members", [("full", S), ("last:1", S), ("last:1", 1)])
def test_token_mean_equals_the_naive_member_loop(ensemble_dirs, prompts, scope, num_members):
    ens = ensemble_dirs(scope, num_members)
    engine = LLMEngine(engine_config(ens))
    params = [SamplingParams(temperature=0, max_tokens=10 + 3 * i, ignore_eos=True, logprobs=3)
              for i in range(len(prompts))]
    first = engine.generate(prompts, params)
    # the same prompts again: their full blocks come from the prefix cache (all members' K/V in them)
    again = engine.generate(prompts, params)
    assert all(r.num_cached_tokens > 0 for r in again if len(r.prompt_token_ids) > 4)
    assert [r.token_ids for r in again] == [r.token_ids for r in first]
    models = member_models(ens)
    check_against_mixture(first, prompts, models, k=3)
    check_against_mixture(again, prompts, models, k=3)
    assert engine.block_manager.usage == 0.0


def test_identical_members_serve_the_base_model(tiny_llm_dir, ensemble_dirs, prompts):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    base = LLMEngine(engine_config(tiny_llm_dir)).generate(prompts, params)
    for scope in ("full", "last:1"):
        ens = LLMEngine(engine_config(ensemble_dirs(scope, noise=0.0))).generate(prompts, params)
        assert [r.token_ids for r in ens] == [r.token_ids for r in base]
        for e, b in zip(ens, base):
            assert [t.logprob for t in e.logprobs] == pytest.approx([t.logprob for t in b.logprobs], abs=1e-5)


@pytest.mark.parametrize("scope, mode, member_layers", [("full", "token_mean", 2), ("last:1", "token_mean", 1),
                                                         ("full", "sequence_sample", 0)])
def test_kv_bytes_per_block_are_what_is_allocated(ensemble_dirs, scope, mode, member_layers):
    """Member layers keep S x the KV heads of shared ones (sequence_sample: one member per sequence)."""
    engine = LLMEngine(engine_config(ensemble_dirs(scope), model_settings={"ensemble_mode": mode}))
    mr = engine.model_runner
    storages = {k.untyped_storage().data_ptr(): k.untyped_storage().nbytes() for k, _ in mr.kv_caches}
    num_blocks = engine.block_manager.num_blocks
    assert sum(storages.values()) == num_blocks * mr.kv_spec.bytes_per_block
    cfg = mr.hf_config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    heads = (cfg.num_hidden_layers - member_layers) * cfg.num_key_value_heads + member_layers * S * cfg.num_key_value_heads
    assert mr.kv_spec.bytes_per_block == 2 * 4 * heads * head_dim * 4  # K and V, 4 tokens, fp32


def run_greedy(engine: LLMEngine, prompts, seeds, max_tokens: int = 8) -> list[tuple[list[int], list[int], int]]:
    """(prompt, output, drawn variant) per greedy request (seed None: unseeded), all admitted at once."""
    rows = {}
    for i, seed in enumerate(seeds):
        prompt = prompts[i % len(prompts)]
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                                           seed=seed))
        rows[f"r{i}"] = (prompt, [], engine.core.requests[f"r{i}"].variant)
    while engine.has_unfinished():
        for out in engine.step():
            rows[out.request_id][1].extend(out.new_token_ids)
    return list(rows.values())


def test_sequence_sample_decodes_each_completion_with_the_member_it_drew(ensemble_dirs, prompts):
    ens = ensemble_dirs("last:1")
    engine = LLMEngine(engine_config(ens, model_settings={"ensemble_mode": "sequence_sample"}))
    assert engine.model_runner.num_variants == S
    models = member_models(ens)
    rows = run_greedy(engine, prompts, seeds=range(24))
    assert {v for _, _, v in rows} == set(range(S))  # 24 draws hit every member
    for prompt, output, variant in rows:
        assert output == greedy(models[variant], prompt, 8)
    # the same prompt on different members: never each other's prefix-cache blocks, but hits on its own
    assert engine.block_manager.prefix_cache_hits > 0
    # a seed fixes the draw; without one the engine's generator draws (for every request anew)
    assert [v for _, _, v in run_greedy(engine, prompts, seeds=range(24))] == [v for _, _, v in rows]
    unseeded = run_greedy(engine, prompts, seeds=[None] * 24, max_tokens=2)
    assert {v for _, _, v in unseeded} == set(range(S))


def test_sequence_sample_replayed_decode_equals_eager(ensemble_dirs, prompts):
    """The CUDA-graph runner's buffers with per-row variant ids, on CPU (its "graphs" eager forwards):
    every member on every row then select, against the eager step's grouping by member."""
    engine = LLMEngine(engine_config(ensemble_dirs("full"), max_num_seqs=8,
                                     model_settings={"ensemble_mode": "sequence_sample"}))
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, seed=i) if i % 2 else
              SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12 - i, ignore_eos=True, seed=i)
              for i in range(len(prompts))]
    eager = engine.generate(prompts, params)
    runner = attach_runner(engine, [1, 2, 4, 8])
    replayed = engine.generate(prompts, params)
    assert sum(runner.replays.values()) > 0
    assert [r.token_ids for r in replayed] == [r.token_ids for r in eager]


def test_token_mean_replayed_decode_equals_eager(ensemble_dirs, prompts):
    engine = LLMEngine(engine_config(ensemble_dirs("last:1"), max_num_seqs=8))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    eager = engine.generate(prompts, params)
    runner = attach_runner(engine, [2, 8])
    replayed = engine.generate(prompts, params)
    assert sum(runner.replays.values()) > 0
    assert [r.token_ids for r in replayed] == [r.token_ids for r in eager]
    for r, e in zip(replayed, eager):
        assert [t.logprob for t in r.logprobs] == pytest.approx([t.logprob for t in e.logprobs], abs=1e-5)


def test_random_weights_build_random_members_without_a_members_file(ensemble_dirs, tmp_path):
    ens = shutil.copytree(ensemble_dirs("full"), tmp_path / "ens")
    (ens / MEMBERS_FILE).unlink()
    model, _ = load_model(str(ens), "cpu", torch.float32, random_weights=True)
    head = model.lm_head.weight
    assert head.shape[0] == S and not torch.equal(head[0], head[1])
    with pytest.raises(UserError, match=f"{MEMBERS_FILE} is missing"):
        load_model(str(ens), "cpu", torch.float32)


def _edit_settings(ens, **changes):
    info = load_model_info(ens)
    info.settings.update(changes)
    save_model_info(ens, info)


@pytest.mark.parametrize("change, message", [
    ({"ensemble_mode": "logit_mean"}, "ensemble_mode must be one of token_mean, sequence_sample"),
    ({"num_members": S + 1}, "does not match leanserve.json's members"),
    ({"scope": "last:1"}, "is not one scope 'last:1' samples"),
    ({"scope": "last:9"}, "scope must be 'full' or 'last:K'"),
])
def test_bad_settings_are_clear_errors(ensemble_dirs, tmp_path, change, message):
    ens = shutil.copytree(ensemble_dirs("full"), tmp_path / "ens")
    _edit_settings(ens, **change)
    with pytest.raises(UserError, match=message):
        load_model(str(ens), "cpu", torch.float32)


def test_members_that_miss_part_of_the_scope_or_have_wrong_shapes_are_clear_errors(ensemble_dirs, tmp_path):
    ens = shutil.copytree(ensemble_dirs("last:1"), tmp_path / "ens")
    settings = load_model_info(ens).settings
    _edit_settings(ens, scope="last:2")  # the members hold layer 1 only
    with pytest.raises(UserError, match=r"member_params lack model\.layers\.0\."):
        load_model(str(ens), "cpu", torch.float32)
    _edit_settings(ens, scope="last:1")
    members = read_members(ens, settings)
    for m in members:
        m["model.norm.weight"] = m["model.norm.weight"][:-1]
    write_members(ens, members, torch.float32)
    with pytest.raises(UserError, match=r"0\.model\.norm\.weight has shape \(63,\), the model needs \(64,\)"):
        load_model(str(ens), "cpu", torch.float32)


def test_tensor_parallel_is_refused(ensemble_dirs):
    """Loading rank 0 of 2 reaches the convert step, which names what it cannot split."""
    set_tensor_parallel(0, 2)
    try:
        with pytest.raises(UserError, match="ensemble models cannot be served with --tensor-parallel-size > 1"):
            load_model(str(ensemble_dirs("full")), "cpu", torch.float32)
    finally:
        set_tensor_parallel(0, 1)
