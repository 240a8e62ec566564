"""Settings of an image engine (torch-free, so `leanserve serve --help` stays fast)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ImageEngineConfig:
    model: str                            # diffusers pipeline directory (model_index.json)
    served_model_name: str | None = None  # default: the directory's basename
    device: str = "auto"                  # auto = cuda if available else cpu
    dtype: str = "auto"                   # auto = bfloat16 on cuda, float32 on cpu
    # images per pipeline call (one denoising loop); None = sized when the engine starts from the model's
    # memory per image and the free device memory (ImageModel.auto_batch_size; every image engine sizes
    # against what is free at its start), and for sizes above the native one scaled by area
    max_image_batch: int | None = None
    max_queued_images: int = 64           # waiting images beyond this -> QueueFullError (429)
    # when the previous loop of a shape ran several images, wait up to this fraction of its time for as
    # many new images as it ran before starting the next loop: closed-loop clients whose answers just went
    # out come back, and without the wait they alternate in half-size cohorts; 0 = start at once
    batch_wait: float = 0.5
    # CUDA: replay the UNet's forward as CUDA graphs (one per padded batch size; models/unet_graphs.py). Off by
    # default: the graphs' memory beside a large UNet's memory-sized batch is not measured yet
    cuda_graphs: bool = False
