"""Cross-cutting request handling: request ids, draining, authentication, request limits, errors.

Order for every request: request id -> open paths (/health, /ready, /metrics) pass -> 503 while draining ->
/v1/admin/* needs the admin key -> other /v1/* need an API key (no keys configured: closed, except on a dev cluster),
and those that use a model (routes marked @uses_model) take one token from that key's request bucket. Every error,
expected or not, leaves in OpenAI's error shape with the request id in `X-Request-Id`; an unexpected exception is
logged with its traceback and answered with a plain 500.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

from flask import Flask, g, request
from gunicorn.http.errors import NoMoreData, ParseException
from werkzeug.exceptions import HTTPException

from hpcllm.config import ApiKey
from hpcllm.gateway import errors
from hpcllm.gateway.admin.router import LORA_ADMIN_PATHS
from hpcllm.gateway.ratelimit import counts_as_request
from hpcllm.gateway.runtime import Gateway
from hpcllm.httpkit.auth import bearer_token
from hpcllm.httpkit.errors import ServiceError, from_http_exception, install_error_handlers, respond

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
# Outside /v1 but a user's API like /v1/* (vLLM serves them at the root): an API key is needed.
USER_PATHS = frozenset({"/tokenize", "/detokenize", "/tokenizer_info", "/score", "/rerank", "/v2/rerank",
                        "/classify"})
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
DRAIN_RETRY_AFTER_S = 5
# What gunicorn raises while a view reads a body it cannot: malformed chunked framing (a ParseException), a
# connection that ended before the body did (NoMoreData). The client's mistake, not an unexpected 500.
UNREADABLE_BODY = (ParseException, NoMoreData)


def _request_id() -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if REQUEST_ID_RE.match(given) else uuid.uuid4().hex


def _matching_key(token: str, keys: dict[str, ApiKey]) -> ApiKey | None:
    found = None
    for candidate, key in keys.items():  # compare against all, in constant time each: no timing oracle
        if hmac.compare_digest(candidate.encode(), token.encode()):
            found = key
    return found


def _key_hint(token: str) -> str:
    """Enough of a wrong key for its owner to recognise it (OpenAI's form), never the whole key.

    HTTP headers reach us decoded as Latin-1, so a key typed with non-ASCII characters would be echoed garbled;
    API keys are ASCII, and the answer says so instead."""
    if not (token.isascii() and token.isprintable()):
        return "the key has characters other than printable ASCII, which no API key has (check how it was copied)"
    return f"{token[:3]}...{token[-2:]}"


def _authenticate_user(gw: Gateway, uses_model: bool) -> None:
    g.api_key = None
    if not gw.api_keys:
        if gw.config.cluster.dev:
            return  # a development cluster may run an open API (warned at start)
        raise errors.AuthenticationFailed(
            "this gateway has no API keys (gateway.api_keys is empty), so /v1 is closed; ask its operator",
            code="no_api_keys")
    token = bearer_token(request)
    if token is None:
        raise errors.AuthenticationFailed(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.", code="missing_api_key")
    key = _matching_key(token, gw.api_keys)
    if key is None:
        raise errors.AuthenticationFailed(f"Incorrect API key provided: {_key_hint(token)}")
    g.api_key = key
    if uses_model:  # reads and management (a batch's progress, files, status) stay open while model requests wait
        gw.limiter.take_request(key)


def _authenticate_admin(gw: Gateway) -> None:
    admin_key = gw.config.gateway.admin_key
    if not admin_key:
        raise errors.AuthenticationFailed("the admin API is disabled on this gateway (gateway.admin_key is not set)",
                                          code="admin_disabled")
    token = bearer_token(request)
    if token is None or not hmac.compare_digest(token.encode(), admin_key.encode()):
        raise errors.AuthenticationFailed("admin endpoints need the admin key as 'Authorization: Bearer ADMIN_KEY'",
                                          code="invalid_admin_key")


def _from_http_exception(exc: HTTPException) -> ServiceError:
    if exc.code in (404, 405, 413):  # worded as every hpcllm service words them
        return from_http_exception(exc)
    if exc.code is not None and 400 <= exc.code < 500:
        error = errors.InvalidRequest(exc.description or exc.name)
        error.http_status = exc.code
        return error
    return errors.InternalError(exc.description or exc.name)


def _close_after_response() -> None:
    """Has gunicorn answer with Connection: close and close the connection after this response: where a broken
    body ends, and so where a next request would start, is unknown. gunicorn drops a Connection header an app sets;
    it closes when its request says so (must_close), reachable from a chunked body's reader (a body with a
    Content-Length only fails when the connection has ended anyway)."""
    gunicorn_request = getattr(getattr(request.environ.get("wsgi.input"), "reader", None), "req", None)
    if gunicorn_request is not None:
        gunicorn_request.must_close = True


def install(app: Flask, gw: Gateway) -> None:
    @app.before_request
    def begin() -> None:
        g.arrived = time.monotonic()
        g.request_id = _request_id()
        path = request.path
        if path in OPEN_PATHS:
            return
        if gw.draining:
            raise errors.ServiceUnavailable("the gateway is draining (shutting down); retry on another instance",
                                            code="draining", retry_after=DRAIN_RETRY_AFTER_S)
        # Counted until the response (a stream: its last byte) is sent, so a drain knows when it may stop.
        gw.request_started()
        g.counted_in_flight = True
        if path.startswith("/v1/admin/") or path in LORA_ADMIN_PATHS:
            _authenticate_admin(gw)
        elif path.startswith("/v1/") or path in USER_PATHS:
            _authenticate_user(gw, counts_as_request(app.view_functions.get(request.endpoint)))

    @app.after_request
    def finish(response):
        response.headers["X-Request-Id"] = g.get("request_id", "")
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        gw.metrics.http_requests.labels(endpoint, str(response.status_code)).inc()
        if g.pop("counted_in_flight", False):
            response.call_on_close(gw.request_finished)
        return response

    def unreadable_body(exc: Exception):
        _close_after_response()
        return respond(errors.InvalidRequest(
            "the request body cannot be read: its chunked transfer encoding is malformed, or the connection ended "
            "before the body did", code="unreadable_body"))

    for body_error in UNREADABLE_BODY:
        app.register_error_handler(body_error, unreadable_body)

    def log_server_errors(exc) -> None:
        if exc.http_status >= 500:
            log.warning("request %s: %s %s", g.get("request_id"), exc.http_status, exc.message)

    install_error_handlers(
        app, http_error=_from_http_exception, on_error=log_server_errors,
        unexpected=lambda exc: errors.InternalError(
            "internal server error; " + errors.see_the_log(g.get("request_id", "?"))))
