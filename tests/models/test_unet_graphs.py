"""CUDA graphs for the UNet's forward (models/unet_graphs.py). On CPU the wrapper's own logic (signatures,
padded static buffers, output copies, fallbacks) runs with "graphs" that replay the forward eagerly over
the static buffers, i.e. what a replay computes; the real capture is tested on CUDA."""
from __future__ import annotations

import pytest
import torch

from leanserve.models.unet_graphs import GraphedForward, graph_forward, padded_batch, returns_tensors
from tests.image_builders import build_tiny_pipeline, build_tiny_pixel_pipeline


class EagerReplay(GraphedForward):
    """Replays run the forward over the static inputs and write the static outputs, as a graph does."""

    @staticmethod
    def capturable(tensors) -> bool:
        return True

    def record(self, args, kwargs):
        out = self.eager(*args, **kwargs)
        if not returns_tensors(out):
            return None
        static = out.clone() if isinstance(out, torch.Tensor) else tuple(o.clone() for o in out)

        def replay():
            new = self.eager(*args, **kwargs)
            for s, o in zip((static,) if isinstance(static, torch.Tensor) else static,
                            (new,) if isinstance(new, torch.Tensor) else new):
                s.copy_(o)
        return replay, static


def pixel_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(build_tiny_pixel_pipeline(tmp_path / "pixel") / "unet").eval()


def inputs(n: int, seed: int, t=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    ctx = torch.randn(n, 16, 16, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g) if t is None else t
    return x, t, ctx


def eager_replay(unet, max_batch: int = 64, max_graphs: int = 16) -> EagerReplay:
    wrapper = EagerReplay(unet.forward, max_batch, max_graphs)
    unet.forward = wrapper
    return wrapper


def test_padded_batch_rounds_up_to_a_bucket_within_the_sized_batch():
    assert [padded_batch(n, 512) for n in (1, 3, 5, 17, 33, 63, 65, 129, 300, 512)] == \
        [1, 4, 8, 24, 40, 64, 80, 160, 320, 512]
    assert padded_batch(33, 36) == 36    # the bucket (40) would pass the batch memory was sized for
    assert padded_batch(65, 64) == 65    # above it: as it is


@torch.no_grad()
def test_replays_match_the_eager_forward_at_padded_batches(tmp_path):
    unet = pixel_unet(tmp_path)
    expected = {(n, s): unet(*inputs(n, s), return_dict=False)[0] for n, s in ((3, 0), (4, 1), (3, 2), (1, 3))}
    wrapper = eager_replay(unet)
    for (n, s), want in expected.items():
        got = unet(*inputs(n, s), return_dict=False)
        assert isinstance(got, tuple) and got[0].shape == want.shape
        torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)
    # 3 and 4 images share the batch-4 graph: the later batch of 3 reads none of the earlier 4th row
    assert wrapper.replays == 4 and len(wrapper.graphs) == 2


@torch.no_grad()
def test_outputs_are_copies_that_the_next_replay_leaves_alone(tmp_path):
    unet = pixel_unet(tmp_path)
    eager_replay(unet)
    first = unet(*inputs(2, 0), return_dict=False)[0]
    kept = first.clone()
    unet(*inputs(2, 1), return_dict=False)
    torch.testing.assert_close(first, kept, rtol=0, atol=0)


@torch.no_grad()
def test_a_scalar_timestep_tensor_is_an_input_not_a_constant(tmp_path):
    unet = pixel_unet(tmp_path)
    want = [unet(*inputs(2, 0, t=torch.tensor(t)), return_dict=False)[0] for t in (999, 500)]
    wrapper = eager_replay(unet)
    got = [unet(*inputs(2, 0, t=torch.tensor(t)), return_dict=False)[0] for t in (999, 500)]
    assert wrapper.replays == 2 and len(wrapper.graphs) == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1])


def test_what_a_graph_cannot_replay_runs_eagerly(tmp_path):
    unet = pixel_unet(tmp_path)
    wrapper = eager_replay(unet)
    x, t, ctx = inputs(2, 0)
    with torch.no_grad():
        unet(x, 999, ctx, return_dict=False)     # a Python number would be baked in
        out = unet(x, t, ctx)                    # return_dict=True: a dataclass, not tensors
    assert not isinstance(out, tuple) and out.sample.shape == x.shape
    unet(x, t, ctx, return_dict=False)           # autograd
    assert wrapper.replays == 0 and not wrapper.graphs and len(wrapper.uncapturable) == 1


