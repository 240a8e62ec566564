class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the server answers 429 with Retry-After."""


class EngineDeadError(RuntimeError):
    """The engine loop died; the server answers 503 (health) and 500 for in-flight requests."""
