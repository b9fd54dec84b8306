"""GET /status: a live page of models, nodes, tiers and caches, instances, allocations, cold starts, migrations.

The page itself is one static file (HTML, CSS and JS inline, no build step) and holds no data, so it is served
without a key. Its script asks for a key and polls:
- /v1/admin/status with the admin key (the admin proxy: the controller's whole status), or, when
- `gateway.status_page_users` is true, GET /v1/status with any API key: the same status without the internal
  addresses (agent and worker URLs) and credential ids, and without other groups' own model pools (their nodes,
  instances, failures and migrations), fetched by the gateway with the controller's admin key, at most once per
  STATUS_CACHE_S per gateway process: every poll within that period gets the same answer.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from importlib import resources

import httpx
from flask import Blueprint, Response, current_app, g

from hpcllm.config import admin_key_of
from hpcllm.gateway.errors import NotImplementedByDeployment, PermissionDenied, ServiceUnavailable
from hpcllm.gateway.routing import ControllerRouter
from hpcllm.gateway.runtime import Gateway, current_gateway

log = logging.getLogger(__name__)
bp = Blueprint("status", __name__)

STATUS_TIMEOUT_S = 30.0
# Each open status page polls /v1/status every 2 s: a gateway process asks the controller at most once per this many
# seconds, whatever the number of pages (they get the same answer), so a storm of tabs costs the controller nothing.
STATUS_CACHE_S = 1.0
STATUS_CACHE_KEY = "hpcllm_status_cache"
# What users never see of the cluster: where its internal services listen, which credential a node holds (a
# failed migration's error names the node agent's address: "node agent http://...: ..."), where a model's checkpoint
# lies and which Slurm account, partition and qos its allocations are charged to. A model's LoRA adapters are
# listed by name only (their folders are paths): see without_internal_addresses.
INTERNAL_FIELDS = {"models": ("source", "slurm"), "nodes": ("agent_url", "credential_id"), "instances": ("worker_url",),
                   "migrations": ("error",)}
# Sections whose rows belong to a node (hidden with another group's pool node).
NODE_SECTIONS = ("instances", "cold_starts", "migrations", "failed_instances")


class StatusCache:
    """The controller's status (its JSON body, or None where it did not give it) as this process last fetched it,
    for STATUS_CACHE_S. Polls arriving during a fetch wait for its answer instead of asking too (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._fetched_at: float | None = None
        self._body: bytes | None = None

    def body(self, fetch: Callable[[], bytes | None]) -> bytes | None:
        with self._lock:
            if self._fetched_at is None or time.monotonic() - self._fetched_at >= STATUS_CACHE_S:
                self._body = fetch()
                self._fetched_at = time.monotonic()
            return self._body


@bp.record_once
def _install_cache(state) -> None:  # one per app, so one per gunicorn worker process
    state.app.extensions[STATUS_CACHE_KEY] = StatusCache()


def _page() -> bytes:
    return resources.files(__package__).joinpath("page.html").read_bytes()


@bp.get("/status")
def page():
    resp = Response(_page(), content_type="text/html; charset=utf-8")
    # The page runs only its own inline script and talks only to this gateway.
    resp.headers["Content-Security-Policy"] = ("default-src 'none'; script-src 'unsafe-inline'; "
                                               "style-src 'unsafe-inline'; connect-src 'self'; img-src data:")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Cache-Control"] = "no-cache"
    return resp


@bp.get("/v1/status")
def user_status():
    gw = current_gateway()
    if not gw.config.gateway.status_page_users:
        raise PermissionDenied("the cluster status is for admins on this gateway (gateway.status_page_users is "
                               "false): use the admin key, or ask the operator to open it to users",
                               code="status_admins_only")
    router = gw.router
    if not isinstance(router, ControllerRouter):
        raise NotImplementedByDeployment("this gateway serves static models without a controller: no cluster status")
    admin_key = admin_key_of(gw.config)
    if admin_key is None:
        raise ServiceUnavailable("the controller's admin key is not set (controller.admin_key): no status to show",
                                 code="status_unavailable")
    body = current_app.extensions[STATUS_CACHE_KEY].body(lambda: _fetch_status(gw, router, admin_key))
    if body is None:
        raise ServiceUnavailable("hpcllm's controller did not give its status just now; retry shortly",
                                 code="controller_unreachable", retry_after=5)
    status = json.loads(body)  # each poll's own copy: the views below change it
    return without_internal_addresses(without_other_groups_pools(status, g.api_key.group if g.api_key else None))


def _fetch_status(gw: Gateway, router: ControllerRouter, admin_key: str) -> bytes | None:
    try:
        upstream = gw.http.get(f"{router.controller_url}/v1/admin/status", timeout=STATUS_TIMEOUT_S,
                               headers={"Authorization": f"Bearer {admin_key}"})
        upstream.raise_for_status()
        upstream.json()  # JSON, checked once here
        return upstream.content
    except (httpx.HTTPError, ValueError) as exc:  # where and why: the log's (users never see internal addresses)
        log.warning("the controller at %s did not give its status: %s", router.controller_url, exc)
        return None


def without_other_groups_pools(status: dict, group: str | None) -> dict:
    """A user's view: a group's own pool (a node serving one group) is that group's business only."""
    hidden = {node["node_id"] for node in status.get("nodes", [])
              if node.get("serves_group") is not None and node["serves_group"] != group}
    status["nodes"] = [node for node in status.get("nodes", []) if node["node_id"] not in hidden]
    for section in NODE_SECTIONS:
        status[section] = [row for row in status.get(section, []) if row.get("node_id") not in hidden]
    return status


def without_internal_addresses(status: dict) -> dict:
    for section, fields in INTERNAL_FIELDS.items():
        for row in status.get(section, []):
            for field in fields:
                row.pop(field, None)
    for model in status.get("models", []):
        model["lora_adapters"] = sorted(model.get("lora_adapters") or {})  # names -> folders: the names
    return status
