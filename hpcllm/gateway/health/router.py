"""Open (unauthenticated, as in vLLM) probes: /health (liveness), /ready (can serve now), /metrics."""

from __future__ import annotations

from flask import Blueprint, Response

from hpcllm.gateway.errors import ServiceUnavailable
from hpcllm.gateway.runtime import current_gateway

bp = Blueprint("health", __name__)


@bp.get("/health")
def health():
    # The process answers: it is alive. Draining is not death: running streams are still being served.
    return {"status": "ok"}


@bp.get("/ready")
def ready():
    gw = current_gateway()
    if gw.draining:
        raise ServiceUnavailable("the gateway is draining (shutting down)", code="draining", retry_after=5)
    reason = gw.router.check_ready()
    if reason is not None:
        raise ServiceUnavailable(f"not ready: {reason}", code="not_ready", retry_after=5)
    return {"status": "ready"}


@bp.get("/metrics")
def metrics():
    body, content_type = current_gateway().metrics.render()
    return Response(body, content_type=content_type)
