"""One request's state inside the engine (vLLM's `Request`, nano-vllm's `Sequence`)."""
from __future__ import annotations

import enum

import torch

from leanserve.server.engine.outputs import RequestTimes
from leanserve.server.engine.sampling_params import SamplingParams


# a sampled token the host has not read yet (async scheduling): the next step reads its id on the device
PLACEHOLDER = -1


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """Token ids are prompt + generated; the first `num_computed_tokens` of them have K/V in the
    cache. A sequence samples its next token in the step where num_computed_tokens reaches
    num_tokens, so a decoding sequence always has exactly its last sampled token left to compute."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float, eos_token_ids: list[int], generator: torch.Generator | None = None):
        self.request_id = request_id
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0       # prompt tokens served from the prefix cache at first admission
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of the leading full blocks, grown lazily
        self.num_cached_blocks = 0           # leading blocks of block_table already offered to the prefix cache
        self.generator = generator       # own RNG when params.seed is set; else the engine's is used
        # which of the model's num_variants weight sets this sequence runs through (EngineCore
        # draws it at admission; always 0 for a model with one)
        self.variant = 0
        # min_tokens masks every id that would end the sequence
        self.stop_token_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.eos_token_ids = frozenset(eos_token_ids)
        self.times = RequestTimes(arrival=arrival_time)
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        # async scheduling: trailing PLACEHOLDER tokens (at most the two steps in flight), and whether the
        # last of them ends the sequence by length, so that it is not scheduled again
        self.num_pending_tokens = 0
        self.awaiting_final = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def planned_len(self) -> int:
        """The most tokens this request can reach, prompt + max_tokens (validation keeps it within
        max_model_len): what a KV cache sized once per request at admission is sized for."""
        return self.num_prompt_tokens + self.params.max_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")
