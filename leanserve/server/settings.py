from __future__ import annotations

from dataclasses import dataclass, field

# a token of a real tokenizer rarely spans more than a few characters; long runs of spaces or
# repeated punctuation can merge into tokens of 16+, so 32 leaves room without letting a body
# many times the context length reach the tokenizer
CHARS_PER_TOKEN_BOUND = 32
# the server's log lines; the engine core process logs the same way
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(slots=True)
class ServerSettings:
    """HTTP front-end settings; engine settings live in EngineConfig, one per model."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)  # Bearer keys guarding all but the ops routes; empty = no auth
    shutdown_timeout: float = 5.0       # seconds in-flight requests may drain after SIGTERM; 0 aborts at once
    max_body_bytes: int = 2 * 1024 * 1024  # TGI's payload limit; larger bodies get 413
    max_input_chars: int | None = None  # prompt/messages characters per request; None = max_model_len x 32
    log_stats_interval: float = 5.0     # seconds between one-line throughput summaries; 0 = off
    log_level: str = "info"
    jobs_dir: str | None = None         # the jobs API's workspace (`leanserve serve` defaults to ./jobs); None = off
    max_queued_jobs: int = 16           # more waiting jobs get 429
    gpu_jobs: int = 1                   # jobs running at once on the GPU
    cpu_jobs: int = 1                   # and, counted separately, on the CPU
    # connections (server/connections.py); uvicorn's own defaults where it has one
    limit_concurrency: int = 2048       # connections/requests served at once; beyond, requests get 503
    max_idle_connections: int = 256     # keep-alive connections kept between requests
    timeout_keep_alive: float = 5.0     # seconds a keep-alive connection may idle
    timeout_headers: float = 10.0       # seconds to send a request head, from connect or the last response
    timeout_body: float = 30.0          # seconds to send a request body, from its head
    timeout_write: float = 30.0         # seconds a client may leave a response unread before it is cut
    h11_max_incomplete_event_size: int = 16 * 1024  # request head bytes (h11's default)

    def input_chars_limit(self, max_model_len: int) -> int:
        return self.max_input_chars if self.max_input_chars is not None else max_model_len * CHARS_PER_TOKEN_BOUND
