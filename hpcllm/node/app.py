"""The node agent's HTTP API (a Flask blueprint on hpcllm.httpkit): instances and cache, thin handlers over
WorkerManager and CacheManager.

Every call needs the key its workers hold (X-Hpcllm-Secret), /health included: the cluster shared secret, or for an
agent that registered with a node token the node key the controller sent (docs/security.md). The agent listens on
an address the controller reaches, which other users of the cluster may reach too. Wire types:
hpcllm/node/protocol.py.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, is_dataclass
from pathlib import Path

from flask import Blueprint, Flask, request
from pydantic import BaseModel

from hpcllm.credentials import AgentKey
from hpcllm.errors import HpcllmError
from hpcllm.httpkit.app import service_app
from hpcllm.httpkit.auth import guard
from hpcllm.httpkit.body import parse_body
from hpcllm.httpkit.errors import InvalidRequest, ServiceError, ServiceUnavailable, respond, service_error
from hpcllm.node.cache import CACHE_TIERS, CacheError, check_model_name
from hpcllm.node.protocol import (
    MAX_REQUEST_BYTES,
    CachedCopyInfo,
    CacheList,
    InstanceList,
    MigrateOut,
    NodeInfo,
    SetLoraAdapters,
    StartedInstance,
    StartInstance,
    StoppedInstance,
    VerifyRequest,
    VerifyResults,
    WarmRequest,
)

log = logging.getLogger(__name__)


def _copy_info(copy) -> CachedCopyInfo:
    return CachedCopyInfo(model=copy.model, tier=copy.tier, path=str(copy.path), bytes=copy.bytes,
                          last_used=copy.last_used, verified=copy.verified, in_use=copy.in_use,
                          tensor_parallel=copy.tensor_parallel, rank=copy.rank)


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


def _check_slice_request(req: WarmRequest) -> None:
    """A slice copy is rank `rank` of a tensor_parallel = N instance on the NVMe tier; a rank alone would silently
    cache the whole model (and evict other copies to make room for it)."""
    if req.tensor_parallel is None:
        if req.rank is not None:
            raise InvalidRequest("rank is only for a slice copy: give tensor_parallel too, or leave rank out to cache "
                                 "the whole model", "rank")
        return
    if req.tier != "nvme":
        raise InvalidRequest(f"a slice copy (tensor_parallel) is kept on the nvme tier, not {req.tier}", "tier")
    if req.rank is None or req.rank >= req.tensor_parallel:
        raise InvalidRequest(f"a slice copy is one rank (0..{req.tensor_parallel - 1}) of the NVMe tier", "rank")


def _evict_tier() -> str | None:
    """The tier of an eviction; None (no tier parameter) is every tier. An empty or misspelt parameter is an error,
    not a wider eviction than asked for."""
    tiers = " or ".join(CACHE_TIERS)
    unknown = sorted(set(request.args) - {"tier"})
    if unknown:
        raise InvalidRequest(f"unknown query parameter {unknown[0]!r}; the only one is tier ({tiers})", unknown[0])
    tier = request.args.get("tier")
    if tier is not None and tier not in CACHE_TIERS:
        raise InvalidRequest(f"tier must be {tiers}, not {tier!r} (leave it out to evict every tier)", "tier")
    return tier


# How long a call that comes before a token-registered agent has its node key waits for it (the registration's
# answer is a round trip away when the controller already routes to the node), before it is refused. Only a call
# carrying what could be a node key waits (AgentKey), and only KEY_WAITERS of them at once (key_waiters): the
# controller's few calls in that moment, not a burst of made-up keys holding every one of the agent's threads
# (node.threads).
KEY_WAIT_SECONDS = 5.0
KEY_WAITERS = 4


def key_waiters(threads: int) -> int:
    """How many calls may wait for the node key at once on an agent serving with `threads` threads: KEY_WAITERS, at
    most a quarter of them (at least one), so that waiting calls never take all of a small node.threads."""
    return min(KEY_WAITERS, max(1, threads // 4))


def create_app(agent) -> Flask:
    # The key its workers hold: the cluster secret, or (a token-registered agent) the node key the controller sent at
    # registration, which the controller and the gateway derive too.
    api = guard(Blueprint("agent", __name__),
                AgentKey(lambda wait: agent.workers.key_within(KEY_WAIT_SECONDS if wait else 0.0),
                         key_waiters(agent.config.node.threads)))

    def cache():
        if agent.cache is None:
            raise ServiceUnavailable("this node agent has no cache manager", code="no_cache")
        return agent.cache

    @api.app_errorhandler(HpcllmError)
    def _hpcllm_error(exc: HpcllmError):
        # InstanceError carries its status; cache errors (not enough space, unknown model, corrupt copy) are the
        # caller's to fix: 404 for an unknown model, 409 otherwise.
        if isinstance(exc, ServiceError):
            return respond(exc)
        status = getattr(exc, "http_status", None)
        if status is None:
            status = 404 if type(exc).__name__ == "UnknownModel" else 409
        return respond(service_error(status, str(exc), str(getattr(exc, "code", None) or type(exc).__name__),
                                     getattr(exc, "param", None)))

    @api.get("/health")
    def health():
        return {"status": "ok", "state": agent.state, "node_id": agent.node_id}

    @api.get("/v1/internal/node")
    def node():
        notes = agent.measurements.notes if agent.measurements else []
        return NodeInfo(state=agent.state, registration=agent.registration(), notes=notes).model_dump(mode="json")

    # ------------------------------------------------------------------------------------------- instances

    @api.post("/v1/internal/instances")
    def start_instance():
        inst = agent.workers.start(parse_body(StartInstance))
        body = StartedInstance(instance_id=inst.instance_id, worker_url=inst.worker_url, state=inst.state,
                               load_tier=inst.tier, instances_version=inst.added_in)
        return body.model_dump(), 202

    @api.get("/v1/internal/instances")
    def list_instances():
        instances, version = agent.instance_listing()
        return InstanceList(instances=instances, instances_version=version).model_dump(mode="json")

    @api.delete("/v1/internal/instances/<instance_id>")
    def stop_instance(instance_id: str):
        inst = agent.workers.stop(instance_id)
        return StoppedInstance(instance_id=inst.instance_id, state=inst.state, exit_code=inst.exit_code,
                               instances_version=inst.removed_in).model_dump()

    @api.put("/v1/internal/instances/<instance_id>/lora-adapters")
    def set_lora_adapters(instance_id: str):
        agent.workers.get(instance_id)  # 404 before the body is looked at
        wanted = parse_body(SetLoraAdapters).lora_adapters
        return agent.workers.set_lora_adapters(instance_id, wanted).model_dump()

    @api.post("/v1/internal/instances/<instance_id>/migrate-out")
    def migrate_out(instance_id: str):
        agent.workers.get(instance_id)  # 404 before the body is looked at
        order = parse_body(MigrateOut)
        return agent.migrate_out(instance_id, order.destination_url, order.ticket).model_dump()

    # ----------------------------------------------------------------------------------------------- cache

    @api.post("/v1/internal/cache/warm")
    def warm():
        req = parse_body(WarmRequest)
        if not Path(req.source).is_dir():
            raise InvalidRequest(f"source {req.source} is not a folder on this node", "source")
        _check_slice_request(req)
        # wait=False: a warm of the same copy under way is a 409 at once. Waiting for it held one of the agent's
        # threads (node.threads) for the whole copy; a CLI asking again after its --timeout took another each time.
        if req.tensor_parallel is None:
            copy = cache().warm(req.model, Path(req.source), req.tier, wait=False)
        else:
            copy = cache().warm_slices(req.model, Path(req.source), req.tensor_parallel, req.rank, wait=False)
        agent.wake_heartbeat()
        return _copy_info(copy).model_dump()

    @api.get("/v1/internal/cache")
    def list_cache():
        return CacheList(cached=[_copy_info(c) for c in cache().list()]).model_dump()

    @api.delete("/v1/internal/cache/<model>")
    def evict(model: str):
        try:  # the name comes from the path: bad input (400), not a cache conflict (409)
            check_model_name(model)
        except CacheError as exc:
            raise InvalidRequest(str(exc), "model") from None
        evicted = cache().evict(model, _evict_tier())
        agent.wake_heartbeat()
        return CacheList(cached=[_copy_info(c) for c in evicted]).model_dump()

    @api.post("/v1/internal/cache/verify")
    def verify():
        req = parse_body(VerifyRequest) if request.content_length else VerifyRequest()
        results = cache().verify(req.model)
        agent.wake_heartbeat()
        return VerifyResults(results=_plain(results)).model_dump()

    return service_app("hpcllm.node", [api],
                       max_request_bytes=min(MAX_REQUEST_BYTES, agent.config.internal_http.max_request_bytes))
