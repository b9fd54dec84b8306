"""Who may call what: the one credential check of every hpcllm service.

A Credential looks at a request and returns quietly when its credentials suffice, or raises Unauthorized saying
what is missing. Services attach one to a blueprint (guard: every route of it) or to a single view (requires).
Policies (the cluster's shared secret, the admin key, per-allocation or pool tokens) are Credential classes; the
views do not change when a policy does. Comparisons are constant-time.
"""

from __future__ import annotations

import functools
import hmac
from typing import Callable, Protocol

from flask import Blueprint, Request, request

from hpcllm.httpkit.errors import Unauthorized

# The header internal calls carry the cluster's shared secret in (controller, node agents, workers).
SECRET_HEADER = "X-Hpcllm-Secret"


class Credential(Protocol):
    def check(self, request: Request) -> None:
        """Return when the request may proceed; raise Unauthorized (or a subclass) otherwise.

        It runs after routing, so request.view_args (e.g. the node_id a heartbeat is for) is there to check a
        token's scope against; a check that learns who is calling may record it in flask.g for the view."""


def same(given: str, expected: str) -> bool:
    """given == expected in constant time; an empty expected value matches nothing (an unset secret opens nothing)."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def bearer_token(req: Request) -> str | None:
    """The token of 'Authorization: Bearer TOKEN' (scheme case-insensitive), else None."""
    scheme, _, token = req.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class SharedSecret:
    """The cluster's shared secret in X-Hpcllm-Secret (internal calls between hpcllm services)."""

    def __init__(self, secret: str):
        self.secret = secret

    def check(self, req: Request) -> None:
        if not same(req.headers.get(SECRET_HEADER, ""), self.secret):
            raise Unauthorized(f"missing or wrong {SECRET_HEADER} header")


class BearerKey:
    """One key as 'Authorization: Bearer KEY' (the controller's admin API); key None: that API is closed."""

    def __init__(self, key: str | None, *, what: str = "key", disabled: str = "this API is disabled"):
        self.key, self.what, self.disabled = key, what, disabled

    def check(self, req: Request) -> None:
        if self.key is None:
            raise Unauthorized(self.disabled)
        token = bearer_token(req) or ""
        if not same(token, self.key):
            raise Unauthorized(f"missing or wrong {self.what} (Authorization: Bearer KEY)")


def secret_headers(secret: str) -> dict[str, str]:
    """The headers an internal call carries (the client side of SharedSecret)."""
    return {SECRET_HEADER: secret}


def guard(blueprint: Blueprint, credential: Credential) -> Blueprint:
    """Every route of the blueprint needs the credential (checked before the view runs)."""
    blueprint.before_request(lambda: credential.check(request))
    return blueprint


def requires(credential: Credential) -> Callable:
    """Decorator: this view needs the credential."""

    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def checked(*args, **kwargs):
            credential.check(request)
            return view(*args, **kwargs)

        return checked

    return decorate
