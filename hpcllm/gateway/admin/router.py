"""/v1/admin/*: deploy, undeploy and status, proxied to the controller; usage, answered by the gateway itself.
vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter (admin key too) go to the controller's
/v1/admin/(un)load_lora_adapter: a redeploy of the base model with the adapter added or removed.

Callers authenticate with the admin key (checked in middleware); the gateway forwards the call with the caller's
admin bearer header only - never the cluster secret - and relays the controller's status and body unchanged.

Only the controller's admin routes (ADMIN_ROUTES) are proxied, matched against the path as received: a path with
`..` (`/v1/admin/../internal/models`, `%2e%2e` decoded to the same) or any other route is a 404 here and never
becomes a URL, so the admin key cannot reach the controller's internal API.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import quote

import httpx
from flask import Blueprint, Response, request

from hpcllm.controller.agents import ONE_ADAPTER_REDEPLOY_SECONDS
from hpcllm.controller.protocol import MODEL_NAME_PATTERN
from hpcllm.gateway.errors import MethodNotAllowed, NotFound, NotImplementedByDeployment, ServiceUnavailable
from hpcllm.gateway.routing import ControllerRouter
from hpcllm.gateway.runtime import current_gateway

log = logging.getLogger(__name__)

bp = Blueprint("admin", __name__)

FORWARDED_HEADERS = ("Authorization", "Content-Type", "Accept", "X-Request-Id")
ADMIN_TIMEOUT_S = 120.0
# A POST (a deploy, vLLM's LoRA load and unload) redeploys: it answers once the model's instances applied its
# adapters. (A deploy changing several adapters at once may outlast it: `hpcllm status` shows what became of it.)
REDEPLOY_TIMEOUT_S = max(ADMIN_TIMEOUT_S, ONE_ADAPTER_REDEPLOY_SECONDS)
_MODEL_NAME = MODEL_NAME_PATTERN.removeprefix("^").removesuffix("$")
# The controller's admin API (hpcllm.controller.protocol): path after /v1/admin/ -> allowed methods.
ADMIN_ROUTES: tuple[tuple[re.Pattern, frozenset[str]], ...] = (
    (re.compile(r"status"), frozenset({"GET"})),
    (re.compile(r"models"), frozenset({"POST"})),
    (re.compile(rf"models/{_MODEL_NAME}"), frozenset({"DELETE"})),
    (re.compile(r"(load|unload)_lora_adapter"), frozenset({"POST"})),
)
# vLLM's dynamic LoRA endpoints, admin-only here (the middleware asks for the admin key): the controller's admin
# routes of the same names.
LORA_ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def _allowed_methods(rest: str) -> frozenset[str] | None:
    for pattern, methods in ADMIN_ROUTES:
        if pattern.fullmatch(rest):
            return methods
    return None


@bp.route("/v1/admin/usage", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def usage_report():
    """Requests and tokens per day, key, group or model (hpcllm.gateway.usage); a static gateway has them too."""
    if request.method != "GET":
        raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
    return current_gateway().usage.report(request.args)


def lora_adapter():
    return admin_proxy(request.path.removeprefix("/v1/"))


for _lora_path in LORA_ADMIN_PATHS:  # the paths the middleware asks the admin key for, and no other
    bp.add_url_rule(_lora_path, view_func=lora_adapter, methods=["POST"])


@bp.route("/v1/admin/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def admin_proxy(rest: str):
    gw = current_gateway()
    router = gw.router
    if not isinstance(router, ControllerRouter):
        raise NotImplementedByDeployment(
            "this gateway serves static models without a controller: there is no admin API to reach")
    methods = _allowed_methods(rest)
    if methods is None:
        raise NotFound(f"no such endpoint: {request.method} {request.path}", code="unknown_url")
    if request.method not in methods:
        raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
    headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
    upstream_request = gw.http.build_request(
        request.method, f"{router.controller_url}/v1/admin/{quote(rest)}", params=request.args,
        content=request.get_data(), headers=headers,
        timeout=REDEPLOY_TIMEOUT_S if request.method == "POST" else ADMIN_TIMEOUT_S)
    try:
        upstream = gw.http.send(upstream_request)
    except httpx.HTTPError as exc:
        raise ServiceUnavailable(f"the controller at {router.controller_url} is unreachable ({exc})",
                                 code="controller_unreachable", retry_after=5) from None
    relayed = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
    return Response(upstream.content, status=upstream.status_code, headers=relayed)
