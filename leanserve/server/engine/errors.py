class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the server answers 429 with Retry-After."""


class EngineDeadError(RuntimeError):
    """The engine loop died; the server answers 503 (health) and 500 for in-flight requests."""


class InvalidRequestError(ValueError):
    """A request the engine cannot run (validation.py); the server answers 400 with `param`, the
    request field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param
