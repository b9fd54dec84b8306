"""The client side: one way to build an HTTP client for internal calls, and to read JSON answers and errors.

internal_client: an httpx.Client for calls between hpcllm services (the gateway, controller, node agents, workers,
the admin CLIs). With [internal_http] TLS configured it verifies every server against the site's CA, never
against the public roots and never not at all.

request_json: one call for the CLIs that talk to hpcllm services (controller admin API, node agents). Both the
transport failure and an error answer become the caller's own HpcllmError, built from what went wrong, so each
CLI says in its own words which service is down or what it refused.
"""

from __future__ import annotations

import ssl
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Callable, Protocol
from urllib.parse import urlsplit

import httpx
from pydantic import AfterValidator

from hpcllm.config import InternalHttpConfig
from hpcllm.errors import ConfigError


def check_url(url: str, what: str) -> str:
    """`url` without its trailing / when it is an http(s) URL with a host, else a ConfigError naming `what`: a
    malformed URL must not read as a service that is down (or be retried forever)."""
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0  # .port raises ValueError: not a number, or above 65535
    except ValueError:  # also a malformed [IPv6] host
        parts, port_ok = None, False
    if not (port_ok and parts.scheme in ("http", "https") and parts.hostname):
        raise ConfigError(f"{what} {url!r} is not a URL like http://HOST:PORT")
    return url.rstrip("/")


def _http_url_value(url: str) -> str:
    try:
        check_url(url, "")
    except ConfigError as exc:  # a ValueError: pydantic names the field in front of it
        raise ValueError(str(exc).lstrip()) from None
    return url


# A wire field holding a URL another service will call: check_url's rule, answered as the field's 400.
HttpUrl = Annotated[str, AfterValidator(_http_url_value)]


@lru_cache(maxsize=8)
def _ca_context(ca_file: Path) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"internal_http.tls_ca_file {ca_file} cannot be used as a CA bundle ({exc}); give the "
                          f"site CA's certificate in PEM form") from None


def verify_of(http: InternalHttpConfig | None) -> ssl.SSLContext | bool:
    """What internal clients verify servers with: the site CA when TLS is configured (else httpx's default)."""
    if http is None or http.tls_ca_file is None:
        return True
    return _ca_context(Path(http.tls_ca_file))


def internal_client(http: InternalHttpConfig | None, *, headers: dict[str, str] | None = None,
                    base_url: str = "", timeout: httpx.Timeout | float = 10.0,
                    limits: httpx.Limits | None = None) -> httpx.Client:
    """An httpx.Client for calls to hpcllm services (TLS verified against the site CA when configured)."""
    return httpx.Client(base_url=base_url, headers=headers, timeout=timeout, verify=verify_of(http),
                        limits=limits or httpx.Limits(max_connections=100, max_keepalive_connections=20))


def json_object(resp: httpx.Response) -> dict:
    """The answer's JSON object, or {} when it is not one (an empty body, an HTML page from a proxy...)."""
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def error_of(resp: httpx.Response) -> tuple[dict, str]:
    """An error answer's OpenAI-shaped {"message", "code", ...} object (empty when absent) and its message (else the
    start of the body, else the HTTP reason)."""
    error = json_object(resp).get("error", {})
    error = error if isinstance(error, dict) else {}
    return error, error.get("message") or resp.text[:300] or resp.reason_phrase


def retry_after_s(resp: httpx.Response) -> float | None:
    """The answer's Retry-After in seconds; None without one (or one in the HTTP-date form no hpcllm service sends)."""
    try:
        seconds = float(resp.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


class Refused(Protocol):
    """request_json's `refused`: the error to raise on a 4xx/5xx answer, from its status, its OpenAI-shaped
    {"message", "code", ...} error object (empty when absent), its message and its Retry-After (retry_after_s)."""

    def __call__(self, status: int, error: dict, message: str, retry_after: float | None = None) -> Exception: ...


def request_json(http: httpx.Client, method: str, path: str, *,
                 unreachable: Callable[[httpx.HTTPError], Exception],
                 refused: Refused,
                 unexpected: Callable[[str], Exception], **kwargs) -> Any:
    """Send one request and return its JSON body ({} when it has none).

    unreachable(exc)                     -> the error to raise when the service cannot be reached
    refused(status, error_obj, message, retry_after)
                                         -> the error to raise on a 4xx/5xx answer (Refused)
    unexpected(what)                     -> the error to raise on a body that is not JSON: the URL leads to
                                            something else (a web server, a proxy's page), which must not pass
                                            for an empty answer
    """
    try:
        resp = http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise unreachable(exc) from None
    if resp.status_code >= 400:
        raise refused(resp.status_code, *error_of(resp), retry_after=retry_after_s(resp))
    if not resp.content:
        return {}
    try:
        return resp.json()
    except ValueError:
        raise unexpected(f"HTTP {resp.status_code} {resp.headers.get('content-type', 'without a content type')}, "
                         f"not JSON: {resp.text[:60]!r}") from None
