"""Per-request API errors, each rendered in OpenAI's error shape.

Every way a request can fail has one class here with its HTTP status, OpenAI error `type` and a stable `code`,
so handlers raise a meaningful error and the HTTP kit (hpcllm.httpkit.errors, which every service shares) turns
it into `{"error": {"message", "type", "param", "code"}}`. Process-level trouble (draining, no capacity, a dead
worker) is kept apart from bad requests: those are 503s that say to retry, never 4xx that blame the caller.
"""

from __future__ import annotations

from hpcllm.httpkit.errors import ServiceError

# The codes of a write refused for the gateway's bounds (stored responses and conversations, files): what it stores
# in all, and what one API key may.
STORAGE_LIMIT_EXCEEDED = "storage_limit_exceeded"
STORAGE_QUOTA_EXCEEDED = "storage_quota_exceeded"


class ApiError(ServiceError):
    """An error of the OpenAI-compatible API (keyword-only param, as the gateway's handlers raise them)."""

    http_status = 500
    error_type = "internal_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message, param, code=code, retry_after=retry_after)


class InvalidRequest(ApiError):
    """400: malformed JSON, a missing required field, an unsupported parameter value, a prompt too long."""

    http_status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class InvalidValue(ApiError):
    """422: a field is present but has the wrong type or a value outside its allowed range."""

    http_status = 422
    error_type = "invalid_request_error"
    code = "invalid_value"


class AuthenticationFailed(ApiError):
    http_status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(ApiError):
    """A valid key that may not do this (OpenAI's 403 "permission_error")."""

    http_status = 403
    error_type = "permission_error"
    code = "permission_denied"


class NotFound(ApiError):
    http_status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str, known: list[str] | None = None):
        hint = f"; available models: {', '.join(sorted(known))}" if known else ""
        super().__init__(f"The model '{model}' does not exist{hint}", param="model")


class MethodNotAllowed(ApiError):
    http_status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class RateLimited(ApiError):
    http_status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ClientClosedRequest(ApiError):
    """The client went away before its (non-streaming) answer was ready: nobody reads this; nginx's 499."""

    http_status = 499
    error_type = "invalid_request_error"
    code = "client_closed_request"


class ServiceUnavailable(ApiError):
    """503: draining, no capacity, model still starting past the wait limit, worker or controller unreachable."""

    http_status = 503
    error_type = "service_unavailable"
    code = "service_unavailable"


class NotImplementedByDeployment(ApiError):
    http_status = 501
    error_type = "invalid_request_error"
    code = "not_available"


class InternalError(ApiError):
    http_status = 500
    error_type = "internal_error"
    code = "internal_error"


def see_the_log(request_id: str) -> str:
    """Where an internal failure's details are, for a client to quote (its message never carries them)."""
    return "see the gateway log for request " + request_id
