"""The node agent's HTTP API (Flask): instances and cache, thin handlers over WorkerManager and CacheManager.

Every call needs the key its workers hold (X-Hpcllm-Secret), /health included: the cluster shared secret, or for an
agent that registered with a node token the node key the controller sent (docs/security.md). The agent listens on
an address the controller reaches, which other users of the cluster may reach too. Wire types:
hpcllm/node/protocol.py.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, is_dataclass
from pathlib import Path

from flask import Flask, jsonify, request
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException

from hpcllm.credentials import SECRET_HEADER, same_secret
from hpcllm.errors import HpcllmError
from hpcllm.httpjson import parse_json_body
from hpcllm.node.protocol import (
    CachedCopyInfo,
    CacheList,
    InstanceList,
    MigrateOut,
    NodeInfo,
    StartedInstance,
    StartInstance,
    StoppedInstance,
    VerifyRequest,
    WarmRequest,
)

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def error_response(status: int, message: str, code: str, param: str | None = None, error_type: str | None = None):
    error_type = error_type or ("invalid_request_error" if status < 500 else "server_error")
    resp = jsonify({"error": {"message": message, "type": error_type, "param": param, "code": code}})
    resp.status_code = status
    return resp


def _parse(model: type[BaseModel]):
    try:
        body = parse_json_body(request.get_data())
    except ValueError as exc:
        raise ApiError(400, str(exc), "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_request")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()]
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        raise ApiError(400, "; ".join(parts), "invalid_request", ".".join(str(p) for p in first) or None) from None


def _copy_info(copy) -> CachedCopyInfo:
    return CachedCopyInfo(model=copy.model, tier=copy.tier, path=str(copy.path), bytes=copy.bytes,
                          last_used=copy.last_used, verified=copy.verified, in_use=copy.in_use)


def _plain(value):
    """Dataclasses (VerifyResult...) and paths as JSON-able values."""
    if is_dataclass(value):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def create_app(agent) -> Flask:
    app = Flask("hpcllm.node")

    def cache():
        if agent.cache is None:
            raise ApiError(503, "this node agent has no cache manager", "no_cache")
        return agent.cache

    @app.before_request
    def _authenticate():
        # The key its workers hold: the cluster secret, or (a token-registered agent) the node key the controller
        # sent at registration, which the controller and the gateway derive too.
        key = agent.workers.key
        if key is None or not same_secret(request.headers.get(SECRET_HEADER, ""), key):
            return error_response(401, f"missing or wrong {SECRET_HEADER} header", "unauthorized",
                                  error_type="authentication_error")

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, str(exc), exc.code, exc.param)

    @app.errorhandler(HpcllmError)
    def _hpcllm_error(exc: HpcllmError):
        # InstanceError carries its status; cache errors (not enough space, unknown model, corrupt copy) are the
        # caller's to fix: 404 for an unknown model, 409 otherwise.
        status = getattr(exc, "http_status", None)
        if status is None:
            status = 404 if type(exc).__name__ == "UnknownModel" else 409
        code = getattr(exc, "code", None) or type(exc).__name__
        return error_response(status, str(exc), str(code))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return error_response(exc.code or 500, exc.description or exc.name, exc.name.lower().replace(" ", "_"))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")

    @app.get("/health")
    def health():
        return {"status": "ok", "state": agent.state, "node_id": agent.node_id}

    @app.get("/v1/internal/node")
    def node():
        notes = agent.measurements.notes if agent.measurements else []
        return NodeInfo(state=agent.state, registration=agent.registration(), notes=notes).model_dump(mode="json")

    # ------------------------------------------------------------------------------------------- instances

    @app.post("/v1/internal/instances")
    def start_instance():
        inst = agent.workers.start(_parse(StartInstance))
        body = StartedInstance(instance_id=inst.instance_id, worker_url=inst.worker_url, state=inst.state,
                               load_tier=inst.tier)
        return body.model_dump(), 202

    @app.get("/v1/internal/instances")
    def list_instances():
        return InstanceList(instances=agent.workers.infos()).model_dump(mode="json")

    @app.delete("/v1/internal/instances/<instance_id>")
    def stop_instance(instance_id: str):
        inst = agent.workers.stop(instance_id)
        return StoppedInstance(instance_id=inst.instance_id, state=inst.state, exit_code=inst.exit_code).model_dump()

    @app.post("/v1/internal/instances/<instance_id>/migrate-out")
    def migrate_out(instance_id: str):
        agent.workers.get(instance_id)  # 404 before the body is looked at
        order = _parse(MigrateOut)
        return agent.migrate_out(instance_id, order.destination_url, order.ticket).model_dump()

    # ----------------------------------------------------------------------------------------------- cache

    @app.post("/v1/internal/cache/warm")
    def warm():
        req = _parse(WarmRequest)
        if not Path(req.source).is_dir():
            raise ApiError(400, f"source {req.source} is not a folder on this node", "invalid_request", "source")
        copy = cache().warm(req.model, Path(req.source), req.tier)
        agent.wake_heartbeat()
        return _copy_info(copy).model_dump()

    @app.get("/v1/internal/cache")
    def list_cache():
        return CacheList(cached=[_copy_info(c) for c in cache().list()]).model_dump()

    @app.delete("/v1/internal/cache/<model>")
    def evict(model: str):
        tier = request.args.get("tier") or None
        if tier not in (None, "dram", "nvme"):
            raise ApiError(400, f"tier must be dram or nvme, not {tier!r}", "invalid_request", "tier")
        evicted = cache().evict(model, tier)
        agent.wake_heartbeat()
        return CacheList(cached=[_copy_info(c) for c in evicted]).model_dump()

    @app.post("/v1/internal/cache/verify")
    def verify():
        req = _parse(VerifyRequest) if request.content_length else VerifyRequest()
        results = cache().verify(req.model)
        agent.wake_heartbeat()
        return {"results": _plain(results)}

    return app
