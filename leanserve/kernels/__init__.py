import functools

import torch


@functools.cache  # a device query per kernel launch would sit on the decode hot path
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device: kernels size their split grids by it."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter has no SMs; an H100's count keeps its split choices like the GPU's
