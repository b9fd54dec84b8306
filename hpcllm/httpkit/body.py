"""Reading a JSON request body: the one parser of every hpcllm service.

parse_json_body uses pydantic-core's parser: it nests at most 200 levels and never recurses in Python, so a deeply
nested body is a clear 400, not a RecursionError, a 500 and a traceback in the log. Its size is bounded before it
is read: each app's MAX_CONTENT_LENGTH (413 request_too_large), set by hpcllm.httpkit.app.service_app; a chunked
body (no declared length) is a 413 too when more follows the limit (request_bytes).
"""

from __future__ import annotations

from typing import Any, TypeVar

import pydantic_core
from flask import request
from pydantic import BaseModel, ValidationError

from hpcllm.httpkit.errors import InvalidRequest, RequestTooLarge, validation_message

M = TypeVar("M", bound=BaseModel)


def parse_json_body(raw: bytes) -> Any:
    """The request body's JSON value; ValueError with a message for the client when it is not JSON (recursion limit
    exceeded: nested deeper than 200 arrays/objects)."""
    try:
        return pydantic_core.from_json(raw)
    except ValueError as exc:
        nested = " (JSON nested deeper than 200 levels)" if "recursion limit" in str(exc) else ""
        raise ValueError(f"the request body is not valid JSON: {exc}{nested}") from None


def request_bytes() -> bytes:
    """The current request's body. werkzeug refuses a declared length over the limit before reading, but cuts a
    chunked body at the limit without a word: more behind the cut is a 413, not a JSON error about cut-off text."""
    raw = request.get_data(cache=True)
    limit = request.max_content_length
    if limit is not None and request.content_length is None and len(raw) >= limit:
        if request.environ["wsgi.input"].read(1):
            raise RequestTooLarge.over(limit)
    return raw


def parse_body(model: type[M], raw: bytes | None = None) -> M:
    """The current request's body (or raw) as `model`: 400 invalid_json when it is not a JSON object, 400
    invalid_request naming the first bad field when it does not validate."""
    try:
        body = parse_json_body(request_bytes() if raw is None else raw)
    except ValueError as exc:
        raise InvalidRequest(str(exc), code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise InvalidRequest(message, param) from None
