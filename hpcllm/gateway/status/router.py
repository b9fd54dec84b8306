"""GET /status: a live page of models, nodes, tiers and caches, instances, allocations, cold starts, migrations.

The page itself is one static file (HTML, CSS and JS inline, no build step) and holds no data, so it is served
without a key. Its script asks for a key and polls:
- /v1/admin/status with the admin key (the admin proxy: the controller's whole status), or, when
- `gateway.status_page_users` is true, GET /v1/status with any API key: the same status without the internal
  addresses (agent and worker URLs) and credential ids, and without other groups' own model pools (their nodes,
  instances, failures and migrations), fetched by the gateway's ControllerRouter with the controller's admin key, at
  most once per routing.STATUS_CACHE_S per gateway process: every poll within that period gets the same answer.
"""

from __future__ import annotations

from importlib import resources

from flask import Blueprint, Response, g

from hpcllm.config import admin_key_of
from hpcllm.gateway.errors import NotImplementedByDeployment, PermissionDenied, ServiceUnavailable
from hpcllm.gateway.routing import ControllerRouter
from hpcllm.gateway.runtime import current_gateway

bp = Blueprint("status", __name__)

# What users never see of the cluster: where its internal services listen, which credential a node holds (a
# failed migration's error names the node agent's address: "node agent http://...: ..."), where a model's checkpoint
# lies and which Slurm account, partition and qos its allocations are charged to. A model's LoRA adapters are
# listed by name only (their folders are paths): see without_internal_addresses.
INTERNAL_FIELDS = {"models": ("source", "slurm"), "nodes": ("agent_url", "credential_id"), "instances": ("worker_url",),
                   "migrations": ("error",)}
# Sections whose rows belong to a node (hidden with another group's pool node).
NODE_SECTIONS = ("instances", "cold_starts", "migrations", "failed_instances")


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
    status = router.admin_status(admin_key)
    if status is None:
        raise ServiceUnavailable("hpcllm's controller did not give its status just now; retry shortly",
                                 code="controller_unreachable", retry_after=5)
    return without_internal_addresses(without_other_groups_pools(status, g.api_key.group if g.api_key else None))


def without_other_groups_pools(status: dict, group: str | None) -> dict:
    """A user's view: a group's own pool (a node serving one group) is that group's business only. A new dict:
    `status` (the router's copy, every poll's) is left as it is."""
    hidden = {node["node_id"] for node in status.get("nodes", [])
              if node.get("serves_group") is not None and node["serves_group"] != group}
    view = dict(status)
    view["nodes"] = [node for node in status.get("nodes", []) if node["node_id"] not in hidden]
    for section in NODE_SECTIONS:
        view[section] = [row for row in status.get(section, []) if row.get("node_id") not in hidden]
    return view


def without_internal_addresses(status: dict) -> dict:
    """The status without INTERNAL_FIELDS, in new rows: `status`'s are left as they are."""
    view = dict(status)
    for section, fields in INTERNAL_FIELDS.items():
        if section in view:
            view[section] = [{k: v for k, v in row.items() if k not in fields} for row in view[section]]
    if "models" in view:  # names -> folders: the names
        view["models"] = [{**model, "lora_adapters": sorted(model.get("lora_adapters") or {})}
                          for model in view["models"]]
    return view
