"""Tiny random-weight image pipelines (SD 1.5-style, SDXL-style, leanserve's pixel-space pipeline) built
in seconds, and the helpers that read /v1/images/generations answers; shared by the server tests of
every image method."""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
from PIL import Image

NATIVE = 16           # unet sample_size 8 x VAE factor 2
PIXEL_NATIVE = 8      # our pixel pipeline: the UNet's sample_size
URL = "/v1/images/generations"


def clip_tokenizer(max_length: int = 16):
    """A CLIP tokenizer over single bytes only (no merges): real class and special tokens, tiny vocab."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_tiny_pipeline(out_dir, xl: bool = False, seed: int = 0):
    """A random-weight SD 1.5-style (or SDXL-style: two text encoders, text_time conditioning)
    diffusers directory with the teachers' scheduler (scaled_linear betas, epsilon, no clipping)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    channels, width = (8, 16), 16

    def text_config(**kw):
        return CLIPTextConfig(vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=width,
                              intermediate_size=2 * width, num_attention_heads=2, num_hidden_layers=1,
                              max_position_embeddings=16, **kw)

    unet_kw = dict(block_out_channels=channels, layers_per_block=1, sample_size=NATIVE // 2, in_channels=4,
                   out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=list(channels), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=NATIVE)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    if xl:
        time_dim = 4
        unet = UNet2DConditionModel(cross_attention_dim=2 * width, addition_embed_type="text_time",
                                    addition_time_embed_dim=time_dim,
                                    projection_class_embeddings_input_dim=6 * time_dim + width, **unet_kw)
        pipe = StableDiffusionXLPipeline(
            vae=vae, unet=unet, scheduler=scheduler, text_encoder=CLIPTextModel(text_config()),
            text_encoder_2=CLIPTextModelWithProjection(text_config(projection_dim=width)),
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), force_zeros_for_empty_prompt=True)
    else:
        unet = UNet2DConditionModel(cross_attention_dim=width, **unet_kw)
        pipe = StableDiffusionPipeline(vae=vae, unet=unet, scheduler=scheduler, tokenizer=clip_tokenizer(),
                                       text_encoder=CLIPTextModel(text_config()), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_pixel_pipeline(out_dir, seed: int = 0):
    """leanserve's own pixel-space pipeline (no VAE) with random weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from leanserve.models.pixel_pipeline import (
        PixelDiffusionPipeline,
        teacher_scheduler,
    )

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513,
                                                hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                                num_hidden_layers=1, max_position_embeddings=16))
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=PIXEL_NATIVE,
                                in_channels=3, out_channels=3, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                attention_head_dim=4, cross_attention_dim=16)
    PixelDiffusionPipeline(unet=unet, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                           scheduler=teacher_scheduler()).save_pretrained(out_dir)
    return out_dir


def v_pipeline_like(pipe, alphas_cumprod):
    """A PixelDiffusionPipeline whose UNet predicts v and denoises exactly like `pipe`'s ε UNet
    (v = (ε − s·x_t) / a at the schedule's ᾱ_t): whatever reads a teacher must give the same images."""
    import copy

    import torch

    from leanserve.models.pixel_pipeline import PixelDiffusionPipeline, teacher_scheduler

    eps_unet = pipe.unet

    def v_forward(sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
        eps = eps_unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        ab = alphas_cumprod[torch.as_tensor(timestep).long()]
        return ((eps - (1 - ab).sqrt() * sample) / ab.sqrt(),)

    v_unet = copy.deepcopy(eps_unet)
    v_unet.forward = v_forward
    v = PixelDiffusionPipeline(unet=v_unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                               scheduler=teacher_scheduler("v_prediction"))
    v.set_progress_bar_config(disable=True)
    return v


def decode(item: dict, fmt: str = "PNG") -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    assert image.format == fmt and image.mode == "RGB"
    return np.asarray(image).astype(np.int16)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a - b).max()) <= 1


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status and error["message"]
    if param is not None:
        assert error["param"] == param, error
