"""JSON over HTTP for every hpcllm service and CLI.

parse_json_body: the one way a service reads a JSON request body (gateway, controller, node agent; the worker's
pydantic model_validate_json uses the same parser). It nests at most 200 levels and never recurses in Python, so
a deeply nested body is a clear 400, not a RecursionError, a 500 and a traceback in the log.

request_json: one call for the CLIs that talk to hpcllm services (controller admin API, node agents). Both the
transport failure and an error answer become the caller's own HpcllmError, built from what went wrong, so each
CLI says in its own words which service is down or what it refused.
"""

from __future__ import annotations

from typing import Any, Callable

import httpx
import pydantic_core


def parse_json_body(raw: bytes) -> Any:
    """The request body's JSON value; ValueError with a message for the client when it is not JSON (recursion limit
    exceeded: nested deeper than 200 arrays/objects)."""
    try:
        return pydantic_core.from_json(raw)
    except ValueError as exc:
        nested = " (JSON nested deeper than 200 levels)" if "recursion limit" in str(exc) else ""
        raise ValueError(f"the request body is not valid JSON: {exc}{nested}") from None


def request_json(http: httpx.Client, method: str, path: str, *,
                 unreachable: Callable[[httpx.HTTPError], Exception],
                 refused: Callable[[int, dict, str], Exception], **kwargs) -> dict:
    """Send one request and return its JSON body.

    unreachable(exc)                     -> the error to raise when the service cannot be reached
    refused(status, error_obj, message)  -> the error to raise on a 4xx/5xx answer; error_obj is the
                                            OpenAI-shaped {"message", "code", ...} (empty when absent)
    """
    try:
        resp = http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise unreachable(exc) from None
    if resp.status_code >= 400:
        raise refused(resp.status_code, *error_of(resp))
    try:
        return resp.json()
    except ValueError:
        return {}


def error_of(resp: httpx.Response) -> tuple[dict, str]:
    """An error answer's OpenAI-shaped {"message", "code", ...} object (empty when absent) and its message (else the
    start of the body, else the HTTP reason)."""
    try:
        body = resp.json()
    except ValueError:
        body = {}
    error = body.get("error", {}) if isinstance(body, dict) else {}
    error = error if isinstance(error, dict) else {}
    return error, error.get("message") or resp.text[:300] or resp.reason_phrase
