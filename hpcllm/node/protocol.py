"""Wire types of the node agent's HTTP API (the agent owns them; the controller and `hpcllm cache` import them).

Every call needs `X-Hpcllm-Secret: <cluster.shared_secret>` (401 otherwise). Errors look like the controller's:
{"error": {"message", "type", "param", "code"}}. Request bodies are strict, like the worker's
(httpkit.wire.WireModel): true is not GPU 1 and "2" not tensor_parallel 2; every caller builds them with real types.

    POST   /v1/internal/instances              StartInstance -> 202 StartedInstance
    GET    /v1/internal/instances              -> InstanceList{instances: [InstanceInfo], instances_version}
    DELETE /v1/internal/instances/<id>         -> StoppedInstance (404 unknown instance)
    POST   /v1/internal/instances/<id>/migrate-out  MigrateOut -> MigratedOut (live-migrate its requests, then stop)
    PUT    /v1/internal/instances/<id>/lora-adapters  SetLoraAdapters -> LoraAdaptersApplied (a redeploy's adapters:
                                                the worker loads the added ones, unloads the removed ones)
    POST   /v1/internal/cache/warm             WarmRequest -> CachedCopyInfo
    GET    /v1/internal/cache                  -> CacheList
    DELETE /v1/internal/cache/<model>?tier=T   -> CacheList (the evicted copies)
    POST   /v1/internal/cache/verify           VerifyRequest -> VerifyResults
    GET    /v1/internal/node                   -> NodeInfo (what the agent registered, its state)
    GET    /health                             -> {"status": "ok", "state": "up"|"draining"}
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from hpcllm.config import MODEL_NAME_PATTERN
from hpcllm.controller.protocol import (  # noqa: F401 (MigratedOut, LoraAdaptersApplied: answers defined there)
    AdapterFailure,
    CacheTier,
    EngineName,
    InstanceInfo,
    LoraAdaptersApplied,
    MigratedOut,
    NodeRegistration,
    Wire,
)
from hpcllm.credentials import MigrationTicket
from hpcllm.httpkit.client import HttpUrl
from hpcllm.httpkit.wire import WireModel


def _no_nul(path: str) -> str:
    # A NUL byte is no path: the OS refuses it, and Python answers ValueError (not OSError) wherever it is opened.
    if "\0" in path:
        raise ValueError("a path must not contain a NUL byte")
    return path


# PATH_MAX: a longer path cannot be opened anyway.
NodePath = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_no_nul)]

# The agent's largest real body (a migrate-out order with its ticket, a start request) is a few KB; the internal
# services' default limit (internal_http.max_request_bytes, 64 MiB) would have an agent buffer 64 MiB per call.
MAX_REQUEST_BYTES = 1 << 20


LoraAdapterFolders = dict[Annotated[str, Field(pattern=MODEL_NAME_PATTERN)], NodePath]


class StartInstance(WireModel):
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    source: NodePath = Field(description="converted checkpoint folder on the shared FS (origin)")
    gpu_ids: list[Annotated[int, Field(ge=0, le=1023)]] = Field(
        default_factory=list, max_length=64, description="agent GPU indices 0..gpus-1; empty: CPU")
    max_model_len: int | None = Field(None, gt=0, le=1 << 31)
    engine: EngineName = "hpcllm"
    cache_on_load: list[CacheTier] | None = Field(None, max_length=2,
                                                  description="overrides node.cache_on_load for this model")
    tensor_parallel: int = Field(1, ge=1, le=64, description="ranks of the instance (mpirun -n N on this node)")
    nodes: int = Field(1, ge=1, le=64, description="nodes of this agent's Slurm job the ranks spread over "
                       "(> 1: srun --mpi=pmix across them, tensor_parallel / nodes ranks each)")
    lora_adapters: LoraAdapterFolders = Field(default_factory=dict, max_length=256,
                                                description="LoRA adapters served on the model: name -> PEFT folder")


# instances_version: the agent's instance-list version (controller Heartbeat.instances_version) with the instance
# added (StartedInstance), removed (StoppedInstance), or as listed (InstanceList).


def first_instances_version() -> int:
    """The instance-list version an agent process starts from: the wall clock in microseconds. Each change counts
    one up, far fewer than the microseconds a process lives, so every version of a restarted agent is above every
    version of the process before it on that node, and a report of the old process arriving late is told as older
    than the new one's starts and stops (AgentChanges). Fits the heartbeat's INT64 field."""
    return time.time_ns() // 1000


class StartedInstance(Wire):
    instance_id: str
    worker_url: str | None = None
    state: str
    load_tier: str
    instances_version: int | None = None


class StoppedInstance(Wire):
    instance_id: str
    state: str
    exit_code: int | None = None
    instances_version: int | None = None


class InstanceList(Wire):
    instances: list[InstanceInfo]
    instances_version: int | None = None


class WarmRequest(WireModel):
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    source: NodePath
    tier: CacheTier = "nvme"
    # Only one rank's slices (hpcllm.tp.slicecache) of a tensor_parallel = N instance, instead of the whole model.
    tensor_parallel: int | None = Field(None, ge=2, le=64)
    rank: int | None = Field(None, ge=0, lt=64)


class VerifyRequest(WireModel):
    model: str | None = Field(None, pattern=MODEL_NAME_PATTERN)


class CachedCopyInfo(Wire):
    model: str
    tier: CacheTier
    path: str
    bytes: int
    last_used: float
    verified: bool
    in_use: int
    tensor_parallel: int | None = None  # a slice copy: rank `rank` of a tensor_parallel = N instance's slices
    rank: int | None = None


class CacheList(Wire):
    cached: list[CachedCopyInfo]


# What verify did with a copy (CacheManager's VerifyResult.action): ok; refilled (corrupt, refilled from its origin);
# dropped (corrupt and the origin could not refill it); kept-in-use (corrupt, an instance still reads it);
# unchecked (a slice copy whose origin cannot be read)
VerifyAction = Literal["ok", "refilled", "dropped", "kept-in-use", "unchecked"]


class VerifyResultInfo(Wire):
    model: str
    tier: str
    ok: bool
    action: VerifyAction
    message: str = ""


class VerifyResults(Wire):
    results: list[VerifyResultInfo]


class NodeInfo(Wire):
    state: Literal["starting", "up", "draining", "stopped"]
    registration: NodeRegistration
    notes: list[str] = Field(default_factory=list)


class SetLoraAdapters(WireModel):
    """The adapters an instance's worker should serve from now on (its model's lora_adapters after a redeploy)."""

    lora_adapters: LoraAdapterFolders = Field(max_length=256)


class MigrateOut(WireModel):
    """Move every running request of one instance to the worker at destination_url, then stop the instance."""

    destination_url: HttpUrl = Field(description="a ready worker of the same model")
    ticket: MigrationTicket | None = None  # the controller's, naming this instance and destination_url
