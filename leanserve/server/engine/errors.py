from leanserve.errors import UserError


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the server answers 429 with Retry-After."""


class EngineDeadError(RuntimeError):
    """The engine loop died; the server answers 503 (health) and 500 for in-flight requests."""


class RequestAbortedError(RuntimeError):
    """The image request was aborted because the server shut down before it finished."""


class ImageGenerationError(RuntimeError):
    """The pipeline call of the image request's batch raised; the image engine itself keeps serving."""


class InvalidRequestError(ValueError):
    """A request the engine cannot run (validation.py); the server answers 400 with `param`, the
    request field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


# errors a process raises at startup that its parent raises again as such (callers tell bad input
# from a bug by them): the engine core's to the API process, a tensor-parallel worker's to the core
STARTUP_ERRORS = (UserError, OSError, ValueError)


def startup_error_to_wire(e: BaseException) -> tuple[str | None, str]:
    """(class name if one of STARTUP_ERRORS else None, message); a bug keeps its type in the message."""
    kind = next((cls.__name__ for cls in STARTUP_ERRORS if isinstance(e, cls)), None)
    return kind, str(e) if kind else f"{type(e).__name__}: {e}"


def startup_error_from_wire(kind: str | None, text: str, who: str) -> Exception:
    """The error to raise for a child's startup_error_to_wire; `who` names the child in a bug's message."""
    if kind is None:
        return RuntimeError(f"{who} failed to start: {text}")
    return {cls.__name__: cls for cls in STARTUP_ERRORS}[kind](text)
