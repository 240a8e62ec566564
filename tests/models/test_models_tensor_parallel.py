"""Tensor parallelism in the model layer: a Llama (and a MoE++ model, experts replicated) loaded as
2 gloo ranks, each reading only its shards from safetensors, computes the same fp32 logits as the
whole model in one process, through the paged KV cache (chunked prefill, mixed and pure decode
steps); and sizes that do not split the model are refused with a clear error."""
from __future__ import annotations

import multiprocessing

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from moepp_builders import write_moepp_dir
from test_models_llama import PagedRun
from transformers import LlamaConfig, LlamaForCausalLM

from leanserve.errors import UserError
from leanserve.models.loader import build_model, load_model
from leanserve.models.tensor_parallel import join_process_group, leave_process_group, set_tensor_parallel

VOCAB = 97  # odd: the last rank's vocabulary shard is padded
TINY = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, max_position_embeddings=64)
# GQA ratio 1 (every query head its own KV head; biases, untied head) and 4 (tied embeddings)
CONFIGS = {
    "gqa1": LlamaConfig(**TINY, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                        attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    "gqa4": LlamaConfig(**TINY, intermediate_size=112, num_attention_heads=8, num_key_value_heads=2,
                        tie_word_embeddings=True),
}
WORLD = 2
# MoE++ at TP: attention split by KV heads like Llama's, the experts replicated on every rank
MOEPP = dict(num_attention_heads=4, num_key_value_heads=2)


def save_model(config: LlamaConfig, out_dir) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # HF zero-inits biases and unit-inits norms
    model.save_pretrained(out_dir, safe_serialization=True)


def run_steps(model) -> torch.Tensor:
    """Logits of every token of three engine-like steps: prefill + a first chunk, a decode next to
    a chunk, a pure decode; non-contiguous blocks of 4 tokens."""
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randint(0, model.vocab_size, (n,), generator=gen).tolist() for n in (9, 8))
    run = PagedRun(model, block_size=4)
    steps = [{0: a[:7], 1: b[:3]}, {0: a[7:8], 1: b[3:7]}, {0: a[8:9], 1: b[7:8]}]
    return torch.cat([logits for step in steps for logits in run.step(step).values()])


def rank_main(rank: int, port: int, model_dirs: dict[str, str], out_file: str) -> None:
    torch.set_num_threads(1)
    set_tensor_parallel(rank, WORLD)
    models = {name: load_model(path, "cpu", torch.float32)[0] for name, path in model_dirs.items()}
    join_process_group(dist.TCPStore("127.0.0.1", port, WORLD, is_master=False), torch.device("cpu"))
    logits = {name: run_steps(model) for name, model in models.items()}
    if rank == 0:
        save_file(logits, out_file)
    leave_process_group()


@pytest.fixture(scope="module")
def tp2_logits(tmp_path_factory):
    """{config name: its logits at tensor-parallel size 2}, from one 2-rank run over every config."""
    root = tmp_path_factory.mktemp("tp")
    dirs = {}
    for name, config in CONFIGS.items():
        save_model(config, root / name)
        dirs[name] = str(root / name)
    dirs["moepp"] = str(write_moepp_dir(root / "moepp", **MOEPP))
    store = dist.TCPStore("127.0.0.1", 0, WORLD, is_master=True, wait_for_workers=False)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(rank, store.port, dirs, str(root / "logits.safetensors")))
             for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * WORLD
    return dirs, load_file(root / "logits.safetensors")


@pytest.mark.parametrize("name", [*CONFIGS, "moepp"])
def test_tp2_logits_equal_tp1(name, tp2_logits):
    dirs, logits = tp2_logits
    model, _ = load_model(dirs[name], "cpu", torch.float32)
    expected = run_steps(model)
    assert logits[name].shape == expected.shape == (17, model.vocab_size)
    torch.testing.assert_close(logits[name], expected, rtol=1e-5, atol=1e-5)


def test_a_rank_reads_only_its_shard(tp2_logits):
    """Rank 1's parameters are its rows/columns of the checkpoint, the padded vocabulary row zero."""
    dirs, _ = tp2_logits
    full = load_file(f"{dirs['gqa1']}/model.safetensors")
    set_tensor_parallel(1, WORLD)
    try:
        model, _ = load_model(dirs["gqa1"], "cpu", torch.float32)
    finally:
        set_tensor_parallel(0, 1)
    attn = model.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (2, 2)
    q, k = (full[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qk")
    torch.testing.assert_close(attn.qkv_proj.weight[:32], q[32:])
    torch.testing.assert_close(attn.qkv_proj.weight[32:64], k[32:])
    torch.testing.assert_close(attn.o_proj.weight, full["model.layers.0.self_attn.o_proj.weight"][:, 32:])
    torch.testing.assert_close(attn.o_proj.bias, full["model.layers.0.self_attn.o_proj.bias"])
    embed = model.model.embed_tokens.weight
    assert embed.shape == (49, 64)
    torch.testing.assert_close(embed[:48], full["model.embed_tokens.weight"][49:])
    assert not embed[48].any()


@pytest.mark.parametrize("size,message", [(3, "number of KV heads"), (4, "intermediate_size")])
def test_a_size_that_does_not_split_the_model_is_refused(size, message):
    config = LlamaConfig(**TINY, intermediate_size=98, num_attention_heads=8, num_key_value_heads=4 if size == 4 else 2)
    set_tensor_parallel(0, size)
    try:
        with pytest.raises(UserError, match=f"--tensor-parallel-size {size} must divide the model's {message}"):
            build_model(config, "meta", torch.float32)
    finally:
        set_tensor_parallel(0, 1)
