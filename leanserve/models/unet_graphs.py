"""CUDA graphs for a denoiser's forward (a diffusers UNet, or any module called the same way).

A small UNet at a small image size is bound by Python and kernel launches, not by the GPU: a denoising step of
the 6M-parameter shapes UNets at 32x32 took 23-29 ms on an H200 whether it ran 64 or 128 UNet rows (64 images,
with and without guidance; BENCHMARKS.md, serving images). Replaying a captured graph removes that host work.
`graph_forward` swaps a module's forward for a `GraphedForward`, which captures one graph per input signature
(shapes, dtypes, non-tensor arguments) and replays it after copying the call's tensors into the graph's static
inputs. The batch is padded up to a bucket (BUCKETS, capped by `max_batch`) so that a server's varying batches
share a few dozen graphs: a UNet treats every sample on its own (group norm, attention within a sample), so
the padding rows never touch the real ones, and they hold the inputs of an earlier call (finite) or zeros.

Falls back to the eager forward, never to a wrong answer, for what a graph cannot replay: autograd,
Python-number arguments (a graph would bake the first call's value in), outputs other than tensors, a
forward whose capture fails (a host sync inside it, say).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

# vLLM's spacing, coarser past 64: a padded row costs GPU time where the GPU is the bottleneck (big batches)
BUCKETS = (1, 2, 4, *range(8, 65, 8), *range(80, 129, 16), *range(160, 257, 32), *range(320, 513, 64))


def padded_batch(n: int, max_batch: int) -> int:
    """The batch a call of n rows runs at: the smallest bucket >= n, unless that passes max_batch (the
    memory the caller sized for), where max_batch itself, and n above it as it is."""
    if n >= max_batch:
        return n
    return min(next((b for b in BUCKETS if b >= n), max_batch), max_batch)


def _leaves(args: tuple, kwargs: dict) -> list[tuple[tuple, object]]:
    """(path, value) of every argument, one level into dicts (SDXL's added_cond_kwargs)."""
    items = [((i,), a) for i, a in enumerate(args)] + [((k,), v) for k, v in sorted(kwargs.items())]
    out = []
    for path, value in items:
        if isinstance(value, dict):
            out += [(path + (k,), v) for k, v in sorted(value.items())]
        else:
            out.append((path, value))
    return out


def _rebuild(args: tuple, kwargs: dict, values: dict[tuple, object]) -> tuple[tuple, dict]:
    """args and kwargs with the leaves at `values`' paths replaced."""
    def sub(path, value):
        if isinstance(value, dict):
            return {k: values.get(path + (k,), v) for k, v in value.items()}
        return values.get(path, value)
    return (tuple(sub((i,), a) for i, a in enumerate(args)),
            {k: sub((k,), v) for k, v in kwargs.items()})


@dataclass
class _Graph:
    replay: Callable[[], None]
    inputs: dict[tuple, torch.Tensor]  # path -> static input tensor
    outputs: tuple[torch.Tensor, ...]  # static outputs, rewritten by every replay
    single: bool                       # the forward returns one tensor, not a tuple


class GraphedForward:
    """A module's forward that replays CUDA graphs (see the module docstring). At most `max_graphs`
    graphs are kept (least recently used dropped); they share one memory pool, which is safe because
    they never run at the same time."""

    def __init__(self, forward, max_batch: int, max_graphs: int = 32):
        self.eager = forward
        self.max_batch = max_batch
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.uncapturable: set[tuple] = set()
        self._pool = None
        self.replays = 0  # calls answered by a graph (tests and logs)

    def __call__(self, *args, **kwargs):
        leaves = _leaves(args, kwargs)
        tensors = [(p, v) for p, v in leaves if isinstance(v, torch.Tensor)]
        # a Python number would be baked into the graph at its first value
        if (torch.is_grad_enabled() or not tensors or not self.capturable(tensors)
                or not all(isinstance(v, (torch.Tensor, bool, str, type(None))) for _, v in leaves)):
            return self.eager(*args, **kwargs)
        n = tensors[0][1].shape[0] if tensors[0][1].dim() else 1  # the sample's batch
        batched = {p for p, v in tensors if v.dim() and v.shape[0] == n}
        size = padded_batch(n, self.max_batch)
        key = (size, tuple((p, (size,) + tuple(v.shape[1:]) if p in batched else tuple(v.shape), v.dtype, v.device)
                           if isinstance(v, torch.Tensor) else (p, v) for p, v in leaves))
        if key in self.uncapturable:
            return self.eager(*args, **kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(args, kwargs, tensors, batched, size)
            if entry is None:
                self.uncapturable.add(key)
                return self.eager(*args, **kwargs)
            self.graphs[key] = entry
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        for p, v in tensors:
            (entry.inputs[p][:n] if p in batched else entry.inputs[p]).copy_(v)
        entry.replay()
        self.replays += 1
        # copies: the next replay overwrites the static outputs, and a scheduler may keep an output
        out = tuple(o[:n].clone() for o in entry.outputs)
        return out[0] if entry.single else out

    @staticmethod
    def capturable(tensors: list[tuple[tuple, torch.Tensor]]) -> bool:
        return all(v.is_cuda for _, v in tensors)

    def _capture(self, args, kwargs, tensors, batched, size) -> _Graph | None:
        inputs = {}
        for p, v in tensors:
            if p in batched:
                static = torch.zeros((size,) + tuple(v.shape[1:]), dtype=v.dtype, device=v.device)
                static[:v.shape[0]] = v
            else:
                static = v.clone()
            inputs[p] = static
        static_args, static_kwargs = _rebuild(args, kwargs, inputs)
        try:
            recorded = self.record(static_args, static_kwargs)
        except RuntimeError as e:  # e.g. a host sync inside the forward, which a capture cannot hold
            logger.warning("CUDA graphs off for this call signature: capturing %s failed (%s); it runs eagerly",
                           getattr(self.eager, "__qualname__", "the forward"), str(e).splitlines()[0])
            return None
        if recorded is None:
            return None
        logger.info("captured a CUDA graph at batch %d (%d graphs)", size, len(self.graphs) + 1)
        replay, outputs = recorded
        return _Graph(replay, inputs, tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,),
                      isinstance(outputs, torch.Tensor))

    def record(self, args: tuple, kwargs: dict) -> tuple[Callable[[], None], object] | None:
        """Capture the forward over these static inputs: (replay, its static output: a tensor or a
        tuple of them), or None when the forward returns something else."""
        device = next(v for _, v in _leaves(args, kwargs) if isinstance(v, torch.Tensor)).device
        with torch.cuda.device(device):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up off the capture: cuDNN's autotuning, lazy allocations
                for _ in range(2):
                    out = self.eager(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(stream)
            if not returns_tensors(out):
                logger.warning("CUDA graphs off for this call: the forward returned %s, not tensors "
                               "(call it with return_dict=False)", type(out).__name__)
                return None
            graph = torch.cuda.CUDAGraph()
            # thread_local: the image engine's worker thread captures while others (HTTP, PNG encoding) run
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self.eager(*args, **kwargs)
        self._pool = graph.pool()

        def replay():  # on the graph's device, whichever is current in the calling thread
            with torch.cuda.device(device):
                graph.replay()
        return replay, out


def returns_tensors(out) -> bool:
    return isinstance(out, torch.Tensor) or (isinstance(out, (tuple, list)) and bool(out)
                                             and all(isinstance(o, torch.Tensor) for o in out))


def graph_forward(module: nn.Module, max_batch: int, max_graphs: int = 32) -> GraphedForward:
    """Make `module(...)` replay CUDA graphs (module hooks still run around it); returns the wrapper."""
    if isinstance(module.forward, GraphedForward):
        return module.forward
    wrapper = GraphedForward(module.forward, max_batch, max_graphs)
    module.forward = wrapper  # an instance attribute: nn.Module.__call__ looks up self.forward
    return wrapper
