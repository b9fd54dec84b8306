"""The controller's HTTP API (Flask blueprints on hpcllm.httpkit): internal routes for node agents and the gateway,
admin routes for the CLI.

Errors always have one shape, {"error": {"message", "type", "param", "code"}}, never an HTML page or a traceback.
The internal blueprint (/v1/internal/*) needs the cluster shared secret (X-Hpcllm-Secret) or, for what node agents
call, a node token (X-Hpcllm-Token: an allocation's or a pool's, scoped by hpcllm.credentials; docs/security.md);
the route API takes the secret only. The admin blueprint (/v1/admin/*) needs the admin key (Authorization: Bearer
KEY), its own credential (never the secret; no key: the admin API is closed). /health and /metrics are open (bind
the controller to an internal address).
"""

from __future__ import annotations

import logging
import math

from flask import Blueprint, Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from hpcllm.config import admin_key_of
from hpcllm.controller.errors import ControllerError, InvalidRequest
from hpcllm.controller.protocol import (
    MAX_REQUEST_BYTES,
    AdminLoadLoraAdapter,
    AdminUnloadLoraAdapter,
    CredentialInfo,
    CredentialList,
    Heartbeat,
    IssuedPoolToken,
    MigrationTarget,
    MigrationTargetRequest,
    ModelList,
    ModelSpec,
    NodeRegistration,
    PoolTokenRequest,
    RouteReady,
)
from hpcllm.controller.service import Controller
from hpcllm.credentials import ClusterOnly, TokenOrSecret
from hpcllm.httpkit.app import service_app
from hpcllm.httpkit.auth import BearerKey, guard, requires
from hpcllm.httpkit.body import parse_body

log = logging.getLogger(__name__)


