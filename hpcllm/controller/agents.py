"""HTTP client the controller uses to ask node agents to start, stop and list model instances.

The wire shapes follow the node agent's contract (docs/controller.md, service-contract): POST
<agent_url>/v1/internal/instances {model, source, gpu_ids} -> {instance_id, worker_url}; DELETE
<agent_url>/v1/internal/instances/<id>; GET <agent_url>/v1/internal/instances -> [InstanceInfo] (or {"instances": [...]});
POST <agent_url>/v1/internal/instances/<id>/migrate-out {destination_url} -> MigratedOut (live migration, then stop);
PUT <agent_url>/v1/internal/instances/<id>/lora-adapters {lora_adapters} -> LoraAdaptersApplied (a redeploy's adapters).
Every failure becomes an AgentError naming the node's URL and what went wrong. `hpcllm cache` talks to the
agents' cache API through the same client (call), in its own words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from hpcllm.config import InternalHttpConfig
from hpcllm.controller.errors import AgentError
from hpcllm.controller.protocol import InstanceInfo, LoraAdaptersApplied, MigratedOut
from hpcllm.credentials import MigrationTicket
from hpcllm.httpkit.auth import secret_headers
from hpcllm.httpkit.client import Refused, error_of, internal_client, json_object, request_json
from hpcllm.worker.client import ADAPTER_CALL_TIMEOUT


# What an agent adds to its worker's adapter calls before it answers (a change waiting for the instance's lock).
AGENT_ANSWER_SECONDS = 30.0

Answer = TypeVar("Answer", bound=BaseModel)


def adapters_timeout(before: dict[str, str], after: dict[str, str]) -> float:
    """How long an agent may take to change an instance's adapters from `before` to `after`: its worker unloads and
    loads them one by one (each call up to ADAPTER_CALL_TIMEOUT: an adapter read and installed between two steps;
    a changed folder is both), then the agent answers."""
    calls = sum(after.get(n) != f for n, f in before.items()) + sum(before.get(n) != f for n, f in after.items())
    return adapter_calls_timeout(calls)


def adapter_calls_timeout(calls: int) -> float:
    return max(calls, 1) * ADAPTER_CALL_TIMEOUT + AGENT_ANSWER_SECONDS


# The longest an admin redeploy that changes one adapter (vLLM's load or unload endpoint) may wait for the model's
# instances: one push to all of them at once (a changed folder: an unload and a load) and, if a worker refuses the
# adapter, one push back.
ONE_ADAPTER_REDEPLOY_SECONDS = 2 * adapter_calls_timeout(2)


def _answer(resp: httpx.Response, url: str, model: type[Answer], action: str, what: str) -> Answer:
    """An agent's 200 answer read as `model`; a refusal or an unreadable answer is an AgentError saying which."""
    if resp.status_code != 200:
        raise AgentError(f"node agent {url} refused to {action}: HTTP {resp.status_code} {error_of(resp)[1]}")
    try:
        return model.model_validate(json_object(resp))
    except ValidationError as exc:
        raise AgentError(f"node agent {url} sent an unreadable {what}: {exc}") from None


@dataclass(frozen=True)
class StartedInstance:
    instance_id: str
    worker_url: str | None
    instances_version: int | None = None  # the agent's instance-list version with it in (None: an older agent)


