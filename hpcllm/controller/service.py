"""The controller's logic, independent of HTTP: deploy, node registration and heartbeats, routing with cold starts.

app.py maps HTTP onto this class; autoscaler.py calls it on a timer. All state lives in the Registry (SQLite), so a
restarted controller picks up where the killed one stopped; `reconcile()` then re-reads Slurm and the node agents.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from hpcllm.checkpoint import MANIFEST_FILE, CheckpointError, read_checkpoint
from hpcllm.checkpoint.context import CONFIG_FILE, ContextLengthError, source_max_model_len
from hpcllm.config import Config
from hpcllm.controller.agents import AgentClient, adapters_timeout
from hpcllm.controller.allocations import Allocator
from hpcllm.controller.errors import (
    AgentError,
    ControllerError,
    InvalidModelConfig,
    InvalidRequest,
    JobNotLocated,
    NoCapacity,
    NoCapacityPossible,
    NodeTaken,
    AllocationFailed,
    AllocationRefused,
    TooManyTickets,
    UnknownCredential,
    UnknownModel,
)
from hpcllm.controller.placement import (
    ANY_NODES,
    MovableInstance,
    NodeCandidate,
    NodeSetCandidate,
    StartCosts,
    StartOverhead,
    learn_start_costs,
    load_time,
    node_sets_to_ask,
    place,
    place_spanning,
    slice_holding,
    slurm_order,
    start_kind,
)
from hpcllm.controller.protocol import (
    AdminLoadLoraAdapter,
    AdminUnloadLoraAdapter,
    AllocationStatus,
    CacheEntry,
    ClusterStatus,
    ColdStart,
    CredentialInfo,
    MigrationEvent,
    DeployedModel,
    Heartbeat,
    HeartbeatResponse,
    InstanceFailure,
    InstanceInfo,
    InstanceStatus,
    IssuedPoolToken,
    LoraAdaptersApplied,
    MigrationTarget,
    MigrationTargetRequest,
    ModelCard,
    ModelSpec,
    NodeRegistration,
    NodeStatus,
    PlacementBreakdown,
    PoolTokenRequest,
    RegisterResponse,
    RouteReady,
    RouteWaiting,
    UndeployResult,
)
from hpcllm.controller.registry import (
    AllocationRecord,
    CredentialRecord,
    InstanceRecord,
    MigrationRecord,
    NodeRecord,
    Registry,
    check_agent_process,
)
from hpcllm.credentials import (
    CLUSTER,
    MAX_TICKET_REQUESTS,
    TICKET_SECONDS,
    CredentialError,
    MigrationTicket,
    Principal,
    check_models,
    check_node_owner,
    check_registration,
    issue_ticket,
    mint_token,
    on_cluster_secret,
    parse_token,
    secret_matches,
    visible_to,
    worker_key,
)
from hpcllm.httpkit.errors import validation_message
from hpcllm.slurm.base import parse_walltime
from hpcllm.worker.lora_config import AdapterError, read_adapter_config

log = logging.getLogger(__name__)

# Agents asked at once to change their instances' adapters (a redeploy waits for the slowest).
ADAPTER_PUSH_THREADS = 16

ROUTABLE_NODE_STATES = ("up",)
RECENT_FAILURES = 20  # instance failures `hpcllm status` lists
ANY_NODE = "*"  # placement candidate: a new allocation on whichever node Slurm picks
# AllocationStatus.phase of an allocation past its retire_at that has not drained yet (is_retiring).
RETIRING_PHASE = "retiring, replacement starting"
START_COSTS_TTL_SECONDS = 30.0  # learned start costs are re-read from the registry at most this often
MAX_LIVE_TICKETS = 4  # live migration tickets a node token may hold for one instance (_count_ticket)
AGENT_CHANGES_REMEMBERED = 10_000  # instance starts and stops a heartbeat may not know yet (AgentChanges)
# How long past two heartbeat periods a stop is remembered for an agent that sends no instance-list version: a
# heartbeat built before it may still be on its way (the agent's POST times out after 10 s) or waiting for the
# registry.
STALE_REPORT_MARGIN_SECONDS = 30.0


class NoMigrationTarget(ControllerError):
    """No ready instance of the model on another node (and none is starting): requests resume from their tokens."""

    http_status = 404
    code = "no_migration_target"
    error_type = "invalid_request_error"


@dataclass(frozen=True)
class AgentChange:
    at: float  # when the agent confirmed it
    node_id: str
    version: int | None  # the agent's instance-list version with the change made (None: an agent without versions)


class AgentChanges:
    """The instance starts and stops this controller made through node agents, which a heartbeat built before it
    arrived may not know yet. Kept in memory (newest last, with the node; bounded): after a restart reconcile reads
    every agent's list. A node's are forgotten when its agent registers again (a new process: its instance ids may
    be reused; its versions go on from the clock, above the old process's: first_instances_version).
    - Stopped (or migrated out, which stops them): an agent never reports a stopped instance again, so a heartbeat
      listing one alive that was built before the stop is stale, not a resurrection.
    - Started: a heartbeat that lacks the instance may have been built before the agent took the start (however
      long the start took).
    Which heartbeat was built before a change: one whose instance-list version (Heartbeat.instances_version) is
    older than the change's, however late it arrives. An agent without versions: one within a while of the change
    (started_after / stopped_after, by when the agent confirmed it); those changes are forgotten after that while.
    And the newest version of each node's reports applied (newer_report): an older one was overtaken on its way."""

    def __init__(self, limit: int = AGENT_CHANGES_REMEMBERED):
        self._stopped: OrderedDict[str, AgentChange] = OrderedDict()  # instance id -> its stop
        self._confirmed: OrderedDict[str, AgentChange] = OrderedDict()
        # node id -> the newest instance-list version applied and when (newer_report)
        self._applied: dict[str, tuple[int, float]] = {}
        self._limit = limit
        self._lock = threading.Lock()

    def stopped(self, node_id: str, instance_id: str, at: float, version: int | None = None) -> None:
        self._remember(self._stopped, instance_id, AgentChange(at, node_id, version))

    def confirmed(self, node_id: str, instance_id: str, at: float, version: int | None = None) -> None:
        self._remember(self._confirmed, instance_id, AgentChange(at, node_id, version))

    def _remember(self, changes: OrderedDict, instance_id: str, change: AgentChange) -> None:
        with self._lock:
            changes.pop(instance_id, None)
            changes[instance_id] = change
            while len(changes) > self._limit:
                changes.popitem(last=False)

    def started_after(self, instance_id: str, report: int | None, since: float) -> bool:
        """Whether a report of instance-list version `report` (None: unversioned, arriving now) was built before
        the agent took that instance's start: older than the start's version, else the start confirmed since
        `since`."""
        return self._after(self._confirmed, instance_id, report, since)

    def stopped_after(self, instance_id: str, report: int | None, since: float) -> bool:
        """Whether a report of instance-list version `report` (None: unversioned, arriving now) was built before
        the agent stopped that instance: older than the stop's version, else the stop made since `since`."""
        return self._after(self._stopped, instance_id, report, since)

    def _after(self, changes: OrderedDict, instance_id: str, report: int | None, since: float) -> bool:
        with self._lock:
            # Unversioned changes older than the window: no report built before them arrives any more. A versioned
            # one is kept: a report older than it is told by its version whenever it comes.
            while changes and (first := next(iter(changes.values()))).version is None and first.at < since:
                changes.popitem(last=False)
            change = changes.get(instance_id)
            if change is None:
                return False
            if change.version is not None and report is not None:
                return report < change.version
            return change.at >= since

    def newer_report(self, node_id: str, report: int | None, now: float, since: float) -> bool:
        """Whether a heartbeat of instance-list version `report` arriving `now` is to be applied as the newest: no
        older than the newest one of the node's agent applied, or that one applied before `since` (a report is held
        up no longer than that; a lower count then is the agent's own: a late report of its previous process
        counted higher, an agent counting from 0, a clock stepped back; not heeded, they would silence it for
        ever). Else it was overtaken on its way (a held-up POST, a slow registry) and its list must not turn the
        later one back: an instance the agent stopped by itself alive again, a failed one ready. None (an agent
        without versions): always."""
        if report is None:
            return True
        with self._lock:
            applied = self._applied.get(node_id)
            if applied is not None and report < applied[0] and applied[1] >= since:
                return False
            self._applied[node_id] = (report, now)
            return True

    def forget_node(self, node_id: str) -> None:
        """Its agent registered again: its instance ids are new ones (a reused id is not the stopped instance)."""
        with self._lock:
            self._applied.pop(node_id, None)
            for changes in (self._stopped, self._confirmed):
                for instance_id in [i for i, change in changes.items() if change.node_id == node_id]:
                    del changes[instance_id]


@dataclass(frozen=True)
class Target:
    """What acting on a placement candidate means: start on a running node, or wait for / submit an allocation."""

    kind: str
    node: NodeRecord | None = None
    job_id: str | None = None
    slurm_node: str | None = None


class Controller:
    def __init__(self, config: Config, registry: Registry, agents: AgentClient, allocator: Allocator,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.settings = config.controller
        self.registry = registry
        self.agents = agents
        self.allocator = allocator
        self.clock = clock
        self._placement_lock = threading.Lock()
        # Draws of the "random" placement baseline (controller.placement_policy): seeded, so a bench run repeats.
        self._placement_rng = random.Random(0)
        # The learned start costs and when they were read (_start_seconds): one registry read per
        # START_COSTS_TTL_SECONDS, or after a cold start finished here, not one per placement.
        self._start_costs: tuple[float, StartCosts] | None = None
        # Woken on every registration / heartbeat so long-polling route calls re-check at once.
        self._changed = threading.Condition()
        # Called with each finished cold start (ColdStartRecord), e.g. to update metrics.
        self.cold_start_listeners: list[Callable] = []
        # Called with each instance moved off a node (MigrationRecord), e.g. to update metrics.
        self.migration_listeners: list[Callable] = []
        # Instances reported failed, by id (an agent reports one in every heartbeat until it is removed), for
        # `hpcllm status`: the registry drops failed instances, their reason would be lost otherwise.
        self._failures: OrderedDict[str, InstanceFailure] = OrderedDict()
        self._failures_lock = threading.Lock()
        # Model pools (node ids) whose agent reported a failed load since it registered (counted_instances). Apart
        # from `_failures`, which keeps only the latest: other nodes' failures must not make the pool waited for again.
        self._failed_pool_loads: set[str] = set()
        # The expiries of the live migration tickets issued to node tokens, by source instance (MAX_LIVE_TICKETS).
        self._live_tickets: dict[str, list[float]] = {}
        self._live_tickets_lock = threading.Lock()
        self._agent_changes = AgentChanges()
        # Requests the gateway sent to remembered routes while no controller ran were not seen here: keep-alive
        # counts an instance idle from its last use or from this start, whichever is later (its stored last use
        # stays, for `hpcllm status` and the order in which idle instances stop).
        self.started_at = clock()

    # ------------------------------------------------------------------------------------------------ admin

    def deploy(self, spec: ModelSpec) -> tuple[DeployedModel, bool]:
        """Validate a model config against the filesystem and Slurm, then record it (True when new)."""
        model = self.resolve_model(spec)
        previous = self.registry.get_model(model.name)
        created = self.registry.put_model(model)
        log.info("%s model %s (%d bytes, %d gpus)", "deployed" if created else "updated", model.name,
                 model.size_bytes, model.gpus)
        if previous is not None and previous.lora_adapters != model.lora_adapters:
            self._push_adapters(model, previous)
        return model, created

    def load_lora_adapter(self, req: AdminLoadLoraAdapter) -> DeployedModel:
        """vLLM's /v1/load_lora_adapter for the cluster: a redeploy of the base model with the adapter added (or its
        folder changed), checked and pushed to the running instances as any redeploy."""
        model = self._adapter_base(req.base_model, req.lora_name, loading=True)
        return self._redeploy_with(model, {**model.lora_adapters, req.lora_name: req.lora_path})

    def unload_lora_adapter(self, req: AdminUnloadLoraAdapter) -> DeployedModel:
        model = self._adapter_base(req.base_model, req.lora_name, loading=False)
        if req.lora_name not in model.lora_adapters:
            raise UnknownModel(f"model {model.name!r} serves no LoRA adapter {req.lora_name!r} (its adapters: "
                               f"{', '.join(sorted(model.lora_adapters)) or 'none'})")
        return self._redeploy_with(model, {n: f for n, f in model.lora_adapters.items() if n != req.lora_name})

    def _adapter_base(self, base_model: str | None, lora_name: str, loading: bool) -> DeployedModel:
        """The model an adapter call is for: base_model, else the one serving the adapter, else (a load) the only
        model deployed."""
        if base_model is not None:
            model = self.registry.get_model(base_model)
            if model is None:
                raise UnknownModel(f"base_model {base_model!r} is not deployed")
            return model
        models = self.registry.models()
        serving = [m for m in models if lora_name in m.lora_adapters]
        if serving:
            return serving[0]
        if loading and len(models) == 1:
            return models[0]
        if not loading:
            raise UnknownModel(f"no deployed model serves a LoRA adapter {lora_name!r}")
        raise InvalidRequest(f"{len(models)} models are deployed: name the one to serve {lora_name!r} on in "
                             "base_model", param="base_model")

    def _redeploy_with(self, model: DeployedModel, adapters: dict[str, str]) -> DeployedModel:
        try:  # the model with these adapters may not be a valid spec (an adapter named as the model, tensor_parallel)
            spec = ModelSpec.model_validate({**model.model_dump(exclude={"deployed_at", "rank_bytes", "lora_adapters"}),
                                             "lora_adapters": adapters})
        except ValidationError as exc:
            raise InvalidModelConfig(validation_message(exc)[0], param="lora_adapters") from exc
        return self.deploy(spec)[0]

    def _push_adapters(self, model: DeployedModel, previous: DeployedModel) -> None:
        """A redeploy changed the model's adapters: its running instances load the added ones and unload the
        removed ones (after the requests running with them end) through their agents, all at once, so every
        instance the gateway routes the listed adapters to serves them. An adapter a worker refuses (400: it cannot
        be served on this model) undoes the redeploy and is its error; an instance that cannot apply the change
        otherwise (its engine loads no adapter at runtime, its agent or worker does not answer) is replaced:
        stopped, its failure recorded, and the next one starts with the model's adapters."""
        timeout = adapters_timeout(previous.lora_adapters, model.lora_adapters)
        kept, refused = self._set_adapters(self._adapter_instances(model.name), model.lora_adapters, timeout)
        if refused:
            self.registry.put_model(previous)
            self._set_adapters(kept, previous.lora_adapters, timeout)
            name, message = refused
            raise InvalidModelConfig(f"lora_adapters.{name}: {message}; the model keeps its previous adapters",
                                     param="lora_adapters")

    def _set_adapters(self, instances: list[tuple[NodeRecord, InstanceRecord]], adapters: dict[str, str],
                      timeout: float) -> tuple[list[tuple[NodeRecord, InstanceRecord]], tuple[str, str] | None]:
        """The instances' adapters through their agents, asked in parallel (each may take minutes: adapters are
        read and installed one by one). Returns the instances kept (those that cannot apply them otherwise than by
        a refusal are replaced) and (name, why) of the first adapter a worker refuses to serve, if any."""
        def ask(pair: tuple[NodeRecord, InstanceRecord]) -> LoraAdaptersApplied | AgentError:
            try:
                return self.agents.set_lora_adapters(pair[0].agent_url, pair[1].instance_id, adapters, timeout)
            except AgentError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=max(1, min(len(instances), ADAPTER_PUSH_THREADS))) as pool:
            answers = list(pool.map(ask, instances))
        kept, refusals = [], []
        for (node, inst), applied in zip(instances, answers):
            if isinstance(applied, AgentError):
                self._replace_for_adapters(node, inst, str(applied))
                continue
            refused = [(name, f"instance {inst.instance_id} on {node.node_id} cannot serve it: {f.message}")
                       for name, f in sorted(applied.failed.items()) if f.status == 400]
            refusals += refused
            if applied.failed and not refused:  # replaced: not one a rollback pushes to
                self._replace_for_adapters(node, inst, applied.failures())
                continue
            kept.append((node, inst))
        return kept, refusals[0] if refusals else None

    def _adapter_instances(self, model: str) -> list[tuple[NodeRecord, InstanceRecord]]:
        """The model's instances whose worker serves or will serve (a reserved one starts with the new adapters)."""
        nodes = {n.node_id: n for n in self.registry.nodes()}
        return [(nodes[i.node_id], i) for i in self.registry.instances(model=model)
                if i.state in ("loading", "ready") and not i.reserved and i.node_id in nodes]

    def _catch_up_adapters(self, started_with: DeployedModel, node: NodeRecord, instance_id: str) -> None:
        """A redeploy that changed the adapters while this instance was being started (reserved: its push skipped
        it) reaches it now; a redeploy after the confirmation finds it among the instances."""
        current = self.registry.get_model(started_with.name)
        inst = self.registry.get_instance(instance_id)
        if current is not None and inst is not None and current.lora_adapters != started_with.lora_adapters:
            self._set_adapters([(node, inst)], current.lora_adapters,
                               adapters_timeout(started_with.lora_adapters, current.lora_adapters))

    def _replace_for_adapters(self, node: NodeRecord, inst: InstanceRecord, reason: str) -> None:
        self.registry.set_instance_state(inst.instance_id, "draining")  # no route to it from now on
        self._record_failure(node.node_id, InstanceInfo(
            instance_id=inst.instance_id, model=inst.model, state="failed",
            error=f"replaced: could not apply its model's new LoRA adapters: {reason}"))
        self._stop_one(node, inst.instance_id)
        self._notify()

    def resolve_model(self, spec: ModelSpec) -> DeployedModel:
        source = Path(spec.source)
        if not source.is_absolute():  # gateways, node agents and Slurm jobs resolve it in folders of their own
            raise InvalidModelConfig(f"source: {source} is a relative path; give the checkpoint folder's absolute "
                                     f"path on the shared filesystem", param="source")
        try:
            is_dir = source.is_dir()
        except OSError as exc:  # a name too long, a path through a file...
            raise InvalidModelConfig(f"source: {str(source)[:200]} cannot be looked up ({exc.strerror or exc})",
                                     param="source") from None
        if not is_dir:
            raise InvalidModelConfig(f"source: checkpoint folder {source} does not exist (or is not a folder)",
                                     param="source")
        if os.path.lexists(source / MANIFEST_FILE):  # a manifest that is a folder or FIFO is an error, not "absent"
            try:
                checkpoint = read_checkpoint(source)
                checkpoint.check_files_present()  # sizes only: a missing or cut-short data file fails here, not
                size_bytes = checkpoint.total_bytes  # on a node after an allocation was paid for
            except CheckpointError as exc:
                raise InvalidModelConfig(f"source: {exc}", param="source") from None
        elif spec.size_bytes is not None:
            size_bytes = spec.size_bytes
        else:
            raise InvalidModelConfig(
                f"source: {source} has no {MANIFEST_FILE}: convert it with `hpcllm convert` (or give size_bytes)",
                param="source")
        if size_bytes <= 0:
            raise InvalidModelConfig(f"source: checkpoint {source} holds no data", param="source")
        if not (source / CONFIG_FILE).is_file():
            raise InvalidModelConfig(
                f"source: {source} has no {CONFIG_FILE}: the controller reads the model's context length from it "
                f"(is {source} a checkpoint folder, readable from the controller's host?)", param="source")
        max_model_len = self._max_model_len(spec)
        self._check_adapters(spec)
        self._check_partition(spec)
        self._check_walltime(spec)
        _check_tensor_parallel(spec, source)
        return DeployedModel(**spec.model_dump(exclude={"size_bytes", "max_model_len", "nodes"}),
                             size_bytes=size_bytes, max_model_len=max_model_len, nodes=self._nodes_per_instance(spec),
                             deployed_at=self.clock(), rank_bytes=_rank_bytes(spec, source))

    def _check_adapters(self, spec: ModelSpec) -> None:
        """Adapter folders must be readable PEFT LoRA adapters the worker can serve (the worker's own config check,
        lora_config), and adapter names must not be another deployed model's or another model's adapter's: a request
        names either."""
        for name, folder in spec.lora_adapters.items():
            if not Path(folder).is_absolute():
                raise InvalidModelConfig(f"lora_adapters.{name}: {folder} is a relative path; give the adapter "
                                         f"folder's absolute path on the shared filesystem", param="lora_adapters")
            try:
                read_adapter_config(name, folder)
            except AdapterError as exc:
                raise InvalidModelConfig(f"lora_adapters.{name}: {exc}", param="lora_adapters") from None
        for other in self.registry.models():
            if other.name == spec.name:
                continue
            taken = ({other.name} | set(other.lora_adapters)) & ({spec.name} | set(spec.lora_adapters))
            if taken:
                field = "name" if spec.name in taken else "lora_adapters"
                raise InvalidModelConfig(f"{field}: {', '.join(sorted(taken))} is already a name of model "
                                         f"{other.name!r} (the model or one of its adapters); choose another",
                                         param=field)

    def _nodes_per_instance(self, spec: ModelSpec) -> int:
        """The model config's `nodes`, else 1 when one node holds the instance, else the fewest nodes that hold it:
        a tensor-parallel GPU model whose gpus exceed slurm.gpus_per_node (what an allocation gets of one node), a
        CPU one whose ranks exceed controller.cpu_slots_per_node. The ranks must split evenly over the nodes."""
        if spec.nodes is not None:
            nodes = spec.nodes
        elif spec.tensor_parallel == 1:
            nodes = 1  # one rank cannot span nodes: its allocation asks one node for all its GPUs
        elif spec.gpus:
            per_node = self.config.slurm.gpus_per_node
            nodes = -(-spec.gpus // per_node) if per_node and spec.gpus > per_node else 1
        else:
            nodes = -(-spec.tensor_parallel // self.settings.cpu_slots_per_node)
        if nodes == 1:
            self._check_cpu_slots(spec)
            return 1
        what = (f"{spec.gpus} GPUs (slurm.gpus_per_node = {self.config.slurm.gpus_per_node})" if spec.gpus
                else f"{spec.tensor_parallel} CPU ranks (controller.cpu_slots_per_node = "
                     f"{self.settings.cpu_slots_per_node})")
        if spec.tensor_parallel % nodes or spec.gpus % nodes:
            raise InvalidModelConfig(
                f"nodes: an instance of {what} needs {nodes} nodes, but tensor_parallel = {spec.tensor_parallel}"
                f"{f' and gpus = {spec.gpus}' if spec.gpus else ''} do not split evenly over {nodes} nodes; "
                f"set nodes (a divisor of tensor_parallel) or change tensor_parallel", param="nodes")
        return nodes

    def _check_cpu_slots(self, spec: ModelSpec) -> None:
        """A CPU instance on one node holds one CPU slot per rank: more ranks than a node's slots never start
        (placement would answer no capacity forever; the route-time rule is why_never_capacity)."""
        slots = self.settings.cpu_slots_per_node
        if spec.gpus or spec.tensor_parallel <= slots:
            return
        raise InvalidModelConfig(
            f"nodes: an instance of {spec.tensor_parallel} CPU ranks on one node needs {spec.tensor_parallel} CPU "
            f"slots, but a node offers {slots} (controller.cpu_slots_per_node): set nodes to a divisor of "
            f"tensor_parallel leaving at most {slots} ranks per node (or leave nodes unset), or raise "
            f"controller.cpu_slots_per_node", param="nodes")

    @staticmethod
    def _max_model_len(spec: ModelSpec) -> int:
        """The context length to serve with, read from the checkpoint's config.json on every deploy: the spec's
        max_model_len if the model supports it, the model's own without one."""
        try:
            return source_max_model_len(Path(spec.source), spec.max_model_len)
        except ContextLengthError as exc:
            raise InvalidModelConfig(f"max_model_len: {exc}", param="max_model_len") from None

    def refresh_context_lengths(self) -> None:
        """Re-derive the context length of every deployed model (run at start by reconcile).

        Registries written before deploy derived it hold none, or a max_model_len larger than the model's (the
        worker would refuse to start with it): those get the model's own, with a warning to fix the model config.
        A model whose config.json cannot be read now keeps its record (the gateway then derives it itself)."""
        for model in self.registry.models():
            source = Path(model.source)
            try:
                own = source_max_model_len(source)
            except ContextLengthError as exc:
                log.warning("model %s: cannot check its context length now: %s", model.name, exc)
                continue
            if model.max_model_len is not None:
                try:
                    source_max_model_len(source, model.max_model_len)
                    continue
                except ContextLengthError as exc:
                    log.warning("model %s: serving with the model's context length %d, not the recorded %d: %s. "
                                "Fix its model config and deploy it again", model.name, own, model.max_model_len,
                                exc)
            self.registry.put_model(model.model_copy(update={"max_model_len": own}))

    def _check_partition(self, spec: ModelSpec) -> None:
        partition = spec.slurm.partition
        if partition is None:
            return
        known = self.allocator.partitions()
        if known is None:
            log.warning("Slurm is unreachable: partition %r of model %s is not checked", partition, spec.name)
        elif partition not in known:
            raise InvalidModelConfig(
                f"slurm.partition: unknown partition {partition!r} (Slurm has: {', '.join(sorted(known)) or 'none'})",
                param="slurm.partition")

    def _check_walltime(self, spec: ModelSpec) -> None:
        """An allocation retires retire_lead_seconds before its walltime ends (make before break): one that ends
        within that and its agent's start retired as it started, and the model's demand submitted the next one,
        which did the same. Checked when the model's walltime is new (a redeploy keeping it, a LoRA load, passes);
        0 is Slurm's no time limit (no retirement)."""
        if self.allocator.why_never_submit() is not None:
            return  # no allocation is ever made for it
        previous = self.registry.get_model(spec.name)
        if previous is not None and previous.slurm.time == spec.slurm.time:
            return
        text = spec.slurm.time or self.config.slurm.time
        seconds, lead = parse_walltime(text), self.settings.retire_lead_seconds
        if 0 < seconds <= lead + self.settings.agent_start_seconds:
            named = "slurm.time" if spec.slurm.time else "slurm.time (the config's, the model gives none)"
            raise InvalidModelConfig(
                f"{named}: allocations of {text} would retire as they start: they retire "
                f"controller.retire_lead_seconds = {lead:g} s before their walltime ends, and their agent takes "
                f"controller.agent_start_seconds = {self.settings.agent_start_seconds:g} s to start. Give a longer "
                f"walltime, or lower controller.retire_lead_seconds", param="slurm.time")

    def undeploy(self, name: str) -> UndeployResult:
        removed = self.registry.delete_model(name)
        if removed is None:
            raise UnknownModel(f"model {name!r} is not deployed")
        self._stop_instances(removed)
        log.info("undeployed model %s (%d instances stopped)", name, len(removed))
        return UndeployResult(undeployed=name, stopped_instances=len(removed))

    def _stop_instances(self, instances: list[InstanceRecord]) -> None:
        """Ask node agents to stop instances (best effort: a dead agent's instances are gone anyway)."""
        nodes = {n.node_id: n for n in self.registry.nodes()}
        for inst in instances:
            node = nodes.get(inst.node_id)
            if node is None or inst.reserved:
                continue
            try:
                self.stop_on_agent(node, inst.instance_id)
            except AgentError as exc:
                log.warning("could not stop instance %s: %s", inst.instance_id, exc)

    def stop_on_agent(self, node: NodeRecord, instance_id: str) -> None:
        """Have the node's agent stop an instance (AgentError when it cannot), remembered so a heartbeat built
        before the stop does not bring the instance back (AgentChanges)."""
        version = self.agents.stop_instance(node.agent_url, instance_id)
        self._agent_changes.stopped(node.node_id, instance_id, self.clock(), version)

    def issue_pool_token(self, req: PoolTokenRequest) -> IssuedPoolToken:
        """A new pool token for one deployed model and one group (the token is in the answer, once)."""
        if self.registry.get_model(req.model) is None:
            raise UnknownModel(f"model {req.model!r} is not deployed: deploy it before issuing pool tokens for it")
        minted = mint_token("pool")
        now = self.clock()
        self.registry.add_credential(minted.credential_id, "pool", minted.secret_hash, now, model=req.model,
                                     group=req.group, shared=req.shared, note=req.note)
        log.info("issued pool token %s for model %s, group %s%s", minted.credential_id, req.model, req.group,
                 " (shared with every API key)" if req.shared else "")
        return IssuedPoolToken(**_credential_info(self.registry.get_credential(minted.credential_id)).model_dump(),
                               token=minted.token)

    def credential_infos(self) -> list[CredentialInfo]:
        return [_credential_info(c) for c in self.registry.credentials()]

    def revoke_credential(self, credential_id: str) -> CredentialInfo:
        """Revoke a token at once: its agent's next heartbeat is refused (401)."""
        if self.registry.get_credential(credential_id) is None:
            raise UnknownCredential(f"no credential {credential_id!r} (hpcllm pool token list shows them)")
        self.registry.revoke_credential(credential_id, self.clock())
        for node in self.registry.nodes(states=("up", "draining")):
            if node.credential_id == credential_id:  # no route to it from now on, not after node_timeout_seconds
                self.registry.node_left(node.node_id, "lost")
                self._notify()
        log.info("revoked credential %s", credential_id)
        return _credential_info(self.registry.get_credential(credential_id))

    def model_cards(self) -> list[ModelCard]:
        return [ModelCard(name=m.name, source=m.source, max_model_len=m.max_model_len, gpus=m.gpus,
                          size_bytes=m.size_bytes, created_at=m.deployed_at, engine=m.engine,
                          tensor_parallel=m.tensor_parallel, nodes=m.nodes, lora_adapters=m.lora_adapters,
                          tool_call_parser=m.tool_call_parser)
                for m in self.registry.models()]

    def status(self) -> ClusterStatus:
        now = self.clock()
        nodes = self.registry.nodes()
        instances = self.registry.instances()
        cache = defaultdict(list)
        for entry in self.registry.cache():
            cache[entry.node_id].append(_cache_entry(entry))
        used = defaultdict(int)
        for inst in instances:
            used[inst.node_id] += len(inst.gpu_ids)
        return ClusterStatus(
            now=now,
            models=self.registry.models(),
            nodes=[NodeStatus(node_id=n.node_id, state=n.state, agent_url=n.agent_url, slurm_job_id=n.slurm_job_id,
                              job_scoped=n.job_scoped, gpus=n.gpus, free_gpus=max(0, n.gpus - used[n.node_id]),
                              tiers=n.tiers, last_heartbeat=n.last_heartbeat, cached=cache[n.node_id],
                              pool_model=n.pool_model, credential_id=n.credential_id,
                              serves_group=n.serves_group, job_end=n.job_end,
                              phase=RETIRING_PHASE if self.is_retiring_pool(n, now) else None)
                   for n in nodes],
            instances=[InstanceStatus(instance_id=i.instance_id, model=i.model, node_id=i.node_id, state=i.state,
                                      worker_url=i.worker_url, gpu_ids=i.gpu_ids, running_requests=i.running_requests,
                                      last_used=i.last_used, load_tier=i.load_tier, load_seconds=i.load_seconds,
                                      placement=i.placement, tokens_in_flight=i.tokens_in_flight,
                                      prefill_tokens_per_second=i.prefill_tps,
                                      move_seconds=self._move_cost(i) if i.state == "ready" else None,
                                      tensor_parallel=i.tensor_parallel, rank_nodes=i.rank_nodes,
                                      rank_tiers=i.rank_tiers)
                       for i in instances],
            allocations=[self._allocation_status(a, nodes) for a in self.registry.allocations()],
            cold_starts=[ColdStart(**vars(c)) for c in self.registry.cold_starts()],
            migrations=[MigrationEvent(**vars(m)) for m in self.registry.migrations()],
            failed_instances=self._recent_failures(),
        )

    def _recent_failures(self) -> list[InstanceFailure]:
        with self._failures_lock:
            return list(reversed(self._failures.values()))

    def _allocation_status(self, alloc: AllocationRecord, nodes: list[NodeRecord]) -> AllocationStatus:
        waiting = alloc.state == "pending" or (alloc.state == "running" and not allocation_agents(
            alloc, [n for n in nodes if n.state in ("up", "draining")]))
        now = self.clock()
        wait = self.allocator.pending_wait(alloc, now) if waiting else None
        retiring = is_retiring(alloc, now)
        return AllocationStatus(job_id=alloc.job_id, state=alloc.state, model=alloc.model, nodes=alloc.nodes,
                                preferred_nodes=alloc.preferred_nodes, submitted_at=alloc.submitted_at,
                                started_at=alloc.started_at, walltime_end=alloc.walltime_end,
                                retire_at=alloc.retire_at, reason=alloc.reason,
                                pending_reason=self.allocator.pending_reason(alloc.job_id)
                                if alloc.state == "pending" else None,
                                queue_wait_seconds=wait.seconds if wait else None,
                                queue_wait_source=wait.source if wait else None,
                                phase=RETIRING_PHASE if retiring else None,
                                drain_deadline=self.drain_deadline(alloc) if retiring else None)

    # ------------------------------------------------------------------------------------------ node agents

    def authenticate_token(self, token: str) -> Principal:
        """The principal of an allocation or pool token (CredentialError 401: unknown, wrong or revoked)."""
        credential_id, secret = parse_token(token)
        record = self.registry.get_credential(credential_id)
        if record is not None and not secret_matches(secret, record.secret_hash):
            record = None  # a wrong secret is told as an unknown token
        return _principal_of(credential_id, record)

    def worker_key_of(self, node: NodeRecord) -> str:
        """The key the node's agent and workers accept: the cluster secret, or a token-registered node's key."""
        return worker_key(self.config.cluster.shared_secret, node.credential_id, node.node_id)

    def _node_key_if_any(self, node: NodeRecord) -> str | None:
        key = self.worker_key_of(node)
        return None if key == self.config.cluster.shared_secret else key

    def register(self, reg: NodeRegistration, principal: Principal = CLUSTER) -> RegisterResponse:
        now = self.clock()
        job_nodes = None
        if principal.kind == "allocation":
            job_nodes = self.allocator.job_nodes(principal.job_id)
            if job_nodes is None:  # Slurm did not answer, or not yet with the nodes: retrying is right, not giving up
                raise JobNotLocated(f"cannot tell yet where Slurm job {principal.job_id} runs (Slurm did not say); "
                                    f"retry the registration")
        elif reg.slurm_job_id and self.registry.get_allocation(reg.slurm_job_id) is not None:
            # An allocation of ours: all its nodes recorded now (a spanning one has an agent on its first node only,
            # and must not look like a one-node allocation until the next Slurm poll). None: the poll tells.
            job_nodes = self.allocator.job_nodes(reg.slurm_job_id)
        try:
            if principal.kind == "pool":
                self._check_pool_job(reg)
            check_registration(principal, reg.node_id, reg.slurm_job_id, reg.pool_model, job_nodes)
            self._refuse_a_takeover(reg.node_id, principal, now)
            self._refuse_a_borrowed_agent_url(reg, now)
        except CredentialError as exc:
            log.warning("refused the registration of %s with %s %s: %s", reg.node_id, principal.kind,
                        principal.credential_id, exc)
            raise
        try:
            node = self.registry.register_node(reg, now, live_after=now - self.settings.node_timeout_seconds,
                                               credential_id=principal.credential_id,
                                               serves_group=principal.serves_group, job_nodes=job_nodes)
        except NodeTaken as exc:
            log.warning("refused the registration of %s: %s", reg.node_id, exc)
            raise
        self._agent_changes.forget_node(node.node_id)  # with the node's old instances (a new agent process)
        with self._failures_lock:
            self._failed_pool_loads.discard(node.node_id)  # a new job's agent: its loads are waited for again
        log.info("node %s registered (agent %s, job %s, %d gpus, %d cached%s)", node.node_id, node.agent_url,
                 node.slurm_job_id, node.gpus, len(reg.cached),
                 f"; model pool of {node.pool_model}: routed to, never placed on" if node.is_pool else "")
        node_key = self._node_key_if_any(node)
        self.agents.set_key(node.agent_url, node_key)  # before any route it wakes calls the agent
        self._notify()
        return RegisterResponse(node_id=node.node_id, heartbeat_seconds=self.config.node.heartbeat_seconds,
                                node_key=node_key)

    def _agent_lives(self, node: NodeRecord, now: float) -> bool:
        """Its agent is up (or draining) and heartbeated within node_timeout_seconds."""
        return node.state in ("up", "draining") and node.last_heartbeat is not None \
            and node.last_heartbeat > now - self.settings.node_timeout_seconds

    def _check_pool_job(self, reg: NodeRegistration) -> None:
        """A pool registers from inside its group's own Slurm job, as a node Slurm says that job runs on: a pool
        token may not take a node id where it does not run (the service's next allocation there would be refused
        while the pool heartbeats), nor one of the service's allocations (its record would be rewritten)."""
        job = reg.slurm_job_id
        if job and self.registry.get_allocation(job) is not None:
            raise CredentialError(f"Slurm job {job} is one of the service's allocations; a model pool registers with "
                                  f"its own job's id")
        if self.allocator.backend is None:
            return  # no Slurm to ask (a controller serving fixed nodes)
        if not job:
            raise CredentialError("a model pool registers from inside its Slurm job (sbatch slurm/model-pool.sbatch): "
                                  "the registration names no slurm_job_id")
        nodes = self.allocator.slurm_job_nodes(job)
        if nodes is None:  # Slurm did not answer, or lists no nodes yet: retrying is right
            raise JobNotLocated(f"cannot tell yet where Slurm job {job} runs (Slurm did not say); retry the "
                                f"registration")
        if reg.node_id not in nodes:
            raise CredentialError(f"Slurm job {job} runs on {', '.join(nodes) or 'no node (it ended)'}, not on "
                                  f"{reg.node_id}: a model pool registers the node its job runs on")

    def _refuse_a_takeover(self, node_id: str, principal: Principal, now: float) -> None:
        """A token may not take over a node whose agent, registered with another credential, still heartbeats
        (whatever job id it claims): it would take that node's instances and routes."""
        node = self.registry.get_node(node_id)
        if principal.is_cluster or node is None or node.credential_id == principal.credential_id \
                or not self._agent_lives(node, now):
            return
        raise CredentialError(f"node {node_id} is served by an agent registered with another credential; this "
                              f"token cannot take it over while that agent lives", status=409)

    def _refuse_a_borrowed_agent_url(self, reg: NodeRegistration, now: float) -> None:
        """One agent URL, one live node: the controller calls an agent with its node's key, looked up by URL, so a
        registration naming another live node's agent would have that node called with the wrong key."""
        for node in self.registry.nodes(states=("up", "draining")):
            if node.node_id != reg.node_id and node.agent_url.rstrip("/") == reg.agent_url.rstrip("/") \
                    and self._agent_lives(node, now):
                raise CredentialError(f"agent URL {reg.agent_url} is the agent of live node {node.node_id}; each "
                                      f"node registers its own agent's URL", status=409)

    def heartbeat(self, node_id: str, hb: Heartbeat, principal: Principal = CLUSTER) -> HeartbeatResponse:
        known = self.registry.get_node(node_id)
        if known is not None:  # an unknown node gets 404 (register again) whoever asks
            check_node_owner(principal, node_id, known.credential_id)
            check_models(principal, [i.model for i in hb.instances])
            check_agent_process(known, hb)  # before anything of it is acted on (a failed spanning instance)
        # Before the registry forgets a failed instance: its spanning allocation must not take another start.
        self._give_back_failed_spanning(node_id, [i for i in hb.instances if i.state == "failed"])
        now = self.clock()
        # A heartbeat is built before it arrives: one built before the agent took a start this controller confirmed
        # lacks that instance, which is not gone (forgotten, the next request started another); one built before a
        # stop lists the instance alive, which is not back (AgentChanges: by its instance-list version, else a
        # window of time for an agent without versions).
        period, report = self.config.node.heartbeat_seconds, hb.instances_version
        started_since, stopped_since = now - period, now - 2 * period - STALE_REPORT_MARGIN_SECONDS
        # And one overtaken by a later heartbeat changes nothing but the node's liveness.
        outcome = self.registry.heartbeat(
            node_id, hb, now, just_started=lambda i: self._agent_changes.started_after(i, report, started_since),
            stopped=lambda i: self._agent_changes.stopped_after(i, report, stopped_since),
            overtaken=lambda: not self._agent_changes.newer_report(node_id, report, now, stopped_since))
        if outcome.became_ready:
            self._start_costs = None  # learn from the new cold starts at the next placement
        # The demand it answers is cleared by the autoscaler's next step (Autoscaler._ensure_min_and_demand), per
        # group: a group's own pool clears that group's demand for the model, not another group's or everyone's.
        for cold in outcome.became_ready:
            for listener in self.cold_start_listeners:
                listener(cold)
            log.info("cold start of %s on %s done: %.2f s to ready (load %s s from %s, estimate %s s)", cold.model,
                     cold.node_id, (cold.ready_at or cold.requested_at) - cold.requested_at, cold.load_seconds,
                     cold.tier, cold.estimate_seconds)
        for failed in outcome.failed:
            self._record_failure(node_id, failed, pool=known is not None and known.is_pool)
        node = self.registry.get_node(node_id)
        if hb.draining and node is not None and node.state == "up":
            # Its agent got Slurm's signal: no new instance or migration target there (a new registration after
            # a requeue makes it "up" again).
            self.registry.set_node_state(node_id, "draining")
            node = self.registry.get_node(node_id)
            log.info("node %s is draining (its agent said so)", node_id)
        if outcome.became_ready or outcome.failed or outcome.vanished or hb.draining:
            self._notify()
        return HeartbeatResponse(node_id=node_id, state=node.state if node else "unknown")

    def _record_failure(self, node_id: str, failed: InstanceInfo, pool: bool = False) -> None:
        with self._failures_lock:
            if failed.instance_id in self._failures:
                return  # reported again by the next heartbeat
            log.error("instance %s of %s failed on %s: %s", failed.instance_id, failed.model, node_id, failed.error)
            now = self.clock()
            self._failures[failed.instance_id] = InstanceFailure(
                instance_id=failed.instance_id, model=failed.model, node_id=node_id, error=failed.error,
                failed_at=now)
            if pool:
                self._failed_pool_loads.add(node_id)
            while len(self._failures) > RECENT_FAILURES:
                self._failures.popitem(last=False)

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # --------------------------------------------------------------------------------------------- routing

    def route(self, name: str, wait_seconds: float = 0.0, group: str | None = None) -> RouteReady | RouteWaiting:
        """A ready instance of the model, or the cold start / allocation it waits for (long-polls up to wait).
        No capacity now (NoCapacity) is waited out too, like a job queued in Slurm: until capacity frees up or the
        wait is over (then the NoCapacity). A refused allocation (AllocationRefused) and capacity that can never
        come (NoCapacityPossible, why_never_capacity) are answered at once.
        group: the API key's group; a group's own pool only serves that group."""
        deadline = time.monotonic() + min(max(wait_seconds, 0.0), self.settings.route_max_wait_seconds)
        while True:
            try:
                outcome = self.route_once(name, group)
            except (AllocationRefused, NoCapacityPossible):
                raise
            except NoCapacity:
                if deadline - time.monotonic() <= 0:
                    raise
                outcome = None
            remaining = deadline - time.monotonic()
            if isinstance(outcome, RouteReady) or (outcome is not None and remaining <= 0):
                return outcome
            with self._changed:
                self._changed.wait(timeout=max(0.0, min(remaining, 0.5)))

    def routable_nodes(self, group: str | None, exclude: frozenset[str] = frozenset(),
                       up: list[NodeRecord] | None = None) -> dict[str, NodeRecord]:
        """Up nodes a request of `group` may go to (not a pool of another group), minus `exclude`. up: the
        registry's nodes in ROUTABLE_NODE_STATES, when the caller read them already (once for several groups)."""
        if up is None:
            up = self.registry.nodes(states=ROUTABLE_NODE_STATES)
        return {n.node_id: n for n in up if n.node_id not in exclude and visible_to(n.serves_group, group)}

    def route_once(self, name: str, group: str | None = None) -> RouteReady | RouteWaiting:
        model = self.registry.get_model(name)
        if model is None:
            raise UnknownModel(f"model {name!r} is not deployed")
        now = self.clock()
        instances = self.registry.instances(model=name)
        nodes = self.routable_nodes(group)
        routable = set(nodes)
        ready = [i for i in instances if i.state == "ready" and i.worker_url and i.node_id in routable]
        loading = [i for i in self.counted_instances(instances)
                   if i.state == "loading" and i.node_id in routable]
        if ready:
            best = min(ready, key=lambda i: (i.load, i.instance_id))
            self.registry.note_routed(best.instance_id, now)
            if best.load + 1 >= self.settings.scale_out_running_requests and not loading \
                    and len(ready) < model.max_instances:
                self._scale_out(model, group)
            node = nodes[best.node_id]
            return RouteReady(model=name, instance_id=best.instance_id, worker_url=best.worker_url,
                              node_id=best.node_id, load_tier=best.load_tier, load_seconds=best.load_seconds,
                              worker_key=self._node_key_if_any(node), pool=node.is_pool)
        if loading:
            first = min(loading, key=lambda i: i.requested_at)
            return self._starting(name, first)
        return self.start_instance(model, group=group)

    def _starting(self, name: str, inst: InstanceRecord) -> RouteWaiting:
        return RouteWaiting(status="starting", model=name, retry_after=self.settings.route_retry_after_seconds,
                            instance_id=None if inst.reserved else inst.instance_id, node_id=inst.node_id)

    def _scale_out(self, model: DeployedModel, group: str | None = None) -> None:
        try:
            self.start_instance(model, group=group)
        except (NoCapacity, AgentError) as exc:
            log.info("could not scale out %s: %s", model.name, exc)

    def start_instance(self, model: DeployedModel, exclude_nodes: frozenset[str] = frozenset(),
                       group: str | None = None) -> RouteWaiting:
        """Place one new instance: start it on a running node, or wait for / submit a Slurm allocation.
        exclude_nodes: nodes that must not host it (a draining node asking where its requests can go). group: whose
        request asks (another group's own pool neither serves it nor counts towards max_instances)."""
        if model.spans_nodes:
            return self._start_spanning(model, exclude_nodes, group)
        with self._placement_lock:
            now = self.clock()
            waiting = self._one_start_at_a_time(model, exclude_nodes, group)
            if waiting is not None:
                return waiting
            candidates, holding, targets = self._candidates(model, now, exclude_nodes)
            decision = place(model.size_bytes, _slots(model), candidates, holding, model.rank_bytes,
                             self.settings.placement_policy, self._placement_rng, self._start_seconds(model, now))
            if decision.chosen is None:
                never = self.why_never_capacity(model, group)
                if never is not None:  # no demand noted: nothing could ever serve it
                    raise NoCapacityPossible(never)
                self.registry.note_demand(model.name, now, group)
                raise NoCapacity(self._no_capacity_reason(model, candidates),
                                 retry_after=self.settings.allocation_start_estimate_seconds)
            breakdown = decision.breakdown()
            target = targets[decision.chosen.node]
            log.info("placement of %s: %s", model.name, breakdown.model_dump_json())
            if target.kind in ("pending", "idle", "residency"):
                self.registry.note_demand(model.name, now, group)  # so the instance starts once there is room
            if target.kind == "residency":
                return RouteWaiting(status="waiting", model=model.name, node_id=target.node.node_id,
                                    retry_after=self.settings.route_retry_after_seconds)
            if target.kind == "pending":
                return RouteWaiting(status="allocating", model=model.name, job_id=target.job_id,
                                    retry_after=self.settings.route_retry_after_seconds)
            if target.kind == "idle":
                return self._allocate(model, target, now, group=group)
            node = target.node
            gpu_ids = self._assign_gpus(model, node, set(decision.chosen.migrate))
            reservation = self.registry.reserve_instance(model.name, node.node_id, gpu_ids, now,
                                                         breakdown.model_dump(), model.tensor_parallel)
            victims = [v for v in map(self.registry.get_instance, decision.chosen.migrate) if v is not None]
            for victim in victims:
                self.registry.set_instance_state(victim.instance_id, "draining")
        # The agent calls run outside the lock: the reservation already keeps other routes from double-booking.
        for victim in victims:
            self.move_instance(node, victim, trigger="placement")
        return self._ask_agent(model, node, gpu_ids, reservation, group)

    def _one_start_at_a_time(self, model: DeployedModel, exclude_nodes: frozenset[str],
                             group: str | None = None) -> RouteWaiting | None:
        """The instance already loading (concurrent requests wait for it); NoCapacity at max_instances (counting
        what `group` may be routed to: another group's pool does not count)."""
        routable = self.routable_nodes(group, exclude_nodes)
        active = [i for i in self.counted_instances(self.registry.instances(model=model.name))
                  if i.state in ("ready", "loading") and i.node_id in routable]
        loading = [i for i in active if i.state == "loading"]
        if loading:  # one cold start at a time per model: concurrent requests wait for it
            return self._starting(model.name, loading[0])
        if len(active) >= model.max_instances:
            raise NoCapacity(f"model {model.name!r} already runs max_instances={model.max_instances}",
                             retry_after=self.settings.route_retry_after_seconds)
        return None

    def counted_instances(self, instances: list[InstanceRecord]) -> list[InstanceRecord]:
        """Those of `instances` that count as their model's capacity (a cold start to wait for, one of
        min_instances or max_instances): all but the loads on a model pool whose agent reported a failed load since
        it registered (a pool runs only its model). Its agent starts the model again by itself after each failure,
        and a load that fails late is loading nearly all the time: its next load is no cold start to wait for (nor
        one of max_instances), the model starts elsewhere."""
        with self._failures_lock:
            failed = set(self._failed_pool_loads)
        return [i for i in instances if not (i.state == "loading" and i.node_id in failed)]

    def _ask_agent(self, model: DeployedModel, node: NodeRecord, gpu_ids: list[int],
                   reservation: str, group: str | None = None) -> RouteWaiting:
        try:
            # The deployed context length, so the worker refuses exactly what the gateway refuses.
            started = self.agents.start_instance(node.agent_url, model.name, model.source, gpu_ids,
                                                 max_model_len=model.max_model_len, engine=model.engine,
                                                 cache_on_load=model.cache_on_load,
                                                 tensor_parallel=model.tensor_parallel, nodes=model.nodes,
                                                 lora_adapters=model.lora_adapters)
        except AgentError:
            self.registry.delete_instance(reservation)
            raise
        # Remembered before the reservation becomes the instance: a heartbeat handled in between keeps it.
        self._agent_changes.confirmed(node.node_id, started.instance_id, self.clock(), started.instances_version)
        if not self.registry.confirm_instance(reservation, started.instance_id, started.worker_url):
            return self._started_for_nothing(model, node, started.instance_id, group)
        log.info("starting %s as %s on %s (gpus %s)", model.name, started.instance_id, node.node_id, gpu_ids)
        self._catch_up_adapters(model, node, started.instance_id)
        return RouteWaiting(status="starting", model=model.name, instance_id=started.instance_id,
                            node_id=node.node_id, retry_after=self.settings.route_retry_after_seconds)

    def _started_for_nothing(self, model: DeployedModel, node: NodeRecord, instance_id: str,
                             group: str | None = None) -> RouteWaiting:
        """Its reservation went while the agent started it (the model undeployed, maybe deployed again with another
        spec; the node lost): nothing else stops the instance. UnknownModel when the model is gone; else a retry,
        with demand noted, starts one of what is deployed now."""
        self._stop_one(node, instance_id)
        self.registry.delete_instance(instance_id)  # in case a heartbeat reported it meanwhile
        if self.registry.get_model(model.name) is None:
            raise UnknownModel(f"model {model.name!r} was undeployed while its instance {instance_id} started "
                               f"(stopped)")
        log.info("stopped %s of %s on %s: its reservation went during the start", instance_id, model.name,
                 node.node_id)
        self.registry.note_demand(model.name, self.clock(), group)
        return RouteWaiting(status="starting", model=model.name, retry_after=self.settings.route_retry_after_seconds)

    def _start_spanning(self, model: DeployedModel, exclude_nodes: frozenset[str],
                        group: str | None = None) -> RouteWaiting:
        """An instance spanning nodes runs alone in an allocation made for it (nodes x ranks per node), started by
        that allocation's agent on its first node: there when such an allocation of this model is up with no
        instance; else RouteWaiting for the one being allocated or just submitted (on the node set placement
        prefers: where its ranks' slice copies are, weighed against Slurm's queue wait for the whole shape);
        NoCapacity when none may be submitted. group: whose request asks (as for start_instance)."""
        with self._placement_lock:
            now = self.clock()
            waiting = self._one_start_at_a_time(model, exclude_nodes, group)
            if waiting is not None:
                return waiting
            picked = self._spanning_target(model, now, exclude_nodes, group)
        return picked if isinstance(picked, RouteWaiting) else self._ask_agent(model, *picked, group)

    def _spanning_target(self, model: DeployedModel, now: float, exclude_nodes: frozenset[str],
                         group: str | None = None):
        """(node, gpu_ids, reservation) of a spanning allocation of this model without an instance, else
        RouteWaiting / NoCapacity (_start_spanning)."""
        jobs, locating = self._spanning_allocations(model)
        occupied = {i.node_id for i in self.registry.instances() if i.state in ("loading", "ready", "draining")}
        holding = self._holding(model)
        known = self.registry.nodes()  # once: an agent registering in between is found here or still pending below
        for node in known:
            if node.state in ROUTABLE_NODE_STATES and node.slurm_job_id in jobs \
                    and node.node_id not in exclude_nodes | occupied:
                gpu_ids = list(range(model.gpus // model.nodes))  # the agent's node's share; srun gives the rest
                placement = self._spanning_breakdown(model, jobs[node.slurm_job_id], node, holding)
                return node, gpu_ids, self.registry.reserve_instance(model.name, node.node_id, gpu_ids, now,
                                                                     placement.model_dump(), model.tensor_parallel)
        never = self.why_never_capacity(model, group)
        if never is not None:
            raise NoCapacityPossible(never)
        self.registry.note_demand(model.name, now, group)  # so the instance starts as soon as its allocation is up
        pending = self.pending_allocations(model.name, known) + locating
        if pending:
            return RouteWaiting(status="allocating", model=model.name, job_id=pending[0].job_id,
                                retry_after=self.settings.route_retry_after_seconds)
        why = self.allocator.why_not_submit(model)
        if why is not None:
            raise NoCapacity(f"no capacity for model {model.name!r} ({model.tensor_parallel} ranks over "
                             f"{model.nodes} nodes, an allocation of its own): {why}",
                             retry_after=self.settings.allocation_start_estimate_seconds)
        decision = self._spanning_decision(model, now, exclude_nodes, holding)
        log.info("placement of %s: a new allocation of %d nodes x %d ranks: %s", model.name, model.nodes,
                 model.ranks_per_node, decision.breakdown().model_dump_json())
        chosen = decision.chosen.node
        return self._allocate(model, Target("idle"), now, [] if chosen == ANY_NODES else chosen.split(","), group)

    def _spanning_allocations(self, model: DeployedModel
                              ) -> tuple[dict[str, AllocationRecord], list[AllocationRecord]]:
        """The running allocations of this model with its number of nodes ({job id: allocation}), and those whose
        nodes Slurm has not listed yet (to wait for, not to double). Not one being cancelled (its instance failed).
        An allocation recorded with fewer nodes (its agent registered before the controller heard them from Slurm)
        is asked about once more here; one that really has fewer (made before the model was redeployed over more
        nodes) is not this model's to start on."""
        jobs, locating = {}, []
        for alloc in self.registry.allocations(active_only=True):
            if alloc.model != model.name or alloc.state != "running":
                continue
            if len(alloc.nodes) < model.nodes:
                nodes = self.allocator.slurm_job_nodes(alloc.job_id)
                if nodes is None:
                    locating.append(alloc)
                    continue
                if nodes and nodes != alloc.nodes:
                    self.registry.update_allocation(alloc.job_id, nodes=nodes)
                    alloc = dataclasses.replace(alloc, nodes=nodes)
            if len(alloc.nodes) >= model.nodes:
                jobs[alloc.job_id] = alloc
        return jobs, locating

    def _spanning_breakdown(self, model: DeployedModel, alloc: AllocationRecord, node: NodeRecord,
                            holding: dict[str, set[str]]) -> PlacementBreakdown:
        """The start-up estimate of a spanning instance on its allocation (up): its slowest rank's load, each rank
        on its node of the job (srun's block distribution over the job's nodes in Slurm's order)."""
        nodes = tuple(slurm_order(alloc.nodes)[: model.nodes])
        known = {n.node_id: n for n in self.registry.nodes()}  # nodes without an agent now: their last measurement
        candidate = NodeSetCandidate(node.node_id, nodes, "running", 0.0,
                                     tuple(self._bandwidths(known.get(n)) for n in nodes),
                                     f"allocation {alloc.job_id} of {model.nodes} nodes")
        return place_spanning(model.size_bytes, model.tensor_parallel, model.rank_bytes, [candidate],
                              holding, self._start_seconds(model, self.clock())).breakdown()

    def _spanning_decision(self, model: DeployedModel, now: float, exclude_nodes: frozenset[str],
                           holding: dict[str, set[str]]):
        """Where a new allocation for a spanning instance should go: any nodes Slurm picks (`*`), or one of the few
        sets of idle nodes whose slice copies load it soonest, each with Slurm's `sbatch --test-only` wait for a
        job of the whole shape on exactly those nodes (the constant when Slurm gives none)."""
        known = {n.node_id: n for n in self.registry.nodes()}
        any_wait = self.allocator.new_allocation_wait(model, [], now)
        candidates = [NodeSetCandidate(ANY_NODES, (), "idle", any_wait.seconds,
                                       (self._bandwidths(None),) * model.nodes, any_wait.source)]
        busy = set(self.allocator.nodes_in_use()) | exclude_nodes
        idle = [n for n in self.allocator.idle_nodes(model) if n not in busy]
        bandwidths = {n: self._bandwidths(known.get(n)) for n in idle}
        for nodes in node_sets_to_ask(idle, holding, model.nodes, model.tensor_parallel, model.size_bytes,
                                      model.rank_bytes, bandwidths):
            wait = self.allocator.new_allocation_wait(model, list(nodes), now)
            candidates.append(NodeSetCandidate(",".join(nodes), nodes, "idle", wait.seconds,
                                               tuple(bandwidths[n] for n in nodes), wait.source))
        return place_spanning(model.size_bytes, model.tensor_parallel, model.rank_bytes, candidates, holding,
                              self._start_seconds(model, now))

    def _start_seconds(self, model: DeployedModel, now: float) -> float:
        """What starting `model` costs beyond reading its bytes (docs/placement.md "Start cost"): learned from this
        controller's recent cold starts on running nodes, read from the registry at most every
        START_COSTS_TTL_SECONDS (and after each finished cold start)."""
        cached = self._start_costs
        if cached is None or now - cached[0] >= START_COSTS_TTL_SECONDS or now < cached[0]:
            overheads = [StartOverhead(c.model, c.tensor_parallel, c.start_overhead_seconds)
                         for c in self.registry.running_node_cold_starts()]
            defaults = {start_kind(1): self.settings.start_cost_seconds,
                        start_kind(2): self.settings.tensor_parallel_start_cost_seconds}
            cached = self._start_costs = (now, learn_start_costs(overheads, defaults))
        return cached[1].seconds(model.name, model.tensor_parallel)

    def _spanning_jobs(self) -> dict[str, str]:
        """{Slurm job id: model} of the active allocations made for an instance spanning nodes (their agent's node
        hosts that instance only: it is never an ordinary placement candidate)."""
        models = {m.name: m for m in self.registry.models()}
        jobs = {}
        for alloc in self.registry.allocations(active_only=True):
            model = models.get(alloc.model)
            if (model.spans_nodes if model is not None else len(alloc.nodes) > 1):
                jobs[alloc.job_id] = alloc.model
        return jobs

    def _give_back_failed_spanning(self, node_id: str, failed: list) -> None:
        """A spanning instance that failed (a rank's corrupt slice, a rank out of memory) gives its allocation back
        at once: the allocation was made for it alone, and nothing must stay allocated after a failed start. The
        allocation is marked cancelling first, under the placement lock, so no start picks it while scancel runs
        (or when Slurm does not answer). While there is demand the autoscaler submits a new one."""
        node = self.registry.get_node(node_id) if failed else None
        job = node.slurm_job_id if node is not None else None
        alloc = self.registry.get_allocation(job) if job else None
        if alloc is None or alloc.state != "running" or job not in self._spanning_jobs():
            return
        reason = f"instance {failed[0].instance_id} failed"
        with self._placement_lock:
            self.registry.update_allocation(job, state="cancelling", reason=reason)
        try:
            self.allocator.cancel(job, reason, self.clock())
            log.warning("cancelled allocation %s: its spanning instance %s of %s failed", job, failed[0].instance_id,
                        failed[0].model)
        except AllocationFailed as exc:
            log.error("could not cancel allocation %s of the failed instance %s: %s", job, failed[0].instance_id, exc)

    def _stop_one(self, node: NodeRecord, instance_id: str) -> None:
        try:
            self.stop_on_agent(node, instance_id)
        except AgentError as exc:
            log.warning("could not stop instance %s on %s: %s", instance_id, node.node_id, exc)

    # ------------------------------------------------------------------------------------ live migration

    def migration_target(self, req: MigrationTargetRequest,
                         principal: Principal = CLUSTER) -> MigrationTarget | RouteWaiting:
        """Where a draining node's requests of req.model should go: the least-loaded ready instance on another
        routable node that may serve them (a group's pool: its group's or a public one; anyone else's requests:
        never a group's own pool), with a ticket for the source worker. With start_if_missing, when there is none,
        one is started through placement (never on the excluded node) and the answer is RouteWaiting until it is
        ready. NoMigrationTarget when nothing can be."""
        source = self.registry.get_node(req.exclude_node) if req.exclude_node else None
        if not principal.is_cluster:
            if source is None:
                raise CredentialError("a node token asks for migration targets of its own node only (exclude_node)")
            check_node_owner(principal, source.node_id, source.credential_id)
            check_models(principal, [req.model])
            if source.state != "draining":  # a ticket's grant opens another worker; an allocation may be submitted
                raise CredentialError(f"node {source.node_id} is not draining: a node token gets migration targets "
                                      f"only while its node drains (heartbeat draining = true first)")
        leaving = self._leaving_instance(source, req, principal) if source else None
        model = self.registry.get_model(req.model)
        if model is None:
            raise UnknownModel(f"model {req.model!r} is not deployed")
        excluded = frozenset({req.exclude_node}) if req.exclude_node else frozenset()
        group = source.serves_group if source else None
        target = self.ready_target(model.name, excluded, group)
        if target is not None:
            self.registry.note_routed(target.instance_id, self.clock())  # its load counts for the next picks
            log.info("migration target for %s (leaving %s): %s on %s", model.name, req.exclude_node or "-",
                     target.instance_id, target.node_id)
            self._record_drain(model.name, req, "target_assigned", target.instance_id)
            if not principal.is_cluster:
                self._count_ticket(leaving.instance_id)
            ticket = self.migration_ticket(source, leaving or req.instance_id or "", target) if source else None
            return MigrationTarget(worker_url=target.worker_url, instance_id=target.instance_id,
                                   node_id=target.node_id, ticket=ticket)
        if not req.start_if_missing:
            raise NoMigrationTarget(f"no ready instance of {model.name!r} on another node")
        try:
            waiting = self.start_instance(model, exclude_nodes=excluded, group=group)
        except (NoCapacity, AgentError) as exc:
            raise NoMigrationTarget(f"no ready instance of {model.name!r} on another node, and none can start: "
                                    f"{exc}") from None
        log.info("migration target for %s (leaving %s): none ready, %s %s", model.name, req.exclude_node or "-",
                 waiting.status, waiting.instance_id or waiting.job_id or "")
        return waiting

    def _record_drain(self, model: str, req: MigrationTargetRequest, outcome: str, target: str | None) -> None:
        """A draining node's agent moves its requests itself; the controller records the ready target it named (not
        the 202 answers while one starts: the agent asks again until one is ready), with the asking instance when
        the agent names it (it does for the ticket)."""
        self.registry.record_migration(MigrationRecord(model, req.instance_id or "", req.exclude_node or "",
                                                       "node_drain", outcome, target, at=self.clock()))

    def ready_target(self, model: str, excluded: frozenset[str], group: str | None = None) -> InstanceRecord | None:
        """The least-loaded ready instance of the model on a routable node not in excluded; one on a retiring
        allocation's node (it moves again soon) only when there is no other."""
        routable = set(self.routable_nodes(group, excluded))
        ready = [i for i in self.registry.instances(model=model)
                 if i.state == "ready" and i.worker_url and i.node_id in routable and not i.reserved]
        leaving = self.retiring_nodes(self.clock()) if ready else frozenset()
        return min(ready, key=lambda i: (i.node_id in leaving, i.load, i.instance_id)) if ready else None

    # ------------------------------------------------------------------------------------------- retirement

    def retiring_nodes(self, now: float) -> frozenset[str]:
        """The agents' nodes of allocations retiring now (is_retiring), and the model pools retiring now
        (is_retiring_pool): they serve on, but get no new instance, and are migration targets of last resort."""
        retiring = [a for a in self.registry.allocations(active_only=True) if is_retiring(a, now)]
        live = self.registry.nodes(states=("up", "draining"))
        return frozenset([n.node_id for alloc in retiring for n in allocation_agents(alloc, live)]
                         + [n.node_id for n in live if self.is_retiring_pool(n, now)])

    def is_retiring_pool(self, node: NodeRecord, now: float) -> bool:
        """A model pool up past retire_lead_seconds before the end of its Slurm job (as its agent reported it; a
        job without a time limit has none): a replacement starts elsewhere, and it hands over once that is ready."""
        return node.is_pool and node.state == "up" and node.job_end is not None \
            and now >= node.job_end - self.settings.retire_lead_seconds

    def drain_deadline(self, alloc: AllocationRecord) -> float:
        """The latest time a retiring allocation starts draining, replacements ready or not: early enough that the
        drain (drain_seconds) ends before Slurm's own signal (slurm.signal_seconds before the walltime end); never
        before retire_at."""
        if alloc.walltime_end is None:
            return alloc.retire_at
        latest = alloc.walltime_end - self.config.slurm.signal_seconds - self.settings.drain_seconds
        return max(alloc.retire_at, latest)

    def _leaving_instance(self, source: NodeRecord, req: MigrationTargetRequest,
                          principal: Principal) -> InstanceRecord | None:
        """The instance of source whose requests move (req.instance_id), as registered: a token must name one of
        its node's instances of req.model (its ticket covers that instance's requests only); the cluster secret may
        name none, or one the registry does not know yet."""
        inst = self.registry.get_instance(req.instance_id) if req.instance_id else None
        if inst is not None and inst.node_id == source.node_id and inst.model == req.model:
            return inst
        if principal.is_cluster:
            return None
        raise CredentialError(f"a node token asks for a migration target for one of its node's instances of "
                              f"{req.model!r}: instance_id {req.instance_id or '(none)'} is not one on "
                              f"{source.node_id}")

    def _count_ticket(self, instance_id: str) -> None:
        """A node token holds at most MAX_LIVE_TICKETS live tickets for one instance: each grant is bounded by the
        instance's requests, and so is their number (a drain asks once per instance; a retry or two more)."""
        now = time.time()
        with self._live_tickets_lock:
            live = [t for t in self._live_tickets.get(instance_id, []) if t > now]
            if len(live) >= MAX_LIVE_TICKETS:
                raise TooManyTickets(f"instance {instance_id} already holds {len(live)} live migration tickets; the "
                                     f"next expires in {min(live) - now:.0f} s")
            self._live_tickets = {i: t for i, t in self._live_tickets.items() if any(e > now for e in t)}
            self._live_tickets[instance_id] = live + [now + TICKET_SECONDS]

    def migration_ticket(self, source: NodeRecord, source_instance: InstanceRecord | str,
                         target: InstanceRecord) -> MigrationTicket:
        """The leave for source's worker to move requests to target (signed with the source worker's key; its
        grant made with the destination worker's key), good for credentials.TICKET_SECONDS. It covers the source
        instance's requests as counted here (its heartbeat's running and waiting ones, plus those routed there
        since) and one batch (worker.max_running_requests) more for any the count missed; an instance known only
        by name (the cluster secret's callers), as many as a ticket may."""
        destination = self.registry.get_node(target.node_id)
        named = isinstance(source_instance, str)
        covers = MAX_TICKET_REQUESTS if named else source_instance.load + self.config.worker.max_running_requests
        return issue_ticket(model=target.model,
                            source_instance=source_instance if named else source_instance.instance_id,
                            source_key=self.worker_key_of(source), destination_url=target.worker_url,
                            destination_instance=target.instance_id,
                            destination_key=self.worker_key_of(destination) if destination else "",
                            max_requests=min(covers, MAX_TICKET_REQUESTS), now=time.time())

    def move_instance(self, node: NodeRecord, inst: InstanceRecord, trigger: str) -> MigrationRecord:
        """Take an instance off its node without losing its requests: live-migrate them to a ready instance of the
        same model elsewhere (the agent's migrate-out, which then stops it); with no target, or when that call
        fails, stop it (the gateway resumes its requests from their tokens). Logged and reported to listeners."""
        started = time.monotonic()
        target = self.ready_target(inst.model, frozenset({node.node_id}), node.serves_group)
        if target is None:
            self._stop_one(node, inst.instance_id)
            record = MigrationRecord(inst.model, inst.instance_id, node.node_id, trigger,
                                     "idle" if inst.load == 0 else "no_target")
        else:
            record = self._migrate_out(node, inst, target, trigger)
        record = dataclasses.replace(record, seconds=round(time.monotonic() - started, 3))
        self._report_migration(record)
        return record

    def _migrate_out(self, node: NodeRecord, inst: InstanceRecord, target: InstanceRecord,
                     trigger: str) -> MigrationRecord:
        timeout = self.config.node.migrate_timeout_seconds + self.config.node.worker_stop_timeout_seconds + 10
        try:
            result = self.agents.migrate_out(node.agent_url, inst.instance_id, target.worker_url, timeout,
                                             ticket=self.migration_ticket(node, inst, target))
        except AgentError as exc:
            self._stop_one(node, inst.instance_id)  # still free the slots; the gateway resumes from tokens
            return MigrationRecord(inst.model, inst.instance_id, node.node_id, trigger, "failed",
                                   target.instance_id, error=str(exc))
        # It stops once its requests moved; its answer has no room for the version without it (older controllers
        # refuse unknown fields there): the agent's list version read after the stop stands for it.
        self._agent_changes.stopped(node.node_id, inst.instance_id, self.clock(), self._instances_version(node))
        moved, not_moved = len(result.migrated), len(result.failed)
        if moved:
            self.registry.note_routed(target.instance_id, self.clock())
        if result.error:
            outcome = "failed"
        elif not_moved:
            outcome = "partial" if moved else "failed"
        else:
            outcome = "migrated" if moved else "idle"
        return MigrationRecord(inst.model, inst.instance_id, node.node_id, trigger, outcome, target.instance_id,
                               moved, not_moved, error=result.error)

    def _instances_version(self, node: NodeRecord) -> int | None:
        """The node agent's instance-list version now; None when it has none or does not answer (then a window of
        time tells the heartbeats built before a change)."""
        try:
            return self.agents.instances_version(node.agent_url)
        except AgentError as exc:
            log.warning("could not read the instance-list version of %s: %s", node.node_id, exc)
            return None

    def _report_migration(self, record: MigrationRecord) -> None:
        record = dataclasses.replace(record, at=self.clock())
        self.registry.record_migration(record)
        level = logging.INFO if record.outcome in ("migrated", "idle") else logging.WARNING
        log.log(level, "moved instance %s (%s) off %s for %s: %s%s%s in %.2f s%s", record.instance_id, record.model,
                record.node_id, record.trigger, record.outcome,
                f", {record.moved} requests live-migrated to {record.target_instance}" if record.moved else "",
                f", {record.not_moved} resume from their tokens" if record.not_moved else "", record.seconds,
                f" ({record.error})" if record.error else "")
        for listener in self.migration_listeners:
            listener(record)

    def _allocate(self, model: DeployedModel, target: Target, now: float,
                  preferred: list[str] | None = None, group: str | None = None) -> RouteWaiting:
        """Submit an allocation for the model: on target's node, on `preferred` (a spanning instance's node set),
        else anywhere. group: whose request asks (its demand is noted when the submission fails)."""
        preferred = preferred or ([target.slurm_node] if target.slurm_node else [])
        try:
            job_id = self.allocator.submit(model, preferred, now)
        except AllocationFailed as exc:
            self.registry.note_demand(model.name, now, group)
            raise AllocationRefused(f"no node can host model {model.name!r} now, and requesting an allocation "
                                    f"failed: {exc}", retry_after=self.settings.allocation_start_estimate_seconds) \
                from None
        return RouteWaiting(status="allocating", model=model.name, job_id=job_id,
                            retry_after=self.settings.route_retry_after_seconds)

    def _no_capacity_reason(self, model: DeployedModel, candidates: list[NodeCandidate]) -> str:
        running = sum(1 for c in candidates if c.kind == "running")
        why = self.allocator.why_not_submit(model) or \
            f"an allocation offers {self._slots_per_new_node(model)} slots (slurm.gpus_per_node)"
        return (f"no capacity for model {model.name!r} ({_slots(model)} {'gpus' if model.gpus else 'cpu slots'}): "
                f"{running} node(s) up, none with room; no allocation possible: {why}")

    # ------------------------------------------------------------------------ no capacity now, or never

    def why_never_capacity(self, model: DeployedModel, group: str | None = None) -> str | None:
        """Why no instance of the model can ever start for a request of `group` as deployed and configured (what to
        change), else None.

        The one rule telling "no capacity possible" (answered at once: NoCapacityPossible) from "no capacity now"
        (waited out like a job queued in Slurm). Conservative: what may change by itself while a request waits -
        busy or draining nodes, max_allocations in use, a submission not settled, an allocation on its way, an agent
        that may still register - keeps it temporary. "Allocations never": no Slurm backend, allocate_on_demand off
        or max_allocations = 0 (Allocator.why_never_submit). Permanent only where no model pool of the model may
        serve the request (a pool node of it known, on the cluster secret or a token not revoked, or a pool token
        for it not revoked, of `group` or --shared: a pool's agent starts its instance itself; another group's pool
        never serves it; a revoked token's agent never comes back), and:
        - an instance spanning nodes (it runs in an allocation of its own only): allocations never, no allocation of
          this model active, none of any model on its way;
        - an instance on one node: it needs more slots (its GPUs; CPU: one per rank) than any node can offer even
          when empty: a new allocation's node (at least the model's GPUs; controller.cpu_slots_per_node) unless
          allocations never, and every node the controller knows (up, draining or lost; not another model's pool).
          Every node offers controller.cpu_slots_per_node CPU slots; a GPU node's size only its agent tells, so for
          a GPU model at least one node must be known and no allocation (of any model) be on its way."""
        never_allocate = self.allocator.why_never_submit()
        if model.spans_nodes:
            if never_allocate is None or self._allocations_on_their_way() or any(
                    a.model == model.name for a in self.registry.allocations(active_only=True)):
                return None
            why = self._never_spanning(model, never_allocate)
        else:
            why = self._never_on_one_node(model, never_allocate)
        return None if why is None or self._pool_may_serve(model, group) else why

    def _never_spanning(self, model: DeployedModel, never_allocate: str) -> str:
        return (f"model {model.name!r} can never start here: an instance ({model.tensor_parallel} ranks over "
                f"{model.nodes} nodes, an allocation of its own) runs only in a Slurm allocation made for it, and "
                f"none can be submitted: {never_allocate}. Configure a Slurm backend with "
                f"controller.allocate_on_demand on (and max_allocations >= 1), or deploy it on one node (nodes = 1, "
                f"on nodes with {_slots(model)} {'GPUs' if model.gpus else 'CPU slots'})")

    def _never_on_one_node(self, model: DeployedModel, never_allocate: str | None) -> str | None:
        needs = _slots(model)
        if never_allocate is None and self._slots_per_new_node(model) >= needs:
            return None
        if model.gpus:
            registered = self.registry.nodes(states=("up", "draining", "lost"))
            known = [n for n in registered if not n.is_pool]
            if not known or self._allocations_on_their_way(registered) or max(n.gpus for n in known) >= needs:
                return None  # a node of a size nobody knows yet may register, or one can host it once free
            largest = max(n.gpus for n in known)
            biggest = sorted(n.node_id for n in known if n.gpus == largest)
            more = f", {len(biggest) - 3} more" if len(biggest) > 3 else ""
            offered = f"the largest node registered has {largest} GPUs ({', '.join(biggest[:3])}{more})"
            fix = (f"deploy it with fewer gpus, start a node agent on a node with {needs} GPUs, or let the "
                   f"controller submit allocations (a [slurm] backend, controller.allocate_on_demand on, "
                   f"max_allocations >= 1: each asks one node for the model's GPUs; or spread its ranks over nodes "
                   f"with tensor_parallel and nodes = K, an allocation of its own)")
        else:
            slots = self.settings.cpu_slots_per_node
            if slots >= needs:
                return None
            offered = f"a node offers {slots} (controller.cpu_slots_per_node)"
            needs_slurm = ", which needs Slurm allocations" if never_allocate else ""
            fix = (f"raise controller.cpu_slots_per_node to {needs}, or deploy it with nodes = K (tensor_parallel / K "
                   f"ranks per node, an allocation of its own{needs_slurm})")
        what = f"{needs} GPUs" if model.gpus else f"{needs} CPU slots (one per rank: tensor_parallel = {needs})"
        no_allocation = f"; no allocation can be submitted: {never_allocate}" if never_allocate else ""
        return (f"model {model.name!r} can never start here: an instance needs {what} on one node; {offered}"
                f"{no_allocation}. Fix: {fix}")

    def _allocations_on_their_way(self, nodes: list[NodeRecord] | None = None) -> bool:
        """An allocation (of any model) whose agent has not registered yet, or a submission not settled: a node may
        still come. nodes: the registry's nodes as the caller read them (read again, an agent registering in between
        would be neither among the caller's nodes nor on its way here)."""
        live = self.registry.nodes(states=("up", "draining")) if nodes is None else \
            [n for n in nodes if n.state in ("up", "draining")]
        return bool(self.registry.allocation_intents()) or any(
            a.state == "pending" or (a.state == "running" and not allocation_agents(a, live))
            for a in self.registry.allocations(active_only=True))

    def _pool_may_serve(self, model: DeployedModel, group: str | None) -> bool:
        """A model pool of this model may serve a request of `group` (its own group's pool, or a --shared one): one
        of its nodes is known (not gone) whose agent may still be heard (on the cluster secret, or its token not
        revoked: a revoked token's agent gets 401 for good), or a pool token for it is not revoked (a user's pool
        job may still start)."""
        tokens = self.registry.credentials(kind="pool")
        live = {c.credential_id for c in tokens if not c.revoked}
        return any(n.pool_model == model.name and visible_to(n.serves_group, group)
                   and (on_cluster_secret(n.credential_id) or n.credential_id in live)
                   for n in self.registry.nodes(states=("up", "draining", "lost"))) or \
            any(c.model == model.name and not c.revoked and visible_to(_principal(c).serves_group, group)
                for c in tokens)

    # ------------------------------------------------------------------------------------ placement inputs

    def _candidates(self, model: DeployedModel, now: float, exclude_nodes: frozenset[str] = frozenset()):
        """Placement candidates with their targets: running nodes, this model's pending allocations, idle nodes
        (none of exclude_nodes). Model pools' nodes never are: their agents own their instances (the controller
        only routes to them), so nothing is started there and nothing there is evicted or moved to make room.
        Nor are the agents' nodes of allocations made for an instance spanning nodes (they host that one only)."""
        holding = self._holding(model)
        candidates: list[NodeCandidate] = []
        targets: dict[str, Target] = {}
        by_node: dict[str, list[InstanceRecord]] = defaultdict(list)
        for inst in self.registry.instances():
            by_node[inst.node_id].append(inst)
        known_nodes = {n.node_id: n for n in self.registry.nodes()}
        others = self._other_models_nodes(model, known_nodes.values(), by_node) \
            if self.settings.keep_alive_policy == "per-model" else set()
        spanning = self._spanning_jobs()
        ready_on = self._ready_nodes_by_model(by_node, known_nodes)
        claims = self._claims(model, known_nodes.values(), by_node, now)
        # Where an agent of ours runs or may soon: read once for every candidate and queue-wait estimate below.
        in_use = self.allocator.nodes_in_use()
        restart_waits: dict[str, float] = {}
        leaving = self.retiring_nodes(now)  # they serve until their replacements are ready: nothing new goes there
        for node in known_nodes.values():
            if node.state not in ROUTABLE_NODE_STATES or node.node_id in exclude_nodes or node.is_pool \
                    or node.node_id in others or node.slurm_job_id in spanning or node.node_id in leaving:
                continue
            free, movable, young = self._room(model, node, by_node[node.node_id], now,
                                              lambda victim: self._restart_seconds(victim, now, restart_waits,
                                                                                   in_use),
                                              ready_on)
            free -= claims.get(node.node_id, 0)
            candidates.append(NodeCandidate(node.node_id, "running", 0.0, free, self._bandwidths(node), movable,
                                            "agent up"))
            targets[node.node_id] = Target("running", node=node)
            if young:
                # The same node once its young instances have served their minimum residency: placement weighs
                # waiting for them against going elsewhere (another node, a new allocation).
                name = f"{node.node_id}@residency"
                wait = max(seconds_left for _, seconds_left in young)
                candidates.append(NodeCandidate(name, "residency", wait, free, self._bandwidths(node),
                                                movable + tuple(inst for inst, _ in young), "residency"))
                targets[name] = Target("residency", node=node)
                if node.node_id in holding:
                    holding[name] = holding[node.node_id]
        pending = self.pending_allocations(model.name, known_nodes.values())
        for alloc in pending:
            preferred = alloc.preferred_nodes[0] if alloc.preferred_nodes else None
            name = f"{preferred or '*'}@job{alloc.job_id}"
            wait = self.allocator.pending_wait(alloc, now)
            candidates.append(NodeCandidate(name, "pending", wait.seconds, self._slots_per_new_node(model),
                                            self._bandwidths(known_nodes.get(preferred)), (), wait.source))
            targets[name] = Target("pending", job_id=alloc.job_id)
            if preferred:
                holding[name] = holding.get(preferred, set())
        if not pending and self.allocator.why_not_submit(model) is None:
            # Not where an agent of ours runs, nor where an allocation (of any model) is queued for or starting on:
            # a second agent job there would be refused (one agent per node) and hold Slurm resources for nothing.
            busy = set(in_use)
            # Any node Slurm picks (also when none is idle now: the job queues). Its name sorts before node
            # names, so when no listed node is better (no checkpoint there) Slurm is left free to choose.
            any_wait = self.allocator.new_allocation_wait(model, [], now, in_use)
            candidates.append(NodeCandidate(ANY_NODE, "idle", any_wait.seconds, self._slots_per_new_node(model),
                                            self._bandwidths(None), (), any_wait.source))
            targets[ANY_NODE] = Target("idle")
            for slurm_node in self.allocator.idle_nodes(model):
                if slurm_node in busy or slurm_node in exclude_nodes:
                    continue
                if not holding.get(slurm_node) and slurm_node not in known_nodes \
                        and self.settings.placement_policy != "random":
                    # The same estimate as ANY_NODE (its wait, the default bandwidths, nothing held), which wins
                    # the tie: at 1,000 nodes these candidates were most of placement's time. "random" draws
                    # among nodes, so it keeps them.
                    continue
                # Slurm is asked about the nodes holding the checkpoint (an allocation names them); any other
                # node waits as long as a job left to Slurm would.
                wait = self.allocator.new_allocation_wait(model, [slurm_node], now) \
                    if holding.get(slurm_node) else any_wait
                candidates.append(NodeCandidate(slurm_node, "idle", wait.seconds, self._slots_per_new_node(model),
                                                self._bandwidths(known_nodes.get(slurm_node)), (), wait.source))
                targets[slurm_node] = Target("idle", slurm_node=slurm_node)
        return candidates, holding, targets

    def _holding(self, model: DeployedModel) -> dict[str, set[str]]:
        """node -> what it holds of the model: whole copies by tier, and slice_holding items for the slice copies
        of the model's degree (a copy of another degree holds other slices)."""
        holding: dict[str, set[str]] = defaultdict(set)
        for entry in self.registry.cache(model=model.name):
            if entry.tensor_parallel is None:
                holding[entry.node_id].add(entry.tier)
            elif entry.tensor_parallel == model.tensor_parallel:
                holding[entry.node_id].add(slice_holding(entry.tier, entry.rank))
        return holding

    def _claims(self, model: DeployedModel, nodes, by_node: dict[str, list[InstanceRecord]], now: float
                ) -> dict[str, int]:
        """{node: slots kept} for the cold starts of other models: a node whose agent came up in an allocation made
        for another deployed model that has no instance yet (but in a group's own pool) keeps that model's slots (of
        this model's kind, GPU or CPU) for route_max_wait_seconds after the agent registered, the longest its
        waiting request waits.
        Else whichever agent registers first takes the first cold start to route, and the other model's request asks
        for one more allocation while its own comes up idle (the distinct-nodes e2e: 3 allocations for 2 models)."""
        models = {m.name: m for m in self.registry.models()}
        # A group's own pool serves only its group: the request the allocation was made for may be another's.
        private = {n.node_id for n in nodes if not visible_to(n.serves_group, None)}
        served = {inst.model for node_id, instances in by_node.items() if node_id not in private
                  for inst in instances}
        live = [n for n in nodes if n.state in ROUTABLE_NODE_STATES]
        claims: dict[str, int] = {}
        for alloc in self.registry.allocations(active_only=True):
            claimant = models.get(alloc.model)
            if claimant is None or claimant.name == model.name or claimant.name in served \
                    or bool(claimant.gpus) != bool(model.gpus):
                continue
            for node in allocation_agents(alloc, live):
                if now - node.registered_at < self.settings.route_max_wait_seconds:
                    claims[node.node_id] = claims.get(node.node_id, 0) + _slots(claimant)
        return claims

    def _other_models_nodes(self, model: DeployedModel, nodes, by_node: dict[str, list[InstanceRecord]]) -> set[str]:
        """keep_alive_policy "per-model" (a per-user launcher per model): nodes that are another model's, because
        an allocation made for it runs their agent or they run an instance of it."""
        live = [n for n in nodes if n.state in ("up", "draining")]
        taken = {n.node_id for a in self.registry.allocations(active_only=True) if a.model != model.name
                 for n in allocation_agents(a, live)}
        return taken | {node for node, instances in by_node.items() if any(i.model != model.name for i in instances)}

    def pending_allocations(self, model_name: str, nodes: Iterable[NodeRecord] | None = None
                            ) -> list[AllocationRecord]:
        """Allocations made for this model whose agent has not registered yet (queued, or starting up). Not one
        whose agent registered and was lost (silent past node_timeout_seconds): nothing is on its way there.
        nodes: the registry's nodes as the caller read them for the rest of its decision. Read again here, an agent
        registering in between would make its allocation neither a node of the caller's nor pending here."""
        states = ("up", "draining", "lost")
        registered = self.registry.nodes(states=states) if nodes is None else [n for n in nodes if n.state in states]
        return [a for a in self.registry.allocations(active_only=True) if a.model == model_name and (
            a.state == "pending" or (a.state == "running" and not allocation_agents(a, registered)))]

    @staticmethod
    def _ready_nodes_by_model(by_node: dict[str, list[InstanceRecord]],
                              known_nodes: dict[str, NodeRecord]) -> dict[str, set[str]]:
        """Per model, the routable nodes running a ready instance of it (where a moved instance's requests can go).
        Not a group's own pool: placement moves only instances of nodes that serve everyone (never a pool's), whose
        requests may not go there (move_instance's ready_target would find no target, and stop the instance)."""
        ready_on: dict[str, set[str]] = defaultdict(set)
        for node_id, instances in by_node.items():
            node = known_nodes.get(node_id)
            if node is None or node.state not in ROUTABLE_NODE_STATES or not visible_to(node.serves_group, None):
                continue
            for inst in instances:
                if inst.state == "ready":
                    ready_on[inst.model].add(node_id)
        return ready_on

    def _room(self, model: DeployedModel, node: NodeRecord, instances: list[InstanceRecord], now: float,
              restart_seconds: Callable[[str], float], ready_on: dict[str, set[str]],
              ) -> tuple[int, tuple[MovableInstance, ...], list[tuple[MovableInstance, float]]]:
        """Free slots on a node for this model, the instances that could be moved now to make more, and those that
        could be moved once they have served controller.min_residency_seconds (with the seconds left)."""
        same_kind = [i for i in instances if bool(i.gpu_ids) == bool(model.gpus)]
        if model.gpus:
            used = sum(len(i.gpu_ids) for i in same_kind)
            free = node.gpus - used
        else:
            # one CPU slot per rank an instance was started with, not its model's degree now (a redeploy)
            free = self.settings.cpu_slots_per_node - sum(i.tensor_parallel for i in same_kind)
        movable, young = [], []
        for inst in same_kind:
            if inst.state != "ready" or inst.model == model.name:
                continue
            cost = self._move_cost(inst)
            if inst.load and not ready_on.get(inst.model, set()) - {node.node_id}:
                cost += restart_seconds(inst.model)
            option = MovableInstance(inst.instance_id, len(inst.gpu_ids) if model.gpus else inst.tensor_parallel,
                                     cost)
            seconds_left = inst.requested_at + self.settings.min_residency_seconds - now
            if seconds_left > 0:
                young.append((option, seconds_left))
            else:
                movable.append(option)
        return free, tuple(movable), young

    def _restart_seconds(self, model_name: str, now: float, cache: dict[str, float], in_use: list[str]) -> float:
        """What moving a busy instance with no ready instance of its model elsewhere costs its requests besides the
        move: stopped, they resume only once a new instance of their model is up, at best on a new allocation
        (its queue wait) loaded from the shared FS. Counted in the move's cost, so placement never pushes a cold
        start onto running requests to spare the placed model the same wait (which made placement churn: each
        moved model's requests moved another one). Where no allocation can be made the move may still be the only
        way to start the placed model, and it is made."""
        if model_name not in cache:
            victim = self.registry.get_model(model_name)
            if victim is None:
                cache[model_name] = 0.0
            else:
                wait = self.allocator.new_allocation_wait(victim, [], now, in_use).seconds
                cache[model_name] = wait + load_time(victim.size_bytes, self.settings.default_sharedfs_gbps)
        return cache[model_name]

    def _move_cost(self, inst: InstanceRecord) -> float:
        if inst.running_requests == 0 and inst.routed_since_heartbeat == 0:
            return self.settings.eviction_seconds
        if inst.tokens_in_flight is not None and inst.prefill_tps:
            return self.settings.eviction_seconds + inst.tokens_in_flight / inst.prefill_tps
        return self.settings.migration_seconds_per_instance

    def _bandwidths(self, node: NodeRecord | None) -> dict[str, float]:
        bw = {"sharedfs": self.settings.default_sharedfs_gbps}
        if node is None:
            return bw
        for tier in ("dram", "nvme", "sharedfs"):
            info = getattr(node.tiers, tier)
            if info is not None:
                bw[tier] = info.read_gbps
        return bw

    def _slots_per_new_node(self, model: DeployedModel) -> int:
        """Slots an allocation made for this model offers (it asks for at least the model's GPUs)."""
        return self.allocator.gpus_requested(model) if model.gpus else self.settings.cpu_slots_per_node

    def _assign_gpus(self, model: DeployedModel, node: NodeRecord, freed: set[str]) -> list[int]:
        if not model.gpus:
            return []
        taken = set()
        for inst in self.registry.instances(node_id=node.node_id):
            if inst.instance_id not in freed:
                taken.update(inst.gpu_ids)
        free = [g for g in range(node.gpus) if g not in taken]
        return free[: model.gpus]

    # ------------------------------------------------------------------------------------------ restart

    def reconcile(self) -> None:
        """After a (re)start: re-read Slurm, then ask every live node agent which instances it really runs. Slurm
        not answering does not skip the agents (its AllocationFailed is raised after them: the ticks retry Slurm)."""
        self.refresh_context_lengths()
        now = self.clock()
        slurm_failed = None
        try:
            self.allocator.sync(now)
        except AllocationFailed as exc:
            slurm_failed = exc
        for node in self.registry.nodes(states=("up", "draining")):
            # What its agent may announce, as for its heartbeats: a pool token's agent, its own model only; one whose
            # token is missing or revoked (its heartbeats get 401), nothing, and its node is lost at once, as
            # revoke_credential does (the controller may have stopped between the revoke and that step): no route
            # goes to the instances it had, whether its agent answers or not.
            try:
                principal = CLUSTER if on_cluster_secret(node.credential_id) \
                    else _principal_of(node.credential_id, self.registry.get_credential(node.credential_id))
            except CredentialError as exc:
                log.error("reconcile: node %s is lost, its agent's credential is refused: %s", node.node_id, exc)
                self.registry.node_left(node.node_id, "lost")
                continue
            self.agents.set_key(node.agent_url, self._node_key_if_any(node))
            try:
                instances = self.agents.list_instances(node.agent_url)
            except AgentError as exc:
                # Not fatal: if the agent is really gone its heartbeats stop and the autoscaler declares it lost.
                log.warning("reconcile: node %s did not answer (%s)", node.node_id, exc)
                continue
            try:
                check_models(principal, [i.model for i in instances])
            except CredentialError as exc:
                log.error("reconcile: the instance list of node %s is refused: %s", node.node_id, exc)
                continue
            cached = [_cache_entry(c) for c in self.registry.cache(node_id=node.node_id)]
            # Reservations made just before the crash: if the agent started them it lists them now.
            for inst in self.registry.instances(node_id=node.node_id):
                if inst.reserved:
                    self.registry.delete_instance(inst.instance_id)
            # The job end stays what the agent last reported (a pool's hand-over plan): the instance list has none.
            try:
                self.registry.heartbeat(node.node_id, Heartbeat(cached=cached, instances=instances,
                                                                job_end=node.job_end,
                                                                agent_process=node.agent_process), now)
            except (ControllerError, ValidationError) as exc:  # one node's refused report: its heartbeats are too
                log.error("reconcile: the instance list of node %s is refused: %s", node.node_id, exc)
        log.info("reconciled: %d models, %d live nodes, %d instances, %d active allocations",
                 len(self.registry.models()), len(self.registry.nodes(states=("up", "draining"))),
                 len(self.registry.instances()), len(self.registry.allocations(active_only=True)))
        if slurm_failed is not None:
            raise slurm_failed


def _principal_of(credential_id: str, record: CredentialRecord | None) -> Principal:
    """The principal of a token's record (CredentialError 401: missing or revoked)."""
    if record is None:
        raise CredentialError(f"unknown hpcllm token {credential_id}", status=401)
    if record.revoked:
        raise CredentialError(f"hpcllm token {credential_id} was revoked"
                              f"{' (its Slurm job ended)' if record.kind == 'allocation' else ''}", status=401)
    return _principal(record)


def _principal(record: CredentialRecord) -> Principal:
    return Principal(kind=record.kind, credential_id=record.credential_id, model=record.model, group=record.group,
                     shared=record.shared, job_id=record.job_id)


def _credential_info(record: CredentialRecord) -> CredentialInfo:
    return CredentialInfo(credential_id=record.credential_id, kind=record.kind, model=record.model, group=record.group,
                          shared=record.shared, job_id=record.job_id, created_at=record.created_at,
                          revoked_at=record.revoked_at, note=record.note)


def is_retiring(alloc: AllocationRecord, now: float) -> bool:
    """Past its retire_at and not draining yet: replacements of its instances start elsewhere while it serves on
    (make before break, the autoscaler's step 5)."""
    return alloc.state == "running" and alloc.retire_at is not None and now >= alloc.retire_at


def allocation_agents(alloc: AllocationRecord, nodes: list[NodeRecord]) -> list[NodeRecord]:
    """The nodes (of `nodes`) whose agent runs in this allocation: same Slurm job id, registered since the allocation
    was submitted. Slurm reuses job ids after its state is wiped, so an older agent's stale row with the same id
    (it registered before this job existed) is not this allocation's agent."""
    return [n for n in nodes if n.slurm_job_id == alloc.job_id and n.registered_at >= alloc.submitted_at]


def _slots(model: DeployedModel) -> int:
    """GPUs, or CPU slots (one per tensor-parallel rank: the ranks of one instance run on one node)."""
    return model.gpus if model.gpus else model.tensor_parallel


def _rank_bytes(spec: ModelSpec, source: Path) -> list[int] | None:
    """Bytes each rank of a tensor-parallel model reads (planned from its index, nothing read); None for one rank
    or a checkpoint without strip hashes (placement then counts the whole model per rank: an upper bound)."""
    if spec.tensor_parallel == 1:
        return None
    from hpcllm.tp.mpiload import estimate_rank_reads

    try:
        return [nbytes for nbytes, _ in estimate_rank_reads(source, spec.tensor_parallel)]
    except Exception as exc:  # noqa: BLE001 - an estimate input: the deploy check already named real problems
        log.warning("no per-rank load estimate for %s: %s", spec.name, exc)
        return None


def _cache_entry(record) -> CacheEntry:
    return CacheEntry(model=record.model, tier=record.tier, bytes=record.bytes, verified=record.verified,
                      last_used=record.last_used, tensor_parallel=record.tensor_parallel, rank=record.rank)


def _check_tensor_parallel(spec: ModelSpec, source: Path) -> None:
    """tensor_parallel must split the model evenly: heads, KV heads, MLP and vocabulary (from config.json)."""
    if spec.tensor_parallel == 1:
        return
    from hpcllm.tp.plan import TensorParallelError, check_model_dir

    try:
        check_model_dir(source, spec.tensor_parallel)
    except TensorParallelError as exc:
        raise InvalidModelConfig(f"tensor_parallel: {exc}", param="tensor_parallel") from None
