"""Images API: `POST /v1/images/generations` (spec §6) over the image engines.

The engine batches concurrent requests of the same shape into one denoising loop; this route
validates, waits for the images while watching for the client to disconnect (which drops the
request's waiting images), and encodes them off the event loop.

Fields left out take the model's defaults (its native size, steps and guidance, the scheduler it
ships); what a model cannot serve (leanserve.models.image_model) is a 400 naming the parameter.
"""
from __future__ import annotations

import base64
import io
import time
import uuid

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image, features

from leanserve.models.image_params import ImageParamError, ImageParams
from leanserve.server.cancellation import with_cancellation
from leanserve.server.errors import APIError
from leanserve.server.engine.errors import ImageGenerationError, RequestAbortedError
from leanserve.server.json_body import JSONBodyRoute
from leanserve.server.offload import off_loop
from leanserve.server.openapi import error_responses
from leanserve.server.protocol import (
    ImageGenerationRequest,
    ImageObject,
    ImagesResponse,
)
from leanserve.server.routes import server_state

router = APIRouter(route_class=JSONBodyRoute)

# zlib level 1: a slightly noisy 1024x1024 image took 0.9 s at the default level 6 and 0.2 s at 1
# (one CPU core) for a 16% smaller file; 0.9 s is more than a few-step generator's whole call
PNG_COMPRESS_LEVEL = 1
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_images(images: list[np.ndarray], output_format: str, compression: int | None) -> list[str]:
    """uint8 HWC arrays -> base64 strings; `compression` is the jpeg/webp quality (OpenAI's default 100)."""
    encoded = []
    for image in images:
        buf = io.BytesIO()
        if output_format == "png":
            Image.fromarray(image).save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
        else:
            Image.fromarray(image).save(buf, PIL_FORMATS[output_format],
                                        quality=100 if compression is None else compression)
        encoded.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return encoded


@router.post("/v1/images/generations", responses={200: {"model": ImagesResponse}, **error_responses(404, 429)})
async def create_image(body: ImageGenerationRequest, request: Request) -> Response:
    state = server_state(request)
    arrival = request.state.arrival_time
    engine = state.engine(body.model, "image") if body.model else state.default_engine("image")
    if body.n > engine.config.max_queued_images:  # a 429 would invite retries that can never succeed
        raise APIError(400, f"n={body.n} images never fit the image queue ({engine.config.max_queued_images})", "n")
    if body.output_format == "webp" and not features.check("webp"):
        raise APIError(400, "output_format 'webp' is not available on this server (Pillow without WebP); "
                            "use png or jpeg", "output_format")
    width, height = body.requested_size()
    defaults = engine.defaults
    params = ImageParams(
        width=width if width is not None else defaults.width,
        height=height if height is not None else defaults.height,
        num_inference_steps=body.num_inference_steps if body.num_inference_steps is not None else defaults.steps,
        guidance_scale=body.guidance_scale if body.guidance_scale is not None else defaults.guidance,
        sampler=body.scheduler or body.sampler, negative_prompt=body.negative_prompt, seed=body.seed)
    return await with_cancellation(request, _generate(state, engine, body, params, arrival))


async def _generate(state, engine, body: ImageGenerationRequest, params: ImageParams, arrival: float) -> Response:
    try:
        out = await engine.generate(f"img-{uuid.uuid4().hex}", body.prompt, body.n, params, arrival)
    except ImageParamError as e:
        raise APIError(400, str(e), e.param) from e
    except RequestAbortedError as e:
        raise APIError(503, str(e)) from e
    except ImageGenerationError as e:
        raise APIError(500, str(e)) from e
    data = await off_loop(encode_images, out.images, body.output_format, body.output_compression)
    state.metrics.image_models[engine.model_name].observe_request(out, body.n, params.num_inference_steps)
    response = ImagesResponse(created=int(time.time()), data=[ImageObject(b64_json=b) for b in data])
    return JSONResponse(response.model_dump())