class AgentClient:
    def __init__(self, shared_secret: str, timeout_seconds: float | httpx.Timeout = 10.0,
                 http: InternalHttpConfig | None = None):
        self._http = internal_client(http, headers=secret_headers(shared_secret), timeout=timeout_seconds)
        self._keys: dict[str, str] = {}  # agent URL -> its node key (token-registered agents; docs/security.md)

    def set_key(self, agent_url: str, key: str | None) -> None:
        """The key to call this agent with from now on (None: the cluster secret)."""
        if key is None:
            self._keys.pop(agent_url.rstrip("/"), None)
        else:
            self._keys[agent_url.rstrip("/")] = key

    def _with_key(self, url: str, kwargs: dict) -> dict:
        """kwargs for a call to url: with its agent's node key when it has one (else the client's cluster secret)."""
        key = next((k for base, k in self._keys.items() if url.startswith(base + "/")), None)
        return kwargs if key is None else {**kwargs, "headers": secret_headers(key)}

    def close(self) -> None:
        self._http.close()

    def call(self, agent_url: str, method: str, path: str, *,
             unreachable: Callable[[httpx.HTTPError], Exception] | None = None,
             refused: Refused | None = None, **kwargs) -> Any:
        """One JSON call to an agent's API, its answer's JSON. Failures are AgentErrors unless the caller words
        them (hpcllm.httpkit.client.request_json's unreachable / refused)."""
        url = f"{agent_url.rstrip('/')}{path}"
        return request_json(
            self._http, method, url,
            unreachable=unreachable or (lambda exc: AgentError(f"node agent {url}: {type(exc).__name__}: {exc}")),
            refused=refused or (lambda status, error, message, retry_after=None: AgentError(
                f"node agent {url}: HTTP {status} {message}")),
            unexpected=lambda what: AgentError(f"node agent {url} did not answer like an hpcllm node agent ({what})"),
            **self._with_key(url, kwargs))

    def _call(self, method: str, url: str, **kwargs) -> httpx.Response:
        try:
            return self._http.request(method, url, **self._with_key(url, kwargs))
        except httpx.HTTPError as exc:
            raise AgentError(f"node agent {url}: {type(exc).__name__}: {exc}") from None

    def start_instance(self, agent_url: str, model: str, source: str, gpu_ids: list[int],
                       max_model_len: int | None = None, engine: str = "hpcllm",
                       cache_on_load: list[str] | None = None, tensor_parallel: int = 1,
                       nodes: int = 1, lora_adapters: dict[str, str] | None = None) -> StartedInstance:
        url = f"{agent_url.rstrip('/')}/v1/internal/instances"
        body = {"model": model, "source": source, "gpu_ids": gpu_ids, "max_model_len": max_model_len,
                "engine": engine, "tensor_parallel": tensor_parallel}
        if nodes > 1:  # absent: every rank on the agent's node (agents of older versions know no other way)
            body["nodes"] = nodes
        if cache_on_load is not None:  # absent: the agent's node.cache_on_load
            body["cache_on_load"] = cache_on_load
        if lora_adapters:  # absent without: agents of older versions know no such field
            body["lora_adapters"] = lora_adapters
        resp = self._call("POST", url, json=body)
        if resp.status_code not in (200, 201, 202):
            raise AgentError(f"node agent {url} refused to start {model!r}: HTTP {resp.status_code} "
                             f"{error_of(resp)[1]}")
        body = json_object(resp)
        if not isinstance(body.get("instance_id"), str):
            raise AgentError(f"node agent {url} answered without an instance_id: {resp.text[:200]!r}")
        worker_url = body.get("worker_url")
        return StartedInstance(body["instance_id"], worker_url if isinstance(worker_url, str) else None,
                               _instances_version(body))

    def stop_instance(self, agent_url: str, instance_id: str) -> int | None:
        """Stop (drain) an instance; one the agent no longer knows counts as stopped. The agent's instance-list
        version without it (None: an agent older than versions, or one that did not know the instance)."""
        url = f"{agent_url.rstrip('/')}/v1/internal/instances/{instance_id}"
        resp = self._call("DELETE", url)
        if resp.status_code not in (200, 202, 204, 404):
            raise AgentError(f"node agent {url} refused to stop instance: HTTP {resp.status_code} "
                             f"{error_of(resp)[1]}")
        return _instances_version(json_object(resp)) if resp.status_code == 200 else None

    def migrate_out(self, agent_url: str, instance_id: str, destination_url: str, timeout: float,
                    ticket: MigrationTicket | None = None) -> MigratedOut:
        """Have the agent live-migrate an instance's requests to destination_url, then stop it (node agent's
        POST .../migrate-out); timeout covers the migration and the stop. ticket: ours, naming the destination."""
        url = f"{agent_url.rstrip('/')}/v1/internal/instances/{instance_id}/migrate-out"
        body = {"destination_url": destination_url, "ticket": ticket.model_dump() if ticket else None}
        resp = self._call("POST", url, json=body, timeout=timeout)
        return _answer(resp, url, MigratedOut, "migrate the instance", "migration result")

    def set_lora_adapters(self, agent_url: str, instance_id: str, adapters: dict[str, str],
                          timeout: float) -> LoraAdaptersApplied:
        """Have the instance's worker serve these adapters from now on; timeout: adapters_timeout of the change."""
        url = f"{agent_url.rstrip('/')}/v1/internal/instances/{instance_id}/lora-adapters"
        resp = self._call("PUT", url, json={"lora_adapters": adapters}, timeout=timeout)
        return _answer(resp, url, LoraAdaptersApplied, "change the instance's LoRA adapters", "answer")

    def list_instances(self, agent_url: str) -> list[InstanceInfo]:
        url, body = self._instance_list(agent_url)
        items = body.get("instances", []) if isinstance(body, dict) else body
        known = set(InstanceInfo.model_fields)
        try:
            # Agents may send more than we read (newer versions): keep the fields we know.
            return [InstanceInfo.model_validate({k: v for k, v in item.items() if k in known}) for item in items]
        except (ValidationError, AttributeError, TypeError) as exc:
            raise AgentError(f"node agent {url} sent an unreadable instance list: {exc}") from None

    def instances_version(self, agent_url: str) -> int | None:
        """The agent's instance-list version now (None: an agent older than versions)."""
        body = self._instance_list(agent_url)[1]
        return _instances_version(body) if isinstance(body, dict) else None

    def _instance_list(self, agent_url: str) -> tuple[str, Any]:
        url = f"{agent_url.rstrip('/')}/v1/internal/instances"
        resp = self._call("GET", url)
        if resp.status_code != 200:
            raise AgentError(f"node agent {url}: HTTP {resp.status_code} {error_of(resp)[1]}")
        try:
            return url, resp.json() if resp.content else []
        except ValueError:  # no JSON (a proxy's page): the agent's error, which its callers handle
            raise AgentError(f"node agent {url} sent an unreadable instance list: {resp.text[:200]!r}") from None


def _instances_version(body: dict) -> int | None:
    """The instance-list version an agent's answer carries (Heartbeat.instances_version); None without one."""
    version = body.get("instances_version")
    return version if isinstance(version, int) and not isinstance(version, bool) and version >= 0 else None

