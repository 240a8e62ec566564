from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ServerSettings:
    """HTTP front-end settings; engine settings live in EngineConfig, one per model."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)  # Bearer keys guarding /v1/*; empty = no auth
    shutdown_timeout: float = 5.0       # seconds in-flight requests may drain after SIGTERM; 0 aborts at once
    max_body_bytes: int = 2 * 1024 * 1024  # TGI's payload limit; larger bodies get 413
    log_stats_interval: float = 5.0     # seconds between one-line throughput summaries; 0 = off
    log_level: str = "info"
    jobs_dir: str | None = None         # the jobs API's workspace (`leanserve serve` defaults to ./jobs); None = off
    max_queued_jobs: int = 16           # more waiting jobs get 429
    gpu_jobs: int = 1                   # jobs running at once on the GPU
    cpu_jobs: int = 1                   # and, counted separately, on the CPU
