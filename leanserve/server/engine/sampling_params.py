from __future__ import annotations

from dataclasses import dataclass, field

# below this temperature sampling is greedy (vLLM's _SAMPLING_EPS): dividing logits by a
# temperature near 0 overflows them (1e-45 made NaN logits and sampled token 0)
GREEDY_TEMPERATURE = 1e-5


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling settings of ONE sequence (the server fans `n` out into n requests).

    Semantics follow vLLM: temperature < 1e-5 = greedy; top_k <= 0 and min_p = 0 are off;
    repetition_penalty divides positive / multiplies negative logits of tokens seen in prompt
    or output; presence/frequency penalties count output tokens only.
    """
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)        # not included in the output text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None        # None = off; k >= 0 = sampled token's logprob + top-k
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
