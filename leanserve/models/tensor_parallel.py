"""Tensor parallelism (Megatron-LM's split, as vLLM and gpt-fast do it): this process's rank in the
tensor-parallel group, its collectives, and the sharded layers the Llama family is built from.

One process per device, all running the same model forward on the same step (SPMD):
- column-parallel linears (q/k/v, gate/up) keep 1/N of each projection's output rows, so each rank
  computes its own heads and its own slice of the MLP's hidden units with no communication;
- row-parallel linears (o_proj, down_proj) keep the matching 1/N of input columns and sum their
  partial outputs with one all-reduce (two per decoder layer);
- the embedding and LM head keep 1/N of the vocabulary rows (padded up to a multiple of N): the
  embedding sums the ranks' lookups (each rank owns a token or writes zeros), the head all-gathers
  the ranks' logits.
At size 1 every class here behaves exactly like the plain layer it subclasses, so one model
definition serves both. The rank and size are set once per process (set_tensor_parallel) before
the model is built, and the process group joined (join_process_group) before its first forward.

Weights load sharded: `load_weight(param, checkpoint, shard)` reads only this rank's rows or
columns from a safetensors slice (safe_open(...).get_slice), so no rank materialises a full tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from leanserve.errors import UserError
from leanserve.models.layers import MergedLinear

# a collective waits this long for its peers; a peer that died is found sooner by the engine's
# liveness checks, this is the backstop for anything that escapes them
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class TPState:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None  # set by join_process_group; None at size 1


_state = TPState()


def tp() -> TPState:
    return _state


def set_tensor_parallel(rank: int, size: int) -> None:
    """This process is `rank` of `size`: the layers built from now on hold its shards."""
    global _state
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} out of range for size {size}")
    _state = TPState(rank, size)


def join_process_group(store: dist.Store, device: torch.device) -> None:
    """Join the group of every rank (NCCL on CUDA, gloo on CPU) through a shared store."""
    global _state
    cuda = device.type == "cuda"
    # device_id: NCCL connects now, not inside the first forward (which may be a graph capture)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=_state.rank, world_size=_state.size,
                            timeout=COLLECTIVE_TIMEOUT, device_id=device if cuda else None)
    _state = TPState(_state.rank, _state.size, dist.group.WORLD)


def leave_process_group() -> None:
    global _state
    if dist.is_initialized():
        dist.destroy_process_group()
    _state = TPState()


def divide(total: int, what: str) -> int:
    """total / tp size, or a UserError naming what does not split."""
    size = _state.size
    if total % size:
        raise UserError(f"--tensor-parallel-size {size} must divide the model's {what} ({total})")
    return total // size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (a no-op at size 1)."""
    if _state.size > 1:
        dist.all_reduce(x, group=_state.group)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """[..., n] per rank -> [..., size * n], ranks in order along the last axis."""
    if _state.size == 1:
        return x
    # ranks concatenated along the first axis: the output layout every backend takes
    out = torch.empty((_state.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=_state.group)
    return out.view(_state.size, *x.shape).movedim(0, -2).flatten(-2)


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of every rank's value (each rank's KV-cache blocks: all must hold the same)."""
    if _state.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_state.group)
    return int(t.item())


def _rows(checkpoint, rows: int, dim: int) -> torch.Tensor:
    """This rank's `rows` consecutive entries along `dim` of a checkpoint slice (short at the end
    of a padded vocabulary)."""
    start = _state.rank * rows
    index = [slice(None)] * len(checkpoint.get_shape())
    index[dim] = slice(start, start + rows)
    return checkpoint[tuple(index)]


class ColumnParallelLinear(MergedLinear):
    """MergedLinear whose every projection keeps 1/N of its output rows: [q_r; k_r; v_r] on rank r,
    so a rank's q/k/v split is MergedLinear's with every size divided by N."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, what: str):
        super().__init__(input_size, [divide(s, what) for s in output_sizes], bias=bias)

    def load_weight(self, param: nn.Parameter, checkpoint, shard: int) -> None:
        rows = self.output_sizes[shard]
        _expect(checkpoint, (rows * _state.size, *param.shape[1:]))
        self.load_shard(param, _rows(checkpoint, rows, 0), shard)


class RowParallelLinear(nn.Linear):
    """nn.Linear keeping 1/N of the input columns; its partial outputs are summed over ranks, then
    the bias (held whole by every rank) added once."""

    def __init__(self, input_size: int, output_size: int, bias: bool, what: str):
        super().__init__(divide(input_size, what), output_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _state.size == 1:
            return super().forward(x)
        y = all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def load_weight(self, param: nn.Parameter, checkpoint, shard: int | None) -> None:
        if param is self.weight:
            _expect(checkpoint, (self.out_features, self.in_features * _state.size))
            param.copy_(_rows(checkpoint, self.in_features, 1))
        else:
            _expect(checkpoint, tuple(param.shape))
            param.copy_(checkpoint[:])


def vocab_shard(vocab_size: int) -> int:
    """Rows of the vocabulary each rank holds: ceil(V / N), the last rank's tail padding."""
    return -(-vocab_size // _state.size)


class VocabParallelEmbedding(nn.Embedding):
    """Rank r holds vocabulary rows [r*s, (r+1)*s), s = ceil(V / N); padding rows are zero. A token
    another rank owns looks up zeros here and the all-reduce sums in the owner's row. The LM head
    (tied or not) is this layout too: see gather_logits."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(vocab_shard(vocab_size), hidden_size)
        self.vocab_size = vocab_size

    def reset_parameters(self) -> None:
        """Nothing: the weights come from the checkpoint (or loader's random fill), and nn.Embedding's
        normal_ on the meta device imports torch._dynamo, 1.7 s of every engine start on CPU."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if _state.size == 1:
            return super().forward(ids)
        local = ids - _state.rank * self.num_embeddings
        foreign = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(foreign, 0), self.weight)
        return all_reduce(out.masked_fill_(foreign.unsqueeze(-1), 0))

    def load_weight(self, param: nn.Parameter, checkpoint, shard: int | None) -> None:
        _expect(checkpoint, (self.vocab_size, param.shape[1]))
        rows = _rows(checkpoint, param.shape[0], 0)
        param[:rows.shape[0]] = rows
        param[rows.shape[0]:] = 0


class ParallelLMHead(nn.Linear):
    """An untied LM head: [s, hidden] rows of the vocabulary like VocabParallelEmbedding's."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_shard(vocab_size), bias=False)
        self.vocab_size = vocab_size

    load_weight = VocabParallelEmbedding.load_weight


def gather_logits(local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Each rank's [T, s] vocabulary slice of the logits -> the full [T, vocab_size] on every rank."""
    return all_gather_last(local_logits)[:, :vocab_size]


def _expect(checkpoint, shape: tuple[int, ...]) -> None:
    """The whole checkpoint tensor has the model's (unsharded) shape."""
    if tuple(checkpoint.get_shape()) != tuple(shape):
        raise ValueError(f"checkpoint shape {tuple(checkpoint.get_shape())} != model shape {tuple(shape)}")
