"""The OpenAPI schema of /openapi.json, made to describe what the server really answers.

FastAPI documents a 422 validation error the server never sends (it answers 400, as vLLM) and
knows nothing of the answers given before a route runs. Here every operation loses the 422 and
gains, in the OpenAI error envelope (protocol.ErrorResponse), the statuses of the front door:
401 (API keys, /v1/ only), 503 (draining or starting), 500 (an internal error), and for a JSON
body 400 (invalid body), 413 (too large) and 415 (not JSON). What a route itself can answer is
declared at the route with `error_responses`.

Token ids a served model cannot decode are outside the schema's bounds: the smallest served
vocabulary bounds /detokenize's tokens, so the schema promises only what every model accepts.
"""
from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from leanserve.server.protocol import ErrorResponse

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def error_responses(*statuses: int) -> dict[int, dict]:
    """`responses=` of a route: these statuses, each with the error envelope."""
    return {status: {"model": ErrorResponse, "description": HTTPStatus(status).phrase} for status in statuses}


def install_openapi(app: FastAPI, ops_paths: frozenset[str], api_keys: bool, vocab_sizes: list[int]) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _document_front_door(schema, ops_paths, api_keys)
            if vocab_sizes:
                _bound_token_ids(schema, min(vocab_sizes))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _document_front_door(schema: dict, ops_paths: frozenset[str], api_keys: bool) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in FASTAPI_VALIDATION_SCHEMAS:
        components.pop(name, None)
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error_schema.pop("$defs", {}))
    components["ErrorResponse"] = error_schema

    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            statuses = []
            if path not in ops_paths:
                statuses += [500, 503] + ([401] if api_keys and path.startswith("/v1/") else [])
            if "requestBody" in operation:
                statuses += [400, 413, 415]
            for status in statuses:
                responses.setdefault(str(status), {"description": HTTPStatus(status).phrase,
                                                   "content": {"application/json": {"schema": ERROR_REF}}})


def _bound_token_ids(schema: dict, vocab_size: int) -> None:
    tokens = schema["components"]["schemas"].get("DetokenizeRequest", {}).get("properties", {}).get("tokens")
    if tokens is not None:
        tokens["items"]["maximum"] = vocab_size - 1
