"""Wire types of the controller's HTTP API (the controller owns them; node agents, the gateway and the CLI import them).

Every body is validated with these pydantic models; unknown fields are rejected so a typo in a client is an error
that names the field, and the bodies it takes are strict (httpkit.wire.WireModel): "2" is no GPU count and "yes" no
boolean, and a Unix time is at most a day ahead of the controller's clock (httpkit.wire.UnixTime). A body above
MAX_REQUEST_BYTES is a 413 request_too_large; an unknown path a 404 unknown_url. See docs/controller.md for the
endpoints and status codes.

Internal endpoints (header `X-Hpcllm-Secret: <cluster.shared_secret>`, or `X-Hpcllm-Token: <node token>` for the
agents' calls: register, heartbeat, models, migration-target; docs/security.md):
    POST /v1/internal/nodes/register             NodeRegistration -> RegisterResponse
    POST /v1/internal/nodes/<node_id>/heartbeat  Heartbeat -> HeartbeatResponse (404 unknown_node: register again)
    GET  /v1/internal/route?model=NAME&wait=S&group=G  200 RouteReady | 202 RouteWaiting | 404 | 503 no_capacity or
                                                 allocation_failed (+ Retry-After) | 503 no_capacity_possible (never
                                                 any capacity: no Retry-After; codes: hpcllm.controller.errors)
    GET  /v1/internal/models                     ModelList (deployed models, for the gateway's /v1/models; a pool
                                                 token gets its own model's card only)
    POST /v1/internal/migration-target           MigrationTargetRequest -> 200 MigrationTarget | 202 RouteWaiting
                                                 (+ Retry-After) | 404 no_migration_target
    GET  /health                                 200 {"status": "ok"} while the database answers (no secret)
Admin endpoints (header `Authorization: Bearer <admin key>`):
    POST   /v1/admin/models          ModelSpec -> DeployedModel (201 new, 200 updated)
    DELETE /v1/admin/models/<name>   -> {"undeployed": name, "stopped_instances": n}
    GET    /v1/admin/status          -> ClusterStatus
    POST   /v1/admin/pool-tokens     PoolTokenRequest -> 201 IssuedPoolToken (the token, once)
    GET    /v1/admin/credentials     -> CredentialList;  DELETE /v1/admin/credentials/<id> -> CredentialInfo
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from hpcllm.config import MODEL_NAME_PATTERN, EngineName, ToolCallFormat
from hpcllm.credentials import MigrationTicket
from hpcllm.httpkit.wire import UnixTime, WireModel
from hpcllm.config import WALLTIME_PATTERN
from hpcllm.slurm.base import JOB_ID_PATTERN, SLURM_TOKEN_PATTERN
from hpcllm.worker.protocol import LoadLoraAdapter, MigrationFailure, MigrationResult, UnloadLoraAdapter


Tier = Literal["dram", "nvme", "sharedfs"]
CacheTier = Literal["dram", "nvme"]
InstanceState = Literal["loading", "ready", "draining", "stopped", "failed"]


MAX_INSTANCES = 10_000  # of one model: far beyond any cluster, and a number the registry and the autoscaler take
# The largest integer SQLite stores (the registry's columns): a byte count beyond it is no byte count.
INT64_MAX = 2**63 - 1
# A node as its agent names it (the Slurm node name): in registrations, heartbeat URLs, ranks' nodes, exclude_node.
NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
NodeId = Annotated[str, Field(min_length=1, max_length=256, pattern=NODE_ID_PATTERN)]
# An instance as its node agent names it (hpcllm.node.workers: MODEL-8 hex digits). No ':', so no reported instance
# can pass for one of the registry's reservations (registry.store.RESERVED_PREFIX).
INSTANCE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,255}$"
InstanceId = Annotated[str, Field(pattern=INSTANCE_ID_PATTERN)]
MAX_NODE_GPUS = 1024  # GPUs one node registers with: GPU ids are 0..MAX_NODE_GPUS-1
# What one heartbeat (or registration) may list: far beyond any node (an instance holds a GPU or a CPU slot; a cache
# entry is a model's copy in a tier, or one rank's slices), and what bounds a heartbeat's body (MAX_REQUEST_BYTES).
MAX_NODE_INSTANCES = 1024
MAX_CACHE_ENTRIES = 10_000
MAX_ERROR_CHARS = 2000  # an instance's error as kept (a worker's log tail can be any length): the rest is cut
MAX_URL_CHARS = 2048
# Measured rates an agent reports, which placement and the migration-cost estimate divide by: far beyond any node
# (HBM is a few TB/s), so a made-up one cannot make a node's loads or migrations look free.
MAX_GBPS = 100_000.0
MAX_TOKENS_PER_SECOND = 1e9
MAX_SLURM_TOKEN_CHARS = 256  # a partition, account or QOS name (Slurm's own are far shorter)
# The largest request body the controller reads (413 request_too_large beyond; internal_http.max_request_bytes can
# only lower it). The largest legitimate one is a heartbeat or registration at the bounds above: MAX_CACHE_ENTRIES
# entries of ~300 bytes (3 MB) and MAX_NODE_INSTANCES instances of at most ~7 KB each (a 2,000-character error, 64
# ranks' nodes) - about 10 MB (test_hardening checks it fits); a deploy is a few KB.
MAX_REQUEST_BYTES = 16 * 1024 * 1024


def _cut_error(text: str | None) -> str | None:
    return text if text is None or len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


class Wire(BaseModel):
    # The controller's answers (and what its clients read back); the bodies it takes are WireModel, strict.
    # JSON has no Infinity or NaN, but Python's parser takes them (and 1e400 is inf): refused on every message, or
    # one registration with an infinite bandwidth is stored as null and fails every later read of the registry.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def not_an_answer(answer: type[BaseModel], body: object) -> str | None:
    """Why `body` is not an `answer` from an hpcllm service, or None. Only the top level's required fields are
    checked, and fields this version does not know are allowed: a newer controller or agent may add some."""
    if not isinstance(body, dict):
        return f"a JSON {type(body).__name__}, not an object"
    missing = [name for name, field in answer.model_fields.items() if field.is_required() and name not in body]
    return f"{missing[0]}: Field required" if missing else None


# ------------------------------------------------------------------------------------------------ node agent -> us


class TierInfo(WireModel):
    capacity_bytes: int | None = Field(None, ge=0, le=INT64_MAX)
    read_gbps: float = Field(gt=0, le=MAX_GBPS, description="measured sequential read bandwidth, GB/s (1e9 bytes/s)")
    # Only meaningful for nvme: "persistent" node-local disk survives the Slurm job, "job" scratch does not.
    scope: Literal["persistent", "job"] | None = None


class Tiers(WireModel):
    dram: TierInfo | None = None
    nvme: TierInfo | None = None
    sharedfs: TierInfo | None = None


class CacheEntry(WireModel):
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    tier: CacheTier
    bytes: int = Field(ge=0, le=INT64_MAX)
    verified: bool = False
    last_used: UnixTime = 0.0
    # A slice copy (`hpcllm cache warm --tensor-parallel`): only rank `rank` of a tensor_parallel = N instance's
    # slices of the model, on NVMe. A rank placed on this node reads them from there (placement counts it).
    tensor_parallel: int | None = Field(None, ge=2, le=64)
    rank: int | None = Field(None, ge=0, lt=64)

    @model_validator(mode="after")
    def _slice_copy_is_one_nvme_rank(self) -> CacheEntry:
        if (self.tensor_parallel is None) != (self.rank is None) or (
                self.tensor_parallel is not None and (self.tier != "nvme" or self.rank >= self.tensor_parallel)):
            raise ValueError("a slice copy has tier nvme, tensor_parallel N and a rank 0..N-1; a whole copy neither")
        return self


# An agent process's id (AgentProcess): a registration and the heartbeats of the process that sent it carry the same.
AGENT_PROCESS_PATTERN = r"^[0-9a-f]{32}$"


class NodeRegistration(WireModel):
    node_id: NodeId = Field(description="the Slurm node name")
    agent_url: str = Field(pattern=r"^https?://", max_length=MAX_URL_CHARS)
    slurm_job_id: str | None = Field(None, pattern=JOB_ID_PATTERN, max_length=64)
    job_scoped: bool = True
    gpus: int = Field(0, ge=0, le=MAX_NODE_GPUS)
    tiers: Tiers = Field(default_factory=Tiers)
    h2d_gbps: float | None = Field(None, gt=0, le=MAX_GBPS)
    cached: list[CacheEntry] = Field(default_factory=list, max_length=MAX_CACHE_ENTRIES)
    # A group's model pool (`hpcllm node --model NAME`): the agent keeps NAME running here for its job's whole life.
    # The controller routes to its instances but never places anything on the node, never moves or evicts its
    # instances, and never stops them for idleness.
    pool_model: str | None = Field(None, pattern=MODEL_NAME_PATTERN)
    # The agent process registering (new at each start of `hpcllm node`): only its heartbeats count for the node
    # until the next registration, not a late one of the process before it (a restart). None: an agent older than
    # process ids; its heartbeats are taken as the registered one's.
    agent_process: str | None = Field(None, pattern=AGENT_PROCESS_PATTERN)


class InstanceInfo(WireModel):
    instance_id: InstanceId
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    state: InstanceState
    worker_url: str | None = Field(None, pattern=r"^https?://", max_length=MAX_URL_CHARS)
    gpu_ids: list[Annotated[int, Field(ge=0, lt=MAX_NODE_GPUS)]] = Field(default_factory=list,
                                                                          max_length=MAX_NODE_GPUS)
    running_requests: int = Field(0, ge=0, le=INT64_MAX)
    started_at: UnixTime = 0.0
    load_tier: Tier | None = None
    load_seconds: float | None = Field(None, ge=0)
    # Optional inputs to the migration-cost estimate: tokens the running requests hold (to recompute on another
    # instance) and the prefill rate the worker measured.
    tokens_in_flight: int | None = Field(None, ge=0, le=INT64_MAX)
    prefill_tokens_per_second: float | None = Field(None, gt=0, le=MAX_TOKENS_PER_SECOND)
    error: Annotated[str | None, AfterValidator(_cut_error)] = None
    # Tensor parallelism: the instance's ranks, and the node each rank runs on where the agent knows it.
    tensor_parallel: int = Field(1, ge=1, le=64)
    rank_nodes: list[NodeId] = Field(default_factory=list, max_length=64)
    # Where each rank read its slices (its node's slice copy: nvme), once the lead reported its ranks' loads.
    rank_tiers: list[Tier] = Field(default_factory=list, max_length=64)


class Heartbeat(WireModel):
    cached: list[CacheEntry] = Field(default_factory=list, max_length=MAX_CACHE_ENTRIES)
    instances: list[InstanceInfo] = Field(default_factory=list, max_length=MAX_NODE_INSTANCES)
    # The agent is draining (Slurm's signal: preemption, time limit): nothing new is placed or routed there.
    draining: bool = False
    # The node's tiers measured again (its agent probed them in the background after registering with saved rates,
    # or its read sweep ended): they replace the registration's tiers and h2d_gbps (null there: none measured).
    tiers: Tiers | None = None
    h2d_gbps: float | None = Field(None, gt=0, le=MAX_GBPS)
    # A model pool's Slurm job ends then (Unix time, as Slurm says now: `scontrol update TimeLimit` moves it); None:
    # no time limit, or not known. The controller hands the pool over before it (docs/controller.md "Model pools").
    job_end: float | None = Field(None, gt=0)
    # The version of the agent's instance list these instances are: one more with each instance it adds or removes
    # or whose state or worker URL changes, and its start and stop answers say the version they made. A report
    # older than a start or stop the controller had the agent make, or than a report already applied, is told by it,
    # however late it arrives (AgentChanges); None: an agent older than versions.
    instances_version: int | None = Field(None, ge=0, le=INT64_MAX)
    # The agent process sending it (NodeRegistration.agent_process); None: an agent older than process ids.
    agent_process: str | None = Field(None, pattern=AGENT_PROCESS_PATTERN)

    @model_validator(mode="after")
    def _h2d_with_the_tiers(self) -> Heartbeat:
        if self.h2d_gbps is not None and self.tiers is None:
            raise ValueError("h2d_gbps comes with the tiers it was measured with: send tiers too")
        return self

    @field_validator("instances")
    @classmethod
    def _one_report_per_instance(cls, instances: list[InstanceInfo]) -> list[InstanceInfo]:
        first: dict[str, int] = {}
        for i, info in enumerate(instances):
            if info.instance_id in first:  # the registry would take both as new: one instance, two rows
                raise ValueError(f"instance {info.instance_id!r} is listed twice (instances {first[info.instance_id]}"
                                 f" and {i}); report each instance once")
            first[info.instance_id] = i
        return instances


class RegisterResponse(Wire):
    node_id: str
    heartbeat_seconds: float
    # For an agent that registered with a token (docs/security.md): the key its own API and its workers accept, and
    # that it uses to call them (the controller and the gateway derive the same). None: keep the cluster secret.
    node_key: str | None = None


class HeartbeatResponse(Wire):
    node_id: str
    state: str


# ---------------------------------------------------------------------------------------------- gateway <-> route


class RouteReady(Wire):
    status: Literal["ready"] = "ready"
    model: str
    instance_id: str
    worker_url: str
    node_id: str
    # How the instance was loaded (its cold start), so the gateway can report it.
    load_tier: str | None = None
    load_seconds: float | None = None
    # The key the worker accepts (a token-registered node's node key); None: the cluster secret.
    worker_key: str | None = None
    # A model pool's node (a group's, or a shared one): its token may be revoked at any time, so a gateway serves
    # it from the routes it remembers for a controller outage only briefly (gateway.known_pool_route_ttl_seconds).
    pool: bool = False


class RouteWaiting(Wire):
    # "starting": an instance is loading on a node; "allocating": a Slurm allocation that will host it is pending;
    # "waiting": the chosen node has room once instances there have served controller.min_residency_seconds.
    status: Literal["starting", "allocating", "waiting"]
    model: str
    retry_after: float
    instance_id: str | None = None
    node_id: str | None = None
    job_id: str | None = None


# ------------------------------------------------------------------------------------ live migration (node agents)


class MigrationTargetRequest(WireModel):
    """Where should the running requests of an instance of `model` go? (A draining node agent asks.)"""

    model: str = Field(pattern=MODEL_NAME_PATTERN)
    # "" is no node: it would exclude none, and a target could be picked on the draining node itself.
    exclude_node: NodeId | None = Field(None, description="the asking node: its own instances are leaving too")
    instance_id: InstanceId | None = Field(None, description="the instance whose requests move (named in the "
                                                             "ticket)")
    # No ready instance elsewhere: start one through placement and answer 202 while it loads.
    start_if_missing: bool = True


class MigrationTarget(Wire):
    """A ready instance of the model on another routable node (the least loaded; ties by instance id), with the
    ticket the source worker needs to move requests there (hpcllm.credentials.MigrationTicket)."""

    worker_url: str
    instance_id: str
    node_id: str
    ticket: MigrationTicket | None = None


# ----------------------------------------------------------------------------------------------- admin (CLI) -> us


class SlurmOverrides(WireModel):
    # What sbatch would refuse (or a newline that would end a #SBATCH line) is refused at deploy, not at the first
    # allocation the model needs.
    partition: str | None = Field(None, pattern=SLURM_TOKEN_PATTERN, max_length=MAX_SLURM_TOKEN_CHARS)
    account: str | None = Field(None, pattern=SLURM_TOKEN_PATTERN, max_length=MAX_SLURM_TOKEN_CHARS)
    qos: str | None = Field(None, pattern=SLURM_TOKEN_PATTERN, max_length=MAX_SLURM_TOKEN_CHARS)
    time: str | None = Field(None, pattern=WALLTIME_PATTERN, max_length=32,
                             description="walltime of allocations for this model")


class ModelSpec(WireModel):
    """A model config (conf/models/NAME.toml) as deployed; also the body of POST /v1/admin/models.

    Its numbers are strict: "2" or true for gpus is refused, not read as 2 or 1 (TOML and the CLI give real numbers;
    an integer is still a float's value)."""

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    source: str = Field(min_length=1, description="converted checkpoint folder on the shared filesystem")
    size_bytes: int | None = Field(None, gt=0, le=INT64_MAX,
                                   description="only needed when the source has no manifest.json")
    gpus: int = Field(0, ge=0, le=64, description="GPUs per instance; 0 serves on CPU")
    tensor_parallel: int = Field(1, ge=1, le=64,
                                 description="ranks one instance runs on (GPUs, or CPU ranks when "
                                             "gpus = 0); each holds 1/N of the model")
    nodes: int | None = Field(None, ge=1, le=64, description="nodes one instance's ranks spread over, "
                              "tensor_parallel / nodes ranks on each (one Slurm allocation of that many nodes, "
                              "ranks started with srun --mpi=pmix); default: 1, or as many as the ranks need when "
                              "one node cannot hold them (docs/tensor-parallel.md)")
    max_model_len: int | None = Field(None, gt=0)
    engine: EngineName = Field("hpcllm", description='"vllm" serves it with vLLM (worker.vllm_python)')
    keep_alive_seconds: float | None = Field(None, ge=0, description="idle time before scale-to-zero")
    cache_on_load: list[CacheTier] | None = Field(None, max_length=len(get_args(CacheTier)),
                                                  description="tiers a load from a slower one fills; "
                                                  "default: the node's node.cache_on_load; [] never")
    min_instances: int = Field(0, ge=0, le=MAX_INSTANCES)
    max_instances: int = Field(1, ge=1, le=MAX_INSTANCES)
    slurm: SlurmOverrides = Field(default_factory=SlurmOverrides)
    tool_call_parser: ToolCallFormat | None = Field(None, description="how the model writes tool calls, for the "
                                                    "gateway; default: read from its chat template")
    lora_adapters: dict[Annotated[str, Field(pattern=MODEL_NAME_PATTERN)], str] = Field(
        default_factory=dict, max_length=256,
        description="PEFT LoRA adapters every instance serves on this base model: name -> adapter folder on the "
                    "shared filesystem; a request for model NAME runs the base model with that adapter")

    @model_validator(mode="after")
    def _adapters_served_here(self) -> ModelSpec:
        if not self.lora_adapters:
            return self
        if self.name in self.lora_adapters:
            raise ValueError(f"lora_adapters: adapter {self.name!r} has the model's own name; requests name either")
        if self.tensor_parallel > 1:
            raise ValueError("lora_adapters are not served with tensor_parallel > 1 yet: deploy the adapters on a "
                             "tensor_parallel = 1 model")
        return self

    @model_validator(mode="after")
    def _engine_runs_the_ranks(self) -> ModelSpec:
        if self.engine != "hpcllm" and self.tensor_parallel > 1:  # the agent would refuse every start of it
            raise ValueError(f"tensor_parallel = {self.tensor_parallel} runs on hpcllm's engine only, not engine = "
                             f"{self.engine!r}: deploy with engine = \"hpcllm\", or tensor_parallel = 1")
        return self

    @model_validator(mode="after")
    def _gpus_fit_ranks(self) -> ModelSpec:
        if self.gpus and self.gpus % self.tensor_parallel:
            raise ValueError(f"gpus ({self.gpus}) must be a multiple of tensor_parallel ({self.tensor_parallel}): "
                             f"every rank gets gpus / tensor_parallel GPUs")
        if self.nodes is not None and self.nodes > 1 and self.tensor_parallel % self.nodes:
            raise ValueError(f"tensor_parallel ({self.tensor_parallel}) must be a multiple of nodes ({self.nodes}): "
                             f"every node runs tensor_parallel / nodes ranks")
        return self

    @model_validator(mode="after")
    def _min_not_above_max(self) -> ModelSpec:
        if self.min_instances > self.max_instances:
            raise ValueError(f"min_instances ({self.min_instances}) must not exceed max_instances "
                             f"({self.max_instances})")
        return self


class AdminLoadLoraAdapter(LoadLoraAdapter):
    """POST /v1/admin/load_lora_adapter (vLLM's body, and the model to serve it on): a redeploy of base_model with
    one more adapter. base_model may be left out when one model is deployed."""

    base_model: str | None = Field(None, pattern=MODEL_NAME_PATTERN)


class AdminUnloadLoraAdapter(UnloadLoraAdapter):
    """POST /v1/admin/unload_lora_adapter: a redeploy of the model serving lora_name without it."""

    base_model: str | None = Field(None, pattern=MODEL_NAME_PATTERN)


class DeployedModel(ModelSpec):
    size_bytes: int = Field(gt=0)
    deployed_at: float
    # tensor_parallel > 1: bytes each rank reads (planned from the checkpoint at deploy: ~size / N plus the replicated
    # tensors); placement's load estimate is the slowest rank's. None: every rank counts as reading the whole model.
    rank_bytes: list[int] | None = None
    nodes: int = Field(1, ge=1, le=64, description="nodes per instance as resolved at deploy")

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel // self.nodes

    @property
    def spans_nodes(self) -> bool:
        """An instance of this model runs in an allocation of its own, its ranks across several nodes."""
        return self.nodes > 1


class ModelCard(Wire):
    """What the gateway needs to know about a deployed model (GET /v1/internal/models)."""

    name: str
    source: str
    max_model_len: int | None
    gpus: int
    size_bytes: int
    created_at: float
    engine: EngineName = "hpcllm"
    tensor_parallel: int = 1
    nodes: int = 1
    lora_adapters: dict[str, str] = Field(default_factory=dict)  # name -> folder; each is served as a model too
    tool_call_parser: ToolCallFormat | None = None


class ModelList(Wire):
    models: list[ModelCard]


class PlacementBreakdown(Wire):
    """Why a node was chosen: the startup estimate and its parts (seconds)."""

    node: str
    kind: Literal["running", "pending", "idle", "residency"]
    total_seconds: float
    queue_wait_seconds: float
    load_seconds: float
    migration_seconds: float
    tier: Tier
    bandwidth_gbps: float
    migrate: list[str] = Field(default_factory=list)
    considered: int = 0
    # Where the queue wait comes from: "agent up", "residency", "slurm test-only" / "slurm squeue --start" (Slurm's
    # own estimate), "job started" (agent starting), "constant" (controller.allocation_start_estimate_seconds).
    queue_wait_source: str | None = None
    # A tensor-parallel model: the rank whose load takes longest (load_seconds, tier and bandwidth are its).
    slowest_rank: int | None = None
    # What the start costs beyond reading bytes (worker process start; srun, MPI and every rank's imports for a
    # tensor-parallel model), learned from recent cold starts (docs/placement.md "Start cost"); in total_seconds.
    start_seconds: float = 0.0


class NodeStatus(Wire):
    node_id: str
    state: str
    agent_url: str
    slurm_job_id: str | None
    job_scoped: bool
    gpus: int
    free_gpus: int
    tiers: Tiers
    last_heartbeat: float | None
    cached: list[CacheEntry]
    pool_model: str | None = None  # a model pool's node: the model its agent keeps running (never placed on)
    # What its agent registered with (None/"cluster": the secret; else a token's id, from which the operator's
    # tools derive the node key: hpcllm.credentials.worker_key), and the one group it serves (a group's pool).
    credential_id: str | None = None
    serves_group: str | None = None
    # A model pool's: when its Slurm job ends (its agent's report), and from job_end - retire_lead_seconds the phase
    # "retiring, replacement starting" until it hands over (then its state is draining).
    job_end: float | None = None
    phase: str | None = None


class InstanceStatus(Wire):
    instance_id: str
    model: str
    node_id: str
    state: str
    worker_url: str | None
    gpu_ids: list[int]
    running_requests: int
    last_used: float
    load_tier: str | None
    load_seconds: float | None
    placement: PlacementBreakdown | None = None  # why this node: the estimate placement chose it by
    # What its worker reported last, and what placement would count for moving it off its node now (seconds;
    # None while it is not ready: placement moves only ready instances).
    tokens_in_flight: int | None = None
    prefill_tokens_per_second: float | None = None
    move_seconds: float | None = None
    tensor_parallel: int = 1  # ranks of the instance
    rank_nodes: list[str] = Field(default_factory=list)  # node of each rank, where its agent reported them
    rank_tiers: list[str] = Field(default_factory=list)  # where each rank read its slices (nvme: its slice copy)


class AllocationStatus(Wire):
    job_id: str
    state: str
    model: str | None
    nodes: list[str]
    preferred_nodes: list[str]
    submitted_at: float
    started_at: float | None
    walltime_end: float | None
    retire_at: float | None
    reason: str | None
    # Why Slurm keeps it queued (squeue's REASON, e.g. Resources, QOSMaxJobsPerUserLimit), as of the last poll.
    pending_reason: str | None = None
    # Until its agent registers: the estimated seconds until it could take an instance, and where that comes from
    # (PlacementBreakdown.queue_wait_source).
    queue_wait_seconds: float | None = None
    queue_wait_source: str | None = None
    # Past retire_at, serving while replacements of its instances start elsewhere: "retiring, replacement
    # starting", and the latest time it drains (replacements ready or not); None otherwise.
    phase: str | None = None
    drain_deadline: float | None = None


class ColdStart(Wire):
    model: str
    node_id: str
    instance_id: str
    tier: str | None
    load_seconds: float | None
    requested_at: float
    ready_at: float | None
    estimate_seconds: float | None
    # The placement's candidate kind ("running": the agent was up) and estimated queue wait and migration, and the
    # model's ranks: what the learned start cost needs (hpcllm.controller.placement.StartCosts). None: not recorded.
    placement_kind: str | None = None
    queue_wait_seconds: float | None = None
    migration_seconds: float | None = None
    tensor_parallel: int = 1


class MigrationEvent(Wire):
    """A move of running requests off an instance (hpcllm.controller.registry.MigrationRecord)."""

    at: float
    model: str
    instance_id: str
    node_id: str
    trigger: str
    outcome: str
    target_instance: str | None = None
    moved: int = 0
    not_moved: int = 0
    seconds: float = 0.0
    error: str | None = None


class InstanceFailure(Wire):
    """An instance its node agent reported failed (a load that failed, a vLLM that cannot be imported or start):
    the agent's reason, kept for `hpcllm status` after the instance itself is gone from the registry."""

    instance_id: str
    model: str
    node_id: str
    error: str | None
    failed_at: float


class ClusterStatus(Wire):
    now: float
    models: list[DeployedModel]
    nodes: list[NodeStatus]
    instances: list[InstanceStatus]
    allocations: list[AllocationStatus]
    cold_starts: list[ColdStart]
    migrations: list[MigrationEvent] = Field(default_factory=list)
    # The latest instance failures reported to this controller process (newest first, at most RECENT_FAILURES).
    failed_instances: list[InstanceFailure] = Field(default_factory=list)


class PoolTokenRequest(WireModel):
    """An admin issues a pool token: it registers pools of `model` that serve only `group`'s API keys (every key
    with shared = true)."""

    model: str = Field(pattern=MODEL_NAME_PATTERN)
    group: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    shared: bool = False  # it decides whose requests a pool serves: "yes" or 1 is no answer
    note: str | None = Field(None, max_length=500)


class CredentialInfo(Wire):
    credential_id: str
    kind: str
    model: str | None = None
    group: str | None = None
    shared: bool = False
    job_id: str | None = None
    created_at: float
    revoked_at: float | None = None
    note: str | None = None


class IssuedPoolToken(CredentialInfo):
    token: str  # shown once: only its hash is stored


class CredentialList(Wire):
    credentials: list[CredentialInfo]


class UndeployResult(Wire):
    undeployed: str
    stopped_instances: int


# ------------------------------------------------------------------------------------ node agent's answers to us
# The node agent's answer to POST /v1/internal/instances/<id>/migrate-out (hpcllm.node.protocol): defined here,
# where the controller reads it, because the node package imports the controller's wire types, never the reverse.


class AdapterFailure(Wire):
    status: int  # the worker's HTTP status (400: the adapter cannot be served on this model; 0: no answer)
    message: str


class LoraAdaptersApplied(Wire):
    """A node agent's answer to PUT .../lora-adapters (a redeploy's adapters pushed to a running instance): what its
    worker serves now, and the adapters it could not load or unload. pending: the worker still loads its model;
    the agent applies the adapters once it is ready, and stops it (failed, with the reason) if that fails."""

    instance_id: str
    lora_adapters: dict[str, str] = Field(default_factory=dict)
    failed: dict[str, AdapterFailure] = Field(default_factory=dict)
    pending: bool = False

    def failures(self) -> str:
        """The failed adapters and why, for a log line or an instance's error."""
        return "; ".join(f"{name}: {failure.message}" for name, failure in sorted(self.failed.items()))


class MigratedOut(Wire):
    """What migrate-out did. `migrated`/`failed` are the source worker's own answer (POST /v1/internal/migrate);
    `error` says why the migration call as a whole failed. Requests that were not migrated were aborted when the
    instance stopped: the gateway resumes them from their tokens."""

    instance_id: str
    model: str
    destination_url: str
    migrated: list[MigrationResult] = Field(default_factory=list)
    failed: list[MigrationFailure] = Field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    state: str = "stopped"
    exit_code: int | None = None
