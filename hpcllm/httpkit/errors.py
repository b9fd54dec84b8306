"""One error shape for every hpcllm HTTP service: {"error": {"message", "type", "param", "code"}} (OpenAI's).

ServiceError is the base of every error a service answers with: its class says the HTTP status, the OpenAI error
`type` and a stable `code`; an instance adds the message, the offending parameter and, for "retry later" answers,
Retry-After. install_error_handlers makes a Flask app answer every failure in that shape - its own ServiceErrors,
werkzeug's HTTP errors (404, 405, 413...) and unexpected exceptions (logged with their traceback) - never an HTML
page. The gateway, controller, node agent and worker all render through error_body.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

from flask import Flask, g, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from hpcllm.errors import HpcllmError

log = logging.getLogger(__name__)


def error_body(message: str, code: str | None, error_type: str = "invalid_request_error",
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class ServiceError(HpcllmError):
    """An error a service answers with; subclasses set http_status, error_type and code."""

    http_status = 500
    error_type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, param: str | None = None, *, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict:
        return error_body(self.message, self.code, self.error_type, self.param)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class InvalidRequest(ServiceError):
    """400: the body is not JSON, not an object, or fails validation (the message names the field)."""

    http_status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(ServiceError):
    http_status = 401
    error_type = "authentication_error"
    code = "unauthorized"


class ServiceUnavailable(ServiceError):
    http_status = 503
    error_type = "server_error"
    code = "service_unavailable"


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """Every problem pydantic found, as 'field: what is wrong; ...', and the first bad field (the `param`)."""
    errors = exc.errors()
    message = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in errors)
    first = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
    return message, first or None


def respond(exc: ServiceError):
    resp = jsonify(exc.body())
    resp.status_code = exc.http_status
    resp.headers.update(exc.headers())
    return resp


def code_of_reason(reason: str) -> str:
    """An error code from an HTTP reason phrase ('Request-URI Too Long': request_uri_too_long), for errors whose
    status comes from elsewhere (werkzeug's, cheroot's)."""
    return reason.lower().replace("-", " ").replace(" ", "_")


def service_error(status: int, message: str, code: str | None, param: str | None = None) -> ServiceError:
    """A ServiceError whose status is known only at run time (werkzeug's, another error family's); its type says
    who is at fault: the caller below 500, the service from 500."""
    error = ServiceError(message, param, code=code)
    error.http_status = status
    error.error_type = "invalid_request_error" if status < 500 else "server_error"
    return error


class RequestTooLarge(ServiceError):
    http_status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"

    @classmethod
    def over(cls, limit: int | None) -> RequestTooLarge:
        return cls(f"the request body is larger than the {limit} bytes this server accepts")


def from_http_exception(exc: HTTPException) -> ServiceError:
    """werkzeug's HTTP errors as ServiceErrors with the same status; an unknown path or method, and a body over the
    limit, in words that name what was asked (every service's, the gateway's included)."""
    if exc.code == 404:
        return service_error(404, f"no such endpoint: {request.method} {request.path}", "unknown_url")
    if exc.code == 405:
        allowed = ", ".join(sorted(getattr(exc, "valid_methods", None) or ()))
        return service_error(405, f"{request.method} is not allowed on {request.path}"
                                  + (f" (allowed: {allowed})" if allowed else ""), "method_not_allowed")
    if exc.code == 413:
        return RequestTooLarge.over(request.max_content_length)
    return service_error(exc.code or 500, exc.description or exc.name, code_of_reason(exc.name))


def unexpected_error(exc: Exception) -> ServiceError:
    """An exception nobody expected: 500, with its type and message (internal services answer other services)."""
    return ServiceError(f"internal error: {type(exc).__name__}: {exc}")


def install_error_handlers(app: Flask, *,
                           http_error: Callable[[HTTPException], ServiceError] = from_http_exception,
                           unexpected: Callable[[Exception], ServiceError] = unexpected_error,
                           on_error: Callable[[ServiceError], None] | None = None) -> None:
    """Answer ServiceErrors, werkzeug's HTTP errors and unexpected exceptions in the one error shape.

    http_error / unexpected turn the latter two into ServiceErrors (the gateway words them for API users);
    on_error sees every ServiceError before it is answered (the gateway logs its 5xx)."""

    @app.errorhandler(ServiceError)
    def _service_error(exc: ServiceError):
        if on_error is not None:
            on_error(exc)
        return respond(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return respond(http_error(exc))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unexpected error on %s %s (request id %s)", request.method, request.path,
                      g.get("request_id", "-"))
        return respond(unexpected(exc))
