from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    token: str            # decoded text of this token alone
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), best first


@dataclass(slots=True)
class RequestTimes:
    """Engine-stamped monotonic times (time.monotonic()); the front end derives intervals."""
    arrival: float                  # when the front end received it (HTTP arrival)
    queued: float | None = None     # admitted to the waiting queue
    scheduled: float | None = None  # first scheduled (first prefill chunk)
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


@dataclass(slots=True)
class RequestOutput:
    """What one engine step produced for one request (a delta, not the cumulative text)."""
    request_id: str
    new_token_ids: list[int]
    new_text: str                     # detokenized delta; stop strings and incomplete UTF-8 held back
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    logprobs: list[TokenLogprob] | None = None  # one per new token when requested
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0        # prompt tokens served from the prefix cache
    num_output_tokens: int = 0        # cumulative
    token_times: list[float] = field(default_factory=list)  # monotonic time each new token was produced
    times: RequestTimes | None = None  # with the first token and at the end; None in between
    error: str | None = None


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float       # 0..1, fraction of KV blocks held by live requests
    num_kv_blocks: int
    block_size: int
    num_preemptions: int        # cumulative
    prefix_cache_queries: int   # cumulative, tokens
    prefix_cache_hits: int      # cumulative, tokens
    healthy: bool
    enable_prefix_caching: bool


@dataclass(slots=True)
class CoreOutput:
    """What one step produced for one request, in token ids; the core's finish reasons only
    ("stop" for EOS or a stop token id, "length", "abort")."""
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | None
    # per new token: (token id, its logprob, top [(id, logprob)] best first), when requested
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    token_times: list[float] = field(default_factory=list)
    times: RequestTimes | None = None  # with the first token and at the end; None in between

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
