"""JSON request bodies, checked in one place for every route that takes one: `JSONBodyRoute`.

FastAPI parses bodies with Python's json module as it is, which lets through what is not JSON
text or not Unicode: NaN/Infinity literals (and 1e999, read as inf), lone UTF-16 surrogates
("\\ud800", valid JSON but no character), and raw bytes that are not UTF-8. Passed on, they fail
deep in a handler (a tokenizer, the response's UTF-8 encoding) as a 500. Here they are a 400 that
names the field, before the handler runs; a non-JSON Content-Type is a 415.
"""
from __future__ import annotations

import json
import math
from decimal import Decimal
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from leanserve.server.errors import APIError


class JSONBodyRoute(APIRoute):
    """An APIRoute whose JSON body is checked (see the module docstring) before FastAPI reads it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked_handler(request: Request) -> Response:
            request = _CheckedJSONRequest(request.scope, request.receive)
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if not (content_type == "application/json" or content_type.endswith("+json")):
                raise APIError(415, f"Unsupported Content-Type {content_type or '(none)'!r}; send application/json")
            if await request.body():
                await request.json()  # parsed and checked once; FastAPI reads the cached value
            return await handler(request)

        return checked_handler


class _CheckedJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_checked_json"):
            self._checked_json = parse_json_body(await self.body())
        return self._checked_json


def parse_json_body(body: bytes) -> Any:
    """bytes -> JSON value; APIError 400 for anything that is not UTF-8 JSON text of Unicode strings
    and finite numbers."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"Request body is not valid UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text, parse_float=_parse_float)
    except ValueError as e:  # JSONDecodeError, or an integer of more digits than Python converts
        raise APIError(400, f"Invalid JSON body: {e}") from None
    except RecursionError:
        raise APIError(400, "Invalid JSON body: nested too deeply") from None
    if (problem := _first_invalid(value)) is not None:
        param, message = problem
        raise APIError(400, f"{param}: {message}" if param else f"Request body: {message}", param or None)
    return value


def _parse_float(literal: str) -> int | float:
    """A JSON number with a fraction or exponent. Integral ones become exact ints: JSON has one
    number type and JSON Schema's "integer" includes 1.0 (and 9223372036854775807.0, which a float
    would round up past the int64 bound)."""
    number = float(literal)
    if math.isfinite(number) and number.is_integer():
        return int(Decimal(literal))
    return number


def _first_invalid(value: Any) -> tuple[str, str] | None:
    """(dotted path, what is wrong) of the first string or number JSON cannot carry, or None.
    Iterative: a deeply nested body must not exhaust the stack here."""
    if (problem := _invalid_scalar(value)) is not None:
        return "", problem
    stack: list[tuple[tuple, Any]] = [((), value)] if isinstance(value, (dict, list)) else []
    while stack:
        path, container = stack.pop()
        if isinstance(container, dict):
            for key in container:
                if (bad := _lone_surrogate(key)) is not None:
                    return _dotted((*path, key.encode("utf-8", "backslashreplace").decode())), \
                        f"lone UTF-16 surrogate {bad!r} in a key is not valid Unicode text"
        for key, item in container.items() if isinstance(container, dict) else enumerate(container):
            if isinstance(item, (dict, list)):
                stack.append(((*path, key), item))
            elif (problem := _invalid_scalar(item)) is not None:
                return _dotted((*path, key)), problem
    return None


def _invalid_scalar(v: Any) -> str | None:
    if isinstance(v, str) and (bad := _lone_surrogate(v)) is not None:
        return f"lone UTF-16 surrogate {bad!r} is not valid Unicode text"
    if isinstance(v, float) and not math.isfinite(v):
        return f"{v} is not a JSON number (NaN and Infinity are not allowed)"
    return None


def _lone_surrogate(s: str) -> str | None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return s[e.start]
    return None


def _dotted(path: tuple) -> str:
    return ".".join(map(str, path))