def test_a_failed_capture_runs_eagerly_from_then_on(tmp_path, caplog):
    class FailingCapture(EagerReplay):
        def record(self, args, kwargs):
            self.tries = getattr(self, "tries", 0) + 1
            raise RuntimeError("operation not permitted when stream is capturing\nmore")

    unet = pixel_unet(tmp_path)
    x, t, ctx = inputs(2, 0)
    with torch.no_grad():
        want = unet(x, t, ctx, return_dict=False)[0]
        wrapper = FailingCapture(unet.forward, 8)
        unet.forward = wrapper
        got = [unet(x, t, ctx, return_dict=False)[0] for _ in range(2)]
    assert all(torch.equal(g, want) for g in got)  # the eager answer, both times
    assert wrapper.tries == 1 and wrapper.replays == 0 and len(wrapper.uncapturable) == 1  # not tried again
    assert "capturing" in caplog.text and "runs eagerly" in caplog.text


def test_the_oldest_graph_goes_past_max_graphs(tmp_path):
    unet = pixel_unet(tmp_path)
    wrapper = eager_replay(unet, max_graphs=2)
    with torch.no_grad():
        for n in (1, 2, 1, 4):
            unet(*inputs(n, n), return_dict=False)
    assert [key[0] for key in wrapper.graphs] == [1, 4]


@torch.no_grad()
def test_sdxl_conditioning_dicts_are_graph_inputs(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(build_tiny_pipeline(tmp_path / "xl", xl=True))
    kwargs = dict(prompt=["a", "b", "c"], num_inference_steps=2, height=16, width=16, output_type="np")
    want = pipe(**kwargs, generator=[torch.Generator().manual_seed(i) for i in range(3)]).images
    wrapper = eager_replay(pipe.unet)
    got = pipe(**kwargs, generator=[torch.Generator().manual_seed(i) for i in range(3)]).images
    assert wrapper.replays == 2  # CFG: 6 rows per call, padded to 8
    assert [key[0] for key in wrapper.graphs] == [8]
    assert abs(got - want).max() < 1e-4


def test_graph_forward_wraps_once_and_keeps_hooks(tmp_path):
    unet = pixel_unet(tmp_path)
    calls = []
    unet.register_forward_hook(lambda *_: calls.append(1))
    wrapper = graph_forward(unet, max_batch=8)
    assert graph_forward(unet, max_batch=8) is wrapper and unet.forward is wrapper
    with torch.no_grad():
        unet(*inputs(2, 0), return_dict=False)  # CPU tensors: the eager forward
    assert calls == [1] and wrapper.replays == 0


def test_a_graphed_text_encoder_encodes_prompts_as_eager_does(tmp_path):
    """The pixel pipeline's prompt encoding through a graphed text encoder (as enable_cuda_graphs sets it up on
    CUDA): 3 prompts pad to a bucket of 4, and the padding row never changes the real ones (causal attention
    within each prompt)."""
    from leanserve.models.image_pipeline import load_image_pipeline

    pipe = load_image_pipeline(build_tiny_pixel_pipeline(tmp_path / "pixel"))
    prompts = ["a red circle", "a blue square at the top left", ""]
    want = pipe._encode(prompts, torch.device("cpu"))
    wrapper = eager_replay(pipe.text_encoder, max_batch=8)
    for n in (3, 2, 3):
        with torch.no_grad():  # as in a pipeline call: a graph cannot record autograd
            got = pipe._encode(prompts[:n], torch.device("cpu"))
        assert torch.allclose(got, want[:n], atol=1e-5)
    assert wrapper.replays == 3 and len(wrapper.graphs) == 2  # batches 3 and 2 pad to the buckets 4 and 2


def test_an_image_model_on_cpu_keeps_its_eager_unet(tmp_path):
    from leanserve.models.image_model import load_image_model

    model = load_image_model(build_tiny_pixel_pipeline(tmp_path / "pixel"), "pixel")
    assert model.enable_cuda_graphs(8) is False
    assert not isinstance(model.pipe.unet.forward, GraphedForward)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_replay_the_pipeline_as_eager_does(tmp_path):
    from leanserve.models.image_model import load_image_model
    from leanserve.models.image_params import ImageParams

    model = load_image_model(build_tiny_pixel_pipeline(tmp_path / "pixel"), "pixel", device="cuda")
    p = ImageParams(8, 8, 4, 3.0)

    def images(n):
        return model.generate([f"prompt {i}" for i in range(n)], None, p,
                              [torch.Generator("cpu").manual_seed(i) for i in range(n)], on_step=lambda: False)
    want = {n: images(n) for n in (3, 4)}
    assert model.enable_cuda_graphs(8)
    wrapper, text = model.pipe.unet.forward, model.pipe.text_encoder.forward
    got = {n: images(n) for n in (3, 4, 3)}
    assert wrapper.replays == 3 * 4 and len(wrapper.graphs) == 1  # 4 steps each; CFG: 6 and 8 rows -> 8
    assert text.replays == 3 * 2 and len(text.graphs) == 1  # prompts and negative prompts; 3 and 4 -> 4
    for n in (3, 4):
        assert abs(got[n] - want[n]).max() < 1e-3