class Metrics:
    """The controller's /metrics. A model is labelled model_name, as in the gateway's, the workers' and vLLM's."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.routes = Counter("hpcllm_controller_routes", "Route answers by outcome", ["model_name", "outcome"],
                              registry=self.registry)
        self.cold_starts = Counter("hpcllm_controller_cold_starts", "Finished cold starts by load tier",
                                   ["model_name", "tier"], registry=self.registry)
        self.cold_start_seconds = Histogram(
            "hpcllm_controller_cold_start_seconds", "Placement to ready, seconds", ["tier"],
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=self.registry)
        self.migrations = Counter(
            "hpcllm_controller_migrations",
            "Instances the controller moved off a node (placement making room, retirement), by outcome: migrated "
            "(requests moved live), partial, failed / no_target (stopped; requests resume from tokens), idle",
            ["model_name", "trigger", "outcome"], registry=self.registry)
        self.migrated_requests = Counter(
            "hpcllm_controller_migrated_requests", "Running requests live-migrated by controller moves",
            ["model_name", "trigger"], registry=self.registry)
        self.migration_targets = Counter(
            "hpcllm_controller_migration_targets",
            "Answers to draining node agents asking where requests go: ready, starting, allocating, none",
            ["model_name", "outcome"], registry=self.registry)


def create_app(controller: Controller) -> Flask:
    config = controller.config
    secret = config.cluster.shared_secret
    admin_key = admin_key_of(config)
    metrics = Metrics()
    open_bp = Blueprint("open", __name__)
    # Node agents (a node token or the secret: the caller's Principal in g.principal) and the gateway (the secret).
    internal = guard(Blueprint("internal", __name__), TokenOrSecret(secret, controller.authenticate_token))
    admin = guard(Blueprint("admin", __name__), BearerKey(
        admin_key, what="admin key", disabled="the admin API is disabled: controller.admin_key is not set"))

    def count_cold_start(cold) -> None:
        metrics.cold_starts.labels(cold.model, cold.tier or "unknown").inc()
        metrics.cold_start_seconds.labels(cold.tier or "unknown").observe(
            (cold.ready_at or cold.requested_at) - cold.requested_at)

    controller.cold_start_listeners.append(count_cold_start)

    def count_migration(record) -> None:
        metrics.migrations.labels(record.model, record.trigger, record.outcome).inc()
        if record.moved:
            metrics.migrated_requests.labels(record.model, record.trigger).inc(record.moved)

    controller.migration_listeners.append(count_migration)

    # -------------------------------------------------------------------------------------------- open

    @open_bp.get("/health")
    def health():
        controller.registry.schema_version()  # raises (-> 500) if the database stopped answering
        return {"status": "ok"}

    @open_bp.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    # ----------------------------------------------------------------------------------------- internal

    @internal.post("/v1/internal/nodes/register")
    def register():
        return controller.register(parse_body(NodeRegistration), g.principal).model_dump()

    @internal.post("/v1/internal/nodes/<node_id>/heartbeat")
    def heartbeat(node_id: str):
        return controller.heartbeat(node_id, parse_body(Heartbeat), g.principal).model_dump()

    @internal.get("/v1/internal/models")
    def models():
        cards = controller.model_cards()
        if g.principal.kind == "pool":  # a group's pool agent needs its own model's card, not the others'
            cards = [card for card in cards if card.name == g.principal.model]
        return ModelList(models=cards).model_dump()

    @internal.get("/v1/internal/route")
    @requires(ClusterOnly("the route API (the gateway's)"))
    def route():
        name = request.args.get("model", "")
        group = request.args.get("group") or None  # the API key's group: a group's own pool serves it alone
        if not name:
            raise InvalidRequest("query parameter 'model' is required", param="model")
        try:
            wait = float(request.args.get("wait", "0"))
        except ValueError:
            wait = math.nan
        if not math.isfinite(wait):  # nan would never reach its deadline: a route spinning on a thread
            raise InvalidRequest("query parameter 'wait' must be a number of seconds", param="wait")
        try:
            outcome = controller.route(name, wait, group)
        except ControllerError as exc:
            metrics.routes.labels(name if exc.code != "model_not_found" else "unknown", exc.code).inc()
            raise
        metrics.routes.labels(name, outcome.status).inc()
        resp = jsonify(outcome.model_dump())
        if not isinstance(outcome, RouteReady):
            resp.status_code = 202
            resp.headers["Retry-After"] = str(max(1, round(outcome.retry_after)))
        return resp

    @internal.post("/v1/internal/migration-target")
    def migration_target():
        req = parse_body(MigrationTargetRequest)
        try:
            outcome = controller.migration_target(req, g.principal)
        except ControllerError as exc:
            if exc.code != "model_not_found":
                metrics.migration_targets.labels(req.model, "none").inc()
            raise
        if isinstance(outcome, MigrationTarget):
            metrics.migration_targets.labels(req.model, "ready").inc()
            return outcome.model_dump()
        metrics.migration_targets.labels(req.model, outcome.status).inc()
        resp = jsonify(outcome.model_dump())
        resp.status_code = 202
        resp.headers["Retry-After"] = str(max(1, round(outcome.retry_after)))
        return resp

    # -------------------------------------------------------------------------------------------- admin

    @admin.post("/v1/admin/models")
    def deploy():
        spec = parse_body(ModelSpec)
        model, created = controller.deploy(spec)
        return model.model_dump(), 201 if created else 200

    # vLLM's dynamic LoRA endpoints for the cluster (the gateway's /v1/load_lora_adapter proxies here): a redeploy
    # of the base model with the adapter added or removed.
    @admin.post("/v1/admin/load_lora_adapter")
    def load_lora_adapter():
        return controller.load_lora_adapter(parse_body(AdminLoadLoraAdapter)).model_dump()

    @admin.post("/v1/admin/unload_lora_adapter")
    def unload_lora_adapter():
        return controller.unload_lora_adapter(parse_body(AdminUnloadLoraAdapter)).model_dump()

    @admin.delete("/v1/admin/models/")
    def undeploy_nameless():
        raise InvalidRequest("no model name: DELETE /v1/admin/models/NAME undeploys model NAME (hpcllm status "
                             "lists them)", param="name")

    @admin.delete("/v1/admin/models/<name>")
    def undeploy(name: str):
        return controller.undeploy(name).model_dump()

    @admin.get("/v1/admin/status")
    def status():
        return controller.status().model_dump()

    @admin.post("/v1/admin/pool-tokens")
    def issue_pool_token():
        issued: IssuedPoolToken = controller.issue_pool_token(parse_body(PoolTokenRequest))
        return issued.model_dump(), 201

    @admin.get("/v1/admin/credentials")
    def credentials():
        return CredentialList(credentials=controller.credential_infos()).model_dump()

    @admin.delete("/v1/admin/credentials/<credential_id>")
    def revoke(credential_id: str):
        info: CredentialInfo = controller.revoke_credential(credential_id)
        return info.model_dump()

    app = service_app("hpcllm.controller", [open_bp, internal, admin],
                      max_request_bytes=min(MAX_REQUEST_BYTES, config.internal_http.max_request_bytes))
    app.config["controller"] = controller
    return app

