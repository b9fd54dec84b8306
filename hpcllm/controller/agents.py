"""HTTP client the controller uses to ask node agents to start, stop and list model instances.

The wire shapes follow the node agent's contract (docs/controller.md, service-contract): POST
<agent_url>/v1/internal/instances {model, source, gpu_ids} -> {instance_id, worker_url}; DELETE
<agent_url>/v1/internal/instances/<id>; GET <agent_url>/v1/internal/instances -> [InstanceInfo] (or {"instances": [...]});
POST <agent_url>/v1/internal/instances/<id>/migrate-out {destination_url} -> MigratedOut (live migration, then stop).
Every failure becomes an AgentError naming the node's URL and what went wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from pydantic import ValidationError

from hpcllm.controller.errors import AgentError
from hpcllm.controller.protocol import SECRET_HEADER, InstanceInfo, MigratedOut
from hpcllm.credentials import MigrationTicket


@dataclass(frozen=True)
class StartedInstance:
    instance_id: str
    worker_url: str | None


class AgentClient:
    def __init__(self, shared_secret: str, timeout_seconds: float = 10.0):
        self._http = httpx.Client(headers={SECRET_HEADER: shared_secret}, timeout=timeout_seconds)
        self._keys: dict[str, str] = {}  # agent URL -> its node key (token-registered agents; docs/security.md)

    def set_key(self, agent_url: str, key: str | None) -> None:
        """The key to call this agent with from now on (None: the cluster secret)."""
        if key is None:
            self._keys.pop(agent_url.rstrip("/"), None)
        else:
            self._keys[agent_url.rstrip("/")] = key

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, url: str, **kwargs) -> httpx.Response:
        key = next((k for base, k in self._keys.items() if url.startswith(base + "/")), None)
        if key is not None:
            kwargs["headers"] = {SECRET_HEADER: key}
        try:
            return self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise AgentError(f"node agent {url}: {type(exc).__name__}: {exc}") from None

    def start_instance(self, agent_url: str, model: str, source: str, gpu_ids: list[int],
                       max_model_len: int | None = None, engine: str = "hpcllm",
                       cache_on_load: list[str] | None = None, tensor_parallel: int = 1) -> StartedInstance:
        url = f"{agent_url.rstrip('/')}/v1/internal/instances"
        body = {"model": model, "source": source, "gpu_ids": gpu_ids, "max_model_len": max_model_len,
                "engine": engine, "tensor_parallel": tensor_parallel}
        if cache_on_load is not None:  # absent: the agent's node.cache_on_load
            body["cache_on_load"] = cache_on_load
        resp = self._call("POST", url, json=body)
        if resp.status_code not in (200, 201, 202):
            raise AgentError(f"node agent {url} refused to start {model!r}: HTTP {resp.status_code} "
                             f"{_error_message(resp)}")
        body = _json(resp)
        if not isinstance(body.get("instance_id"), str):
            raise AgentError(f"node agent {url} answered without an instance_id: {resp.text[:200]!r}")
        worker_url = body.get("worker_url")
        return StartedInstance(body["instance_id"], worker_url if isinstance(worker_url, str) else None)

    def stop_instance(self, agent_url: str, instance_id: str) -> None:
        """Stop (drain) an instance; one the agent no longer knows counts as stopped."""
        url = f"{agent_url.rstrip('/')}/v1/internal/instances/{instance_id}"
        resp = self._call("DELETE", url)
        if resp.status_code not in (200, 202, 204, 404):
            raise AgentError(f"node agent {url} refused to stop instance: HTTP {resp.status_code} "
                             f"{_error_message(resp)}")

    def migrate_out(self, agent_url: str, instance_id: str, destination_url: str, timeout: float,
                    ticket: MigrationTicket | None = None) -> MigratedOut:
        """Have the agent live-migrate an instance's requests to destination_url, then stop it (node agent's
        POST .../migrate-out); timeout covers the migration and the stop. ticket: ours, naming the destination."""
        url = f"{agent_url.rstrip('/')}/v1/internal/instances/{instance_id}/migrate-out"
        body = {"destination_url": destination_url, "ticket": ticket.model_dump() if ticket else None}
        resp = self._call("POST", url, json=body, timeout=timeout)
        if resp.status_code != 200:
            raise AgentError(f"node agent {url} refused to migrate the instance: HTTP {resp.status_code} "
                             f"{_error_message(resp)}")
        try:
            return MigratedOut.model_validate(_json(resp))
        except ValidationError as exc:
            raise AgentError(f"node agent {url} sent an unreadable migration result: {exc}") from None

    def list_instances(self, agent_url: str) -> list[InstanceInfo]:
        url = f"{agent_url.rstrip('/')}/v1/internal/instances"
        resp = self._call("GET", url)
        if resp.status_code != 200:
            raise AgentError(f"node agent {url}: HTTP {resp.status_code} {_error_message(resp)}")
        body = resp.json() if resp.content else []
        items = body.get("instances", []) if isinstance(body, dict) else body
        known = set(InstanceInfo.model_fields)
        try:
            # Agents may send more than we read (newer versions): keep the fields we know.
            return [InstanceInfo.model_validate({k: v for k, v in item.items() if k in known}) for item in items]
        except (ValidationError, AttributeError, TypeError) as exc:
            raise AgentError(f"node agent {url} sent an unreadable instance list: {exc}") from None


def _json(resp: httpx.Response) -> dict:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error_message(resp: httpx.Response) -> str:
    error = _json(resp).get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return resp.text[:200]
