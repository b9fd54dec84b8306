"""/v1/admin/*: deploy, undeploy, status and cache administration, proxied to the controller.

Callers authenticate with the admin key (checked in middleware); the gateway forwards the call with the
cluster secret and the caller's admin bearer header, and relays the controller's status and body unchanged.
"""

from __future__ import annotations

import logging

import httpx
from flask import Blueprint, Response, request

from hpcllm.gateway.errors import NotImplementedByDeployment, ServiceUnavailable
from hpcllm.gateway.routing import ControllerRouter
from hpcllm.gateway.runtime import current_gateway

log = logging.getLogger(__name__)

bp = Blueprint("admin", __name__)

FORWARDED_HEADERS = ("Authorization", "Content-Type", "Accept", "X-Request-Id")
ADMIN_TIMEOUT_S = 120.0


@bp.route("/v1/admin/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def admin_proxy(rest: str):
    gw = current_gateway()
    router = gw.router
    if not isinstance(router, ControllerRouter):
        raise NotImplementedByDeployment(
            "this gateway serves static models without a controller: there is no admin API to reach")
    headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
    url = f"{router.controller_url}/v1/admin/{rest}"
    try:
        upstream = gw.http.request(request.method, url, params=request.args, content=request.get_data(),
                                   headers=headers, timeout=ADMIN_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise ServiceUnavailable(f"the controller at {router.controller_url} is unreachable ({exc})",
                                 code="controller_unreachable", retry_after=5) from None
    relayed = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
    return Response(upstream.content, status=upstream.status_code, headers=relayed)
