"""The OpenAI/vLLM error envelope and the exception handlers that produce it.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}` with
code = HTTP status (protocol.ErrorResponse), including FastAPI's validation errors (400 instead of
422, as vLLM does) and Starlette's unknown-route 404s and 405s, so clients can always parse the
body. An unexpected exception is answered 500 by the front door middleware (app.py), which keeps
the connection open; a handler registered here for Exception would close it.
"""
from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from leanserve.server.engine.errors import EngineDeadError, InvalidRequestError, QueueFullError

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
RETRY_AFTER_S = 1  # clients (and the openai SDK) back off this long after a 429


class APIError(Exception):
    """An error with an HTTP status; raised anywhere in a handler, answered in the envelope."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None) -> dict:
    type_ = ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def _describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    messages, first_param = [], None
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        if not loc and err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            messages.append("Request body must be a JSON object")
            continue
        # pydantic prefixes messages of ValueErrors raised in validators; ours are complete sentences
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        param = ".".join(loc) or None
        first_param = first_param or param
        messages.append(f"{param}: {msg}" if param else msg)
    return "; ".join(messages) or "Invalid request", first_param


def _allowed_methods(request: Request) -> list[str]:
    """The methods the OpenAPI schema lists for the request's path: what a client may send there."""
    methods = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if compile_path(template)[0].match(request.url.path):
            methods |= {m.upper() for m in operations}
    return sorted(methods)


def install_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = _describe_validation_error(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        headers = exc.headers
        if exc.status_code == 404:
            message = f"Route {request.method} {request.url.path} not found"
        else:
            message = str(exc.detail) if exc.detail else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 405:
            # Starlette's Allow names the methods of the first route of the path; routers split some
            # paths' methods over several routes (GET /v1/models in one, POST in another)
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return error_response(exc.status_code, message, headers=headers)

    @app.exception_handler(InvalidRequestError)
    async def _invalid_request(request: Request, exc: InvalidRequestError):
        return error_response(400, str(exc), exc.param)

    @app.exception_handler(QueueFullError)
    async def _queue_full(request: Request, exc: QueueFullError):
        return error_response(429, f"Server is overloaded: {exc}" if str(exc) else "Server is overloaded",
                              headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError):
        return error_response(500, f"Engine is dead: {exc}" if str(exc) else "Engine is dead")
