"""The controller's HTTP API (Flask): internal routes for node agents and the gateway, admin routes for the CLI.

Errors always have one shape, {"error": {"message", "type", "param", "code"}}, never an HTML page or a traceback.
/v1/internal/* needs the cluster shared secret (X-Hpcllm-Secret) or, for what node agents call, a node token
(X-Hpcllm-Token: an allocation's or a pool's, scoped by hpcllm.credentials; docs/security.md); /v1/admin/* needs
the admin key (Authorization: Bearer KEY), its own credential (never the secret; no key: the admin API is closed).
/health and /metrics are open (bind the controller to an internal address).
"""

from __future__ import annotations

import hmac
import logging

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException

from hpcllm.config import admin_key_of
from hpcllm.controller.errors import ControllerError, InvalidRequest, NoCapacity, Unauthorized
from hpcllm.controller.protocol import (
    SECRET_HEADER,
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
from hpcllm.credentials import CLUSTER, TOKEN_HEADER, CredentialError, require_cluster, same_secret
from hpcllm.httpjson import parse_json_body

log = logging.getLogger(__name__)


def error_body(message: str, code: str, error_type: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    first = exc.errors()[0]["loc"] if exc.errors() else ()
    return "; ".join(parts), ".".join(str(p) for p in first) or None


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.routes = Counter("hpcllm_controller_routes", "Route answers by outcome", ["model", "outcome"],
                              registry=self.registry)
        self.cold_starts = Counter("hpcllm_controller_cold_starts", "Finished cold starts by load tier",
                                   ["model", "tier"], registry=self.registry)
        self.cold_start_seconds = Histogram(
            "hpcllm_controller_cold_start_seconds", "Placement to ready, seconds", ["tier"],
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=self.registry)
        self.migrations = Counter(
            "hpcllm_controller_migrations",
            "Instances the controller moved off a node (placement making room, retirement), by outcome: migrated "
            "(requests moved live), partial, failed / no_target (stopped; requests resume from tokens), idle",
            ["model", "trigger", "outcome"], registry=self.registry)
        self.migrated_requests = Counter(
            "hpcllm_controller_migrated_requests", "Running requests live-migrated by controller moves",
            ["model", "trigger"], registry=self.registry)
        self.migration_targets = Counter(
            "hpcllm_controller_migration_targets",
            "Answers to draining node agents asking where requests go: ready, starting, allocating, none",
            ["model", "outcome"], registry=self.registry)


def _parse(model: type[BaseModel]):
    try:
        body = parse_json_body(request.get_data())
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise InvalidRequest(message, param=param) from None


def create_app(controller: Controller) -> Flask:
    config = controller.config
    secret = config.cluster.shared_secret
    admin_key = admin_key_of(config)
    metrics = Metrics()
    app = Flask("hpcllm.controller")

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
    app.config["controller"] = controller

    @app.errorhandler(ControllerError)
    def _controller_error(exc: ControllerError):
        resp = jsonify(error_body(str(exc), exc.code, exc.error_type, getattr(exc, "param", None)))
        resp.status_code = exc.http_status
        if isinstance(exc, NoCapacity) and exc.retry_after is not None:
            resp.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return resp

    @app.errorhandler(CredentialError)
    def _credential_error(exc: CredentialError):
        resp = jsonify(error_body(str(exc), "unauthorized" if exc.status == 401 else "forbidden",
                                  "authentication_error" if exc.status == 401 else "permission_error"))
        resp.status_code = exc.status
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        resp = jsonify(error_body(exc.description or exc.name, exc.name.lower().replace(" ", "_")))
        resp.status_code = exc.code or 500
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        resp = jsonify(error_body(f"internal error: {type(exc).__name__}: {exc}", "internal_error", "server_error"))
        resp.status_code = 500
        return resp

    @app.before_request
    def _authenticate():
        if request.path.startswith("/v1/internal/"):
            token = request.headers.get(TOKEN_HEADER)
            if token:
                g.principal = controller.authenticate_token(token)
            elif same_secret(request.headers.get(SECRET_HEADER, ""), secret):
                g.principal = CLUSTER
            else:
                raise Unauthorized(f"missing or wrong {SECRET_HEADER} (or {TOKEN_HEADER}) header")
        elif request.path.startswith("/v1/admin/"):
            if admin_key is None:
                raise Unauthorized("the admin API is disabled: controller.admin_key is not set")
            auth = request.headers.get("Authorization", "")
            given = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
            if not hmac.compare_digest(given.encode(), admin_key.encode()):
                raise Unauthorized("missing or wrong admin key (Authorization: Bearer KEY)")

    # -------------------------------------------------------------------------------------------- open

    @app.get("/health")
    def health():
        controller.registry.schema_version()  # raises (-> 500) if the database stopped answering
        return {"status": "ok"}

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    # ----------------------------------------------------------------------------------------- internal

    @app.post("/v1/internal/nodes/register")
    def register():
        return controller.register(_parse(NodeRegistration), g.principal).model_dump()

    @app.post("/v1/internal/nodes/<node_id>/heartbeat")
    def heartbeat(node_id: str):
        return controller.heartbeat(node_id, _parse(Heartbeat), g.principal).model_dump()

    @app.get("/v1/internal/models")
    def models():
        return ModelList(models=controller.model_cards()).model_dump()

    @app.get("/v1/internal/route")
    def route():
        require_cluster(g.principal, "the route API (the gateway's)")
        name = request.args.get("model", "")
        group = request.args.get("group") or None  # the API key's group: a group's own pool serves it alone
        if not name:
            raise InvalidRequest("query parameter 'model' is required", param="model")
        try:
            wait = float(request.args.get("wait", "0"))
        except ValueError:
            raise InvalidRequest("query parameter 'wait' must be a number of seconds", param="wait") from None
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

    @app.post("/v1/internal/migration-target")
    def migration_target():
        req = _parse(MigrationTargetRequest)
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

    @app.post("/v1/admin/models")
    def deploy():
        spec = _parse(ModelSpec)
        model, created = controller.deploy(spec)
        return model.model_dump(), 201 if created else 200

    @app.delete("/v1/admin/models/<name>")
    def undeploy(name: str):
        return controller.undeploy(name).model_dump()

    @app.get("/v1/admin/status")
    def status():
        return controller.status().model_dump()

    @app.post("/v1/admin/pool-tokens")
    def issue_pool_token():
        issued: IssuedPoolToken = controller.issue_pool_token(_parse(PoolTokenRequest))
        return issued.model_dump(), 201

    @app.get("/v1/admin/credentials")
    def credentials():
        return CredentialList(credentials=controller.credential_infos()).model_dump()

    @app.delete("/v1/admin/credentials/<credential_id>")
    def revoke(credential_id: str):
        info: CredentialInfo = controller.revoke_credential(credential_id)
        return info.model_dump()

    return app
