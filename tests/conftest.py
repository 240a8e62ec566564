"""Shared fixtures: tiny models built in seconds (no hub, no zoo needed)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread, here and in every server, CLI and torchrun rank a test starts (they inherit
# it; set before torch is imported): tiny models gain nothing from more, and two xdist workers'
# OpenMP pools spinning on a 2-core machine cost several times their work.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# Without a GPU, Triton kernels run in its interpreter. Triton reads this when a kernel module is
# imported, so it is set here, before any test module imports leanserve.kernels.
if "TRITON_INTERPRET" not in os.environ:
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_report_header(config) -> str:
    """The log of a run names its code, hardware and date (GPU-only test logs are results too)."""
    from leanserve.eval.report import hardware, provenance
    p = provenance()
    return f"leanserve {p['git_commit']} on {hardware()}, {p['date']}"


def _corpus() -> list[str]:
    import json  # noqa: E401 - their docstrings are the corpus
    import textwrap
    texts = [m.__doc__ or "" for m in (json, textwrap, os, pytest)]
    texts += [f"{a} + {b} = {a + b}" for a in range(40) for b in range(0, 40, 7)]
    return texts * 3


def build_tiny_llm(out_dir, *, vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2,
                   num_heads: int = 4, num_kv_heads: int = 2, max_position_embeddings: int = 512, seed: int = 0,
                   init_std: float = 0.2):
    """A random-weight Llama directory in HF layout with a real trained BPE tokenizer.

    init_std is 10x transformers' default: at 0.02 a random model is nearly constant (greedy
    repeats one token), which would let attention or KV-cache bugs go unseen.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from leanserve.data.tokenizer import stop_token_ids, train_tokenizer

    tok = train_tokenizer(_corpus(), out_dir, vocab_size=vocab_size, model_max_length=max_position_embeddings)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 3,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
                         bos_token_id=tok.bos_token_id, eos_token_id=stop_token_ids(tok),
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
                         initializer_range=init_std)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=stop_token_ids(tok),
                     pad_token_id=tok.pad_token_id).save_pretrained(out_dir)
    return out_dir


def build_tiny_teacher(out_dir, *, size: int = 8, seed: int = 0):
    """A random-weight PixelDiffusionPipeline directory (`size`x`size` pixels, a UNet and CLIP text
    encoder of a few thousand parameters) with a trained BPE tokenizer: the teacher SiD and DPM-OT need."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from leanserve.data.tokenizer import train_tokenizer
    from leanserve.models.pixel_pipeline import PixelDiffusionPipeline, teacher_scheduler

    prompts = ["a red circle in the top left", "a big blue square", "a small green star on a white background"]
    tokenizer = train_tokenizer(prompts * 10, out_dir / "tokenizer-source", vocab_size=300, model_max_length=24)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=size, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=24, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()
    pipe = PixelDiffusionPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                  scheduler=teacher_scheduler())
    pipe.save_pretrained(out_dir / "pipe")
    return out_dir / "pipe"


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


@pytest.fixture
def one_thread():
    """Use with `pytestmark = pytest.mark.usefixtures("one_thread")` (see torch_threads.py)."""
    from torch_threads import single_thread
    with single_thread():
        yield


# Run at the start of every Python process that has it on its path: in an engine core process
# (multiprocessing's spawned child) it makes the core's N-th step raise, as a device failure would.
_CRASHING_CORE = """
import os, sys
if "spawn_main" in " ".join(sys.orig_argv):
    from leanserve.server.engine import core
    _step, _steps = core.EngineCore.step, []

    def step(self):
        _steps.append(1)
        if len(_steps) == int(os.environ["CRASH_AT_STEP"]):
            raise RuntimeError("simulated device failure")
        return _step(self)

    core.EngineCore.step = step
"""


@pytest.fixture
def crash_core_at_step(tmp_path, monkeypatch):
    """`crash_core_at_step(n)`: engine core processes spawned from then on raise "simulated device
    failure" in their n-th step (a sitecustomize on their PYTHONPATH patches EngineCore.step)."""
    def arm(step: int) -> None:
        site = tmp_path / "crashing-core"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(_CRASHING_CORE)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
        monkeypatch.setenv("CRASH_AT_STEP", str(step))
    return arm


@pytest.fixture
def interpreter_bf16_dot(monkeypatch):
    """For Triton kernel tests: Triton's interpreter keeps bf16 as uint16 bits and its tl.dot
    multiplies those bits (triton-lang/triton#11584, not planned to be fixed). Widen bf16 operands
    to fp32 first, which is exact and what the GPU's bf16 MMA with fp32 accumulation computes."""
    import torch
    if torch.cuda.is_available():
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter
    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, a, b, d, *args: create_dot(self, widen(a), widen(b), d, *args))
