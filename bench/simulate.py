"""Discrete-event simulation of hpcllm and its baselines on a large Slurm cluster, driving the REAL controller.

    .venv/bin/python bench/simulate.py [--nodes 1000] [--models 100] [--rate 2] [--duration 600] [--jobs 3]
        [--policies hpcllm,serverlessllm,no-locality,random,per-model,restart] [--preempt-rate 0.05] [--seed 0]
        [--trace trace.json] [--sweep [--sweep-nodes 100,300,1000] [--sweep-loads 1,3]]
    .venv/bin/python bench/simulate.py --calibrate-from bench/results/replay-latest.json [--own-costs] [--seeds 5]

No second copy of the policy: every decision is made by hpcllm.controller's own Controller (routing, placement,
migration of victims, migration targets) and Autoscaler (scale to zero, allocations, retirement, demand), on an
in-memory SQLite registry, with a simulated clock. Only their collaborators are simulated:

- Slurm (`SimSlurm`, a SlurmBackend): `--nodes` nodes of `--gpus-per-node` GPUs; a submitted allocation starts
  after an exponential queue wait (mean `--queue-wait`) on the node it names if that node is free (else it waits
  for it), or on the first free node; `sbatch --test-only` answers the mean wait (or, for a busy named node, its
  job's end); `squeue --start` answers each queued job's planned start; `scontrol requeue` stops a running job,
  which keeps its id and queues again. Jobs end at their walltime, when cancelled, or when preempted
  (`--preempt-rate` per allocation-hour; the node then goes to the preemptor for an hour).
- Node agents (`SimAgents`, an AgentClient): an agent registers `controller.agent_start_seconds` after its job
  starts, with the tier bandwidths below and its node's persistent NVMe cache; an instance is ready after
  `--instance-overhead` + size / bandwidth of the fastest tier holding the checkpoint (DRAM, NVMe, shared FS), and
  then caches it in DRAM and NVMe (LRU, unless the model's cache_on_load is []). Heartbeats go to the real
  controller when an instance changes state and every tick for nodes whose load changed. A preempted agent drains
  as the real one does: with node.on_preempt = "migrate" it asks the controller for a migration target and moves
  its running requests live (a `--handover` pause), else (no ready target, or "restart") the requests resume
  through the gateway by prefilling prompt + generated tokens again on another instance.
- Workers: continuous batching up to 32 running requests per instance; prefill at a per-size rate, then one
  token per time-per-output-token (TPOT); both per size class below (A100-class vLLM figures, assumptions: no
  GPU was measured here).
- Gateway: a request is routed with the controller's route API; while the model starts it waits and is routed
  again when an instance becomes ready, when an allocation made for its model registers, and every 20 s (the
  gateway's route long-poll); it is lost after
  gateway.route_timeout_seconds (600 s) without an instance.

--calibrate-from: the dev cluster's shape and the costs a bench/replay.py run measured (bench/calibration.py;
queue waits, agent and instance starts drawn from the measured lists, instance starts sharing the host's CPU,
decode slowed by the requests decoding beside it), the replay's trace; prints simulated vs measured with the
relative errors and writes bench/results/calibration-latest.json and .png.

Measured inputs: tier bandwidths from bench/results/load-latest.json (hpcllm DRAM tier and cold disk GB/s, onto the
GPU where that run had one; never from a --quick run, nor from a cold row that was not cold) and the live-migration
pause from bench/results/migration-latest.json, when present; otherwise the documented defaults below (printed with
their source). Prints per policy: mean / p50 / p99 TTFT and end-to-end latency, cold starts by tier, GPU-slot-hours
held by allocations, requests lost; writes bench/results/simulate-<time>.json and PNG plots (TTFT CDFs, TTFT over
time, held GPU-hours; --sweep: p99 TTFT and GPU-hours against cluster size and load).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import logging
import platform
import random
import sys
import tempfile
import shutil
import time
from collections import OrderedDict, defaultdict, deque
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench.benchkit import new_result_stem, require_at_least  # noqa: E402
from load import COLD_THRESHOLD  # noqa: E402
from workload import ModelInfo, Request, WorkloadParams, add_arguments, generate, load_trace, params_from  # noqa: E402

from hpcllm.config import parse_config  # noqa: E402
from hpcllm.controller.agents import AgentClient, StartedInstance  # noqa: E402
from hpcllm.controller.allocations import Allocator  # noqa: E402
from hpcllm.controller.autoscaler import Autoscaler  # noqa: E402
from hpcllm.controller.errors import ControllerError  # noqa: E402
from hpcllm.controller.protocol import (  # noqa: E402
    CacheEntry,
    Heartbeat,
    InstanceInfo,
    MigratedOut,
    MigrationTarget,
    MigrationTargetRequest,
    ModelSpec,
    NodeRegistration,
    RouteReady,
    TierInfo,
    Tiers,
)
from hpcllm.controller.registry import Registry  # noqa: E402
from hpcllm.controller.service import Controller  # noqa: E402
from hpcllm.slurm.base import (  # noqa: E402
    JobState,
    JobStatus,
    NodeInfo,
    PartitionInfo,
    SlurmBackend,
    StartEstimate,
)
from hpcllm.slurm.errors import SlurmError  # noqa: E402
from hpcllm.worker.protocol import MigrationResult  # noqa: E402

RESULTS = REPO / "bench" / "results"
GB = 10**9
PARTITION = "gpu"
MAX_BATCH = 32
# Waiting requests are routed again every this many ticks (4 x 5 s: the gateway's 20 s route long-poll), besides
# when an instance of their model becomes ready or an allocation made for it registers its agent.
ROUTE_POLL_TICKS = 4
# Per size class: prefill tokens/s and seconds per output token of one instance (vLLM on A100-class GPUs, the
# instance's GPUs together). Assumptions, not measurements: this machine has no GPU.
SERVICE = {"7b": (10000.0, 0.015), "13b": (6000.0, 0.022), "34b": (5000.0, 0.030), "70b": (3500.0, 0.040)}
DEFAULT_BANDWIDTH = {"dram": 20.0, "nvme": 5.0, "sharedfs": 1.2}  # GB/s per node, see docs/evidence.md
DEFAULT_HANDOVER = 0.134  # s: live-migration pause, docs/migration.md (900-token context, median)

# The policies compared, each as configuration of the real controller (docs/placement.md "Baseline policies").
POLICIES = {
    "hpcllm": {},
    "serverlessllm": {"controller": {"placement_policy": "serverlessllm"}},
    "no-locality": {"controller": {"placement_policy": "no-locality"}, "model": {"cache_on_load": []}},
    "random": {"controller": {"placement_policy": "random"}},
    "per-model": {"controller": {"keep_alive_policy": "per-model"}},
    "restart": {"node": {"on_preempt": "restart"}},
}


@dataclass
class SimParams:
    nodes: int = 1000
    gpus_per_node: int = 4
    queue_wait: float = 60.0  # mean Slurm queue wait of an allocation, s (exponential)
    instance_overhead: float = 2.0  # worker start besides reading the weights, s
    bandwidth: dict = field(default_factory=lambda: dict(DEFAULT_BANDWIDTH))
    bandwidth_source: str = "defaults"
    handover: float = DEFAULT_HANDOVER
    handover_source: str = "docs/migration.md"
    dram_capacity_gb: float = 512.0
    nvme_capacity_gb: float = 3000.0
    preempt_rate: float = 0.05  # preemptions per allocation-hour
    preempt_at: float | None = None  # s after the start: one preemption of the busiest node (--compare)
    walltime: str = "04:00:00"
    max_instances: int = 4
    tail: float = 900.0  # s simulated after the last arrival, for requests to finish
    seed: int = 0
    service: dict = field(default_factory=lambda: dict(SERVICE))
    controller: dict = field(default_factory=dict)  # extra [controller] keys (--compare: the replay's)
    # Seconds after the start up to which held slots count (None: to the end of the run). --compare: when the
    # replay stopped its stack (its last request done), so both count the same span.
    cost_horizon: float | None = None
    # Measured costs (--calibrate-from, bench/calibration.py): each allocation's queue wait, job start to agent, and
    # instance start besides the weights drawn from these lists instead of the exponential / constants above; and
    # per size class, decode seconds per token = base + per_request * (requests decoding on the host - 1) (one
    # shared host, as the dev cluster is).
    queue_wait_samples: list[float] | None = None
    agent_start_samples: list[float] | None = None
    instance_start_samples: list[float] | None = None
    decode_contention: dict | None = None  # size -> (base, per_request)
    # Instance starts share the host's CPU (the dev cluster): with k starting at once each proceeds at
    # min(1, start_capacity / k) of its own pace (instance_start_samples are then each start's time alone).
    start_capacity: float | None = None


# ----------------------------------------------------------------------------------------------- event loop


class Loop:
    def __init__(self, start: float):
        self.now = start
        self._heap: list = []
        self._seq = itertools.count()

    def __call__(self) -> float:  # the controller's clock
        return self.now

    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._heap, (max(t, self.now), next(self._seq), fn, args))

    def run(self, until: float) -> None:
        while self._heap and self._heap[0][0] <= until:
            t, _, fn, args = heapq.heappop(self._heap)
            self.now = t
            fn(*args)
        self.now = until


# -------------------------------------------------------------------------------------------------- requests


@dataclass
class SimRequest:
    req: Request
    generated: int = 0
    first_token: float | None = None
    done: float | None = None
    lost: bool = False
    instance: SimInstance | None = None
    version: int = 0
    decode_from: float = 0.0  # when the tokens after `generated` started coming (at this instance)
    first_due: float | None = None  # when the first token comes, if the request stays where it runs
    resumes: int = 0
    migrations: int = 0
    tpot: float = 0.0  # seconds per output token where it runs now (set when it starts running there)

    def progress(self, now: float) -> None:
        """Count the tokens generated on the current instance up to now."""
        if self.first_token is None and self.first_due is not None and now >= self.first_due:
            self.first_token = self.first_due
        if self.instance is not None and self.req.id in self.instance.running and now > self.decode_from:
            made = int((now - self.decode_from) / self.tpot)
            self.generated = min(self.req.output_tokens, self.generated + made)
            self.decode_from += made * self.tpot


@dataclass
class SimInstance:
    instance_id: str
    model: ModelInfo
    node: SimNode
    gpu_ids: list[int]
    url: str
    state: str = "loading"
    load_tier: str | None = None
    load_seconds: float | None = None
    running: dict[int, SimRequest] = field(default_factory=dict)
    queue: deque = field(default_factory=deque)

    def info(self) -> InstanceInfo:
        prefill, _ = self.node.sim.params.service[self.model.size_class]
        tokens = sum(r.req.prompt_tokens + r.generated for r in self.running.values())
        return InstanceInfo(instance_id=self.instance_id, model=self.model.name, state=self.state,
                            worker_url=self.url, gpu_ids=self.gpu_ids,
                            running_requests=len(self.running) + len(self.queue), load_tier=self.load_tier,
                            load_seconds=self.load_seconds, tokens_in_flight=tokens if self.running else None,
                            prefill_tokens_per_second=prefill)


@dataclass
class SimNode:
    sim: Simulation
    node_id: str
    job_id: str
    url: str
    instances: dict[str, SimInstance] = field(default_factory=dict)
    dram: OrderedDict = field(default_factory=OrderedDict)  # model -> bytes (LRU order), gone with the job
    busy_until: float = 0.0  # slots freed by migrations become usable then
    draining: bool = False
    registered: bool = False
    dirty: bool = True  # requests came or went since the last heartbeat

    @property
    def nvme(self) -> OrderedDict:  # persistent node-local disk: outlives the job
        return self.sim.nvme[self.node_id]

    def cached(self) -> list[CacheEntry]:
        return [CacheEntry(model=m, tier=tier, bytes=b, verified=True)
                for tier, store in (("dram", self.dram), ("nvme", self.nvme)) for m, b in store.items()]

    def best_tier(self, model: str) -> str:
        bw = self.sim.params.bandwidth
        held = [t for t, store in (("dram", self.dram), ("nvme", self.nvme)) if model in store]
        return max(held + ["sharedfs"], key=lambda t: bw[t])

    def cache(self, model: ModelInfo) -> None:
        for store, capacity in ((self.dram, self.sim.params.dram_capacity_gb), (self.nvme,
                                                                                  self.sim.params.nvme_capacity_gb)):
            store.pop(model.name, None)
            store[model.name] = model.size_bytes
            while sum(store.values()) > capacity * GB and len(store) > 1:
                store.popitem(last=False)

    def load(self) -> int:
        return sum(len(i.running) + len(i.queue) for i in self.instances.values())


class SharedStarts:
    """Instance starts sharing one host's CPU (processor sharing): each needs `work` seconds alone; with k in
    progress each advances at min(1, capacity / k). Its ready event is re-planned whenever k changes."""

    def __init__(self, sim: Simulation, capacity: float):
        self.sim, self.capacity = sim, capacity
        self.left: dict[str, float] = {}  # instance id -> seconds of work left
        self.since = 0.0
        self.version = 0

    def rate(self) -> float:
        return min(1.0, self.capacity / max(1, len(self.left)))

    def _advance(self) -> None:
        now = self.sim.loop.now
        done = (now - self.since) * self.rate()
        for key in self.left:
            self.left[key] = max(0.0, self.left[key] - done)
        self.since = now

    def _replan(self) -> None:
        self.version += 1
        rate = self.rate()
        for key, left in self.left.items():
            self.sim.loop.at(self.sim.loop.now + left / rate, self._finish, key, self.version)

    def add(self, inst: SimInstance, work: float) -> None:
        self._advance()
        self.left[inst.instance_id] = work
        self._replan()

    def _finish(self, key: str, version: int) -> None:
        if version != self.version or key not in self.left:
            return
        self._advance()
        del self.left[key]
        self._replan()
        inst = self.sim.instances.get(key)
        if inst is not None:
            self.sim.instance_ready(inst)

    def drop(self, inst: SimInstance) -> None:
        if inst.instance_id in self.left:
            self._advance()
            del self.left[inst.instance_id]
            self._replan()


# ------------------------------------------------------------------------------------------------ Slurm


@dataclass
class SimJob:
    job_id: str
    spec: object
    submitted: float
    planned_start: float
    state: JobState = JobState.PENDING
    node: str | None = None
    start_time: float | None = None
    end_time: float | None = None
    restarts: int = 0  # requeues: the job keeps its id; events of an earlier run are ignored


class SimSlurm(SlurmBackend):
    """Slurm for the simulation: jobs start after a drawn queue wait on a free node (see the module docstring)."""

    name = "sim"

    def __init__(self, sim: Simulation):
        self.sim = sim
        self.loop = sim.loop
        self.node_names = [f"n{i:04d}" for i in range(sim.params.nodes)]
        self.holder: dict[str, str] = {}  # node -> job id, or "other" (a preemptor)
        self.jobs: dict[str, SimJob] = {}
        self.waiting: list[str] = []  # started jobs that found no node: retried when one frees
        self._ids = itertools.count(1)
        self._node_infos: list[NodeInfo] | None = None
        self.walltime = parse_seconds(sim.params.walltime)

    def submit(self, spec) -> str:
        job_id = str(next(self._ids))
        self.jobs[job_id] = SimJob(job_id, spec, self.loop.now, self.loop.now)
        self._queue(self.jobs[job_id])
        return job_id

    def _queue(self, job: SimJob) -> None:
        """A drawn queue wait, then the job starts where it can."""
        params = self.sim.params
        if params.queue_wait_samples:
            wait = self.sim.rng.choice(params.queue_wait_samples)
        else:
            wait = self.sim.rng.expovariate(1.0 / params.queue_wait) if params.queue_wait else 0.0
        job.planned_start = self.loop.now + wait
        self.loop.at(job.planned_start, self._try_start, job.job_id)

    def _free_node(self, spec) -> str | None:
        if spec.nodelist:
            return spec.nodelist[0] if spec.nodelist[0] not in self.holder else None
        exclude = set(spec.exclude)
        return next((n for n in self.node_names if n not in self.holder and n not in exclude), None)

    def _try_start(self, job_id: str) -> None:
        job = self.jobs[job_id]
        if job.state != JobState.PENDING:
            return
        node = self._free_node(job.spec)
        if node is None:
            if job_id not in self.waiting:
                self.waiting.append(job_id)
            return
        if job_id in self.waiting:
            self.waiting.remove(job_id)
        job.state, job.node, job.start_time = JobState.RUNNING, node, self.loop.now
        job.end_time = self.loop.now + self.walltime
        self.holder[node] = job_id
        self._node_infos = None
        self.loop.at(job.end_time, self._walltime_over, job_id, job.restarts)
        agent_start = self.sim.rng.choice(self.sim.params.agent_start_samples) \
            if self.sim.params.agent_start_samples else self.sim.config.controller.agent_start_seconds
        self.loop.at(self.loop.now + agent_start, self.sim.agent_up, job)

    def _walltime_over(self, job_id: str, run: int) -> None:
        if self.jobs[job_id].restarts == run:  # not an earlier run of a requeued job
            self.end(job_id, JobState.TIMEOUT)

    def end(self, job_id: str, state: JobState) -> None:
        job = self.jobs[job_id]
        if job.state.is_terminal:
            return
        was_running = job.state == JobState.RUNNING
        job.state = state
        if was_running:
            job.end_time = min(job.end_time, self.loop.now)
            self._node_freed(job)

    def _node_freed(self, job: SimJob) -> None:
        """A running job stopped (ended or requeued): its agent is gone, its node goes to a waiting job."""
        if self.holder.get(job.node) == job.job_id:
            del self.holder[job.node]
        self._node_infos = None
        self.sim.agent_gone(job)
        for waiting in list(self.waiting):
            self._try_start(waiting)

    def hold_for_other(self, node: str, seconds: float) -> None:
        self.holder[node] = "other"
        self._node_infos = None
        self.loop.at(self.loop.now + seconds, self._release_other, node)

    def _release_other(self, node: str) -> None:
        if self.holder.get(node) == "other":
            del self.holder[node]
            self._node_infos = None
            for waiting in list(self.waiting):
                self._try_start(waiting)

    def _status(self, job: SimJob) -> JobStatus:
        return JobStatus(job_id=job.job_id, state=job.state, raw_state=job.state.value,
                         nodes=(job.node,) if job.node else (), name=job.spec.name, start_time=job.start_time,
                         end_time=job.end_time, comment=job.spec.comment, restart_count=job.restarts)

    def statuses(self, job_ids):
        return {j: self._status(self.jobs[j]) if j in self.jobs else
                JobStatus(job_id=j, state=JobState.UNKNOWN, missing=True) for j in job_ids}

    def list_jobs(self):
        return {j: self._status(job) for j, job in self.jobs.items()}

    def cancel(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None:
            self.end(job_id, JobState.CANCELLED)

    def requeue(self, job_id: str) -> None:
        """As `scontrol requeue`: a running job stops (its agent goes), keeps its id and queues again for a drawn
        wait; a pending one stays queued. Slot-time already held counts (`runs`); a finished job cannot be
        requeued."""
        job = self.jobs.get(job_id)
        if job is None or job.state.is_terminal:
            raise SlurmError(f"requeue of job {job_id}: {'unknown job' if job is None else 'job already finished'}")
        if job.state != JobState.RUNNING:
            return
        self.sim.held_runs.append((job.start_time, self.loop.now))
        job.state, job.restarts, job.start_time, job.end_time = JobState.PENDING, job.restarts + 1, None, None
        self._node_freed(job)
        job.node = None
        self._queue(job)

    def signal(self, job_id: str, sig: str, batch_only: bool = True) -> None:
        pass

    def nodes(self) -> list[NodeInfo]:
        if self._node_infos is None:
            gpus = self.sim.params.gpus_per_node
            self._node_infos = [NodeInfo(name=n, state="ALLOCATED" if n in self.holder else "IDLE",
                                         partitions=(PARTITION,), gpus_total=gpus,
                                         gpus_used=gpus if n in self.holder else 0) for n in self.node_names]
        return self._node_infos

    def partitions(self):
        return [PartitionInfo(name=PARTITION, nodes=tuple(self.node_names))]

    def estimate_start(self, spec):
        if spec.nodelist and spec.nodelist[0] in self.holder:
            job = self.jobs.get(self.holder[spec.nodelist[0]])
            start = job.end_time if job is not None else self.loop.now + 3600
        else:
            start = self.loop.now + self.sim.params.queue_wait
        return StartEstimate(start_time=start, source="test-only")

    def pending_start_times(self, job_ids):
        return {j: StartEstimate(start_time=max(self.jobs[j].planned_start, self.loop.now), source="squeue-start")
                for j in job_ids if j in self.jobs and self.jobs[j].state == JobState.PENDING}


# ------------------------------------------------------------------------------------------- node agents


class SimAgents(AgentClient):
    """The controller's calls to node agents, answered by the simulated nodes."""

    def __init__(self, sim: Simulation):  # no HTTP client
        self.sim = sim
        self._ids = itertools.count(1)
        self._keys: dict[str, str] = {}  # AgentClient's per-agent node keys (none here)

    def close(self) -> None:
        pass

    def start_instance(self, agent_url, model, source, gpu_ids, max_model_len=None, engine="hpcllm",
                       cache_on_load=None, tensor_parallel=1, nodes=1, lora_adapters=None) -> StartedInstance:
        # lora_adapters: the simulated models have none (an adapter's few MB would not change a start's time)
        sim = self.sim
        node = sim.node_by_url[agent_url]
        info = sim.models[model]
        instance_id = f"i{next(self._ids)}"
        inst = SimInstance(instance_id, info, node, list(gpu_ids), f"{agent_url}/w/{instance_id}")
        node.instances[instance_id] = inst
        sim.instances[instance_id] = inst
        tier = node.best_tier(model)
        overhead = sim.rng.choice(sim.params.instance_start_samples) if sim.params.instance_start_samples \
            else sim.params.instance_overhead
        seconds = overhead + info.size_bytes / (sim.params.bandwidth[tier] * GB)
        inst.load_tier, inst.load_seconds = tier, round(seconds, 3)
        if sim.params.start_capacity:
            sim.starts.add(inst, max(0.0, node.busy_until - sim.loop.now) + seconds)
        else:
            sim.loop.at(max(sim.loop.now, node.busy_until) + seconds, sim.instance_ready, inst)
        return StartedInstance(instance_id, inst.url)

    def stop_instance(self, agent_url, instance_id) -> None:
        inst = self.sim.instances.get(instance_id)
        if inst is not None:
            self.sim.stop_instance(inst)

    def migrate_out(self, agent_url, instance_id, destination_url, timeout, ticket=None) -> MigratedOut:
        sim = self.sim
        source = sim.instances[instance_id]
        target = sim.instance_by_url.get(destination_url)
        moved = []
        if target is not None and target.state == "ready":
            tokens = sum(r.req.prompt_tokens + r.generated for r in source.running.values())
            moved = sim.move_requests(source, target)
            # The slots free once the destination has prefilled the moved requests (the controller's estimate).
            prefill, _ = sim.params.service[source.model.size_class]
            source.node.busy_until = sim.loop.now + tokens / prefill
        sim.stop_instance(source)
        return MigratedOut(instance_id=instance_id, model=source.model.name, destination_url=destination_url,
                           migrated=moved, seconds=0.0)

    def list_instances(self, agent_url) -> list[InstanceInfo]:
        return [i.info() for i in self.sim.node_by_url[agent_url].instances.values()]


# ----------------------------------------------------------------------------------------------- the run


class Simulation:
    def __init__(self, policy: str, models: list[ModelInfo], requests: list[Request], params: SimParams,
                 workdir: Path):
        self.policy, self.params = policy, params
        self.models = {m.name: m for m in models}
        self.requests = [SimRequest(r) for r in requests]
        self.rng = random.Random(params.seed)
        self.loop = Loop(1_000_000.0)
        self.start = self.loop.now
        overrides = POLICIES[policy]
        self.config = parse_config({
            "paths": {"state_dir": str(workdir / "state"), "models_dir": str(workdir / "models")},
            "cluster": {"shared_secret": "simulation"},
            "slurm": {"partition": PARTITION, "time": params.walltime, "gpus_per_node": params.gpus_per_node},
            "node": overrides.get("node", {}),
            "controller": {"database_url": "sqlite:///:memory:", "max_allocations": params.nodes,
                           # Agents heartbeat on changes only; no node is lost for silence (nodes end with jobs).
                           "node_timeout_seconds": 10**9,
                           # Slurm answers are simulated, so asking every time costs nothing and is never stale.
                           "slurm_nodes_ttl_seconds": 0, "queue_estimate_ttl_seconds": 0,
                           # Ended allocations are kept for `hpcllm status` only (and 5 x preferred_node_wait_seconds
                           # for placement): a shorter history keeps the registry reads of a long run small.
                           "history_seconds": 600,
                           **params.controller, **overrides.get("controller", {})}})
        self.nvme: dict[str, OrderedDict] = defaultdict(OrderedDict)
        self.starts = SharedStarts(self, params.start_capacity) if params.start_capacity else None
        self.slurm = SimSlurm(self)
        self.registry = Registry(self.config.controller.database_url)
        self.allocator = Allocator(self.config, self.registry, self.slurm, "http://controller:8700", clock=self.loop)
        self.agents = SimAgents(self)
        self.controller = Controller(self.config, self.registry, self.agents, self.allocator, clock=self.loop)
        self.autoscaler = Autoscaler(self.controller)
        self.node_by_url: dict[str, SimNode] = {}
        self.nodes: dict[str, SimNode] = {}  # live agents by node id
        self.instances: dict[str, SimInstance] = {}
        self.instance_by_url: dict[str, SimInstance] = {}
        self.waiting: dict[str, list[SimRequest]] = defaultdict(list)
        self.cold_starts: list[dict] = []
        self.held_runs: list[tuple[float, float]] = []  # (start, stop) of runs of jobs requeued since
        self.preemptions = 0
        self.preempt_migrated = 0  # requests live-migrated by preempted agents' drains
        self.ticks = 0
        self.live_migrated = 0
        self._deploy(workdir / "models", overrides.get("model", {}))

    def _deploy(self, folder: Path, model_fields: dict) -> None:
        for m in self.models.values():
            source = folder / m.name
            source.mkdir(parents=True, exist_ok=True)
            (source / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 16384}')
            self.controller.deploy(ModelSpec(name=m.name, source=str(source), size_bytes=m.size_bytes, gpus=m.gpus,
                                             max_instances=self.params.max_instances, **model_fields))

    # ---------------------------------------------------------------------------------------- agents

    def agent_up(self, job: SimJob) -> None:
        if job.state != JobState.RUNNING:
            return
        url = f"http://{job.node}.j{job.job_id}:9000"
        node = SimNode(self, job.node, job.job_id, url)
        self.node_by_url[url] = node
        self.nodes[job.node] = node
        bw = self.params.bandwidth
        tiers = Tiers(dram=TierInfo(capacity_bytes=int(self.params.dram_capacity_gb * GB), read_gbps=bw["dram"]),
                      nvme=TierInfo(capacity_bytes=int(self.params.nvme_capacity_gb * GB), read_gbps=bw["nvme"],
                                    scope="persistent"),
                      sharedfs=TierInfo(read_gbps=bw["sharedfs"]))
        try:
            self.controller.register(NodeRegistration(node_id=job.node, agent_url=url, slurm_job_id=job.job_id,
                                                      job_scoped=True, gpus=job.spec.gpus_per_node or
                                                      self.params.gpus_per_node, tiers=tiers,
                                                      cached=node.cached()))
        except ControllerError:
            # The node's previous job ended and the controller has not polled Slurm since: like a real agent,
            # register again shortly.
            del self.node_by_url[url], self.nodes[job.node]
            self.loop.at(self.loop.now + self.config.controller.tick_seconds, self.agent_up, job)
            return
        node.registered = True
        alloc = self.registry.get_allocation(job.job_id)
        if alloc is not None and alloc.model:
            self.retry(alloc.model)  # the route long-poll of the model it was made for wakes up

    def agent_gone(self, job: SimJob) -> None:
        """The job ended: its agent and instances are gone (their requests resume through the gateway)."""
        node = self.nodes.get(job.node)
        if node is None or node.job_id != job.job_id:
            return
        for inst in list(node.instances.values()):
            self.stop_instance(inst, heartbeat=False)
        node.registered = False
        del self.nodes[job.node]

    def heartbeat(self, node: SimNode) -> None:
        if not node.registered or self.nodes.get(node.node_id) is not node:
            return
        node.dirty = False
        try:
            outcome = self.controller.heartbeat(node.node_id, Heartbeat(
                cached=node.cached(), instances=[i.info() for i in node.instances.values()],
                draining=node.draining))
        except ControllerError:  # the controller already saw its job end
            node.registered = False
            return
        if outcome.state not in ("up", "draining"):
            node.registered = False

    def instance_ready(self, inst: SimInstance) -> None:
        if inst.state != "loading" or inst.instance_id not in self.instances:
            return
        inst.state = "ready"
        self.instance_by_url[inst.url] = inst
        self.cold_starts.append({"t": self.loop.now - self.start, "model": inst.model.name, "tier": inst.load_tier,
                                 "load_seconds": inst.load_seconds, "node": inst.node.node_id})
        deployed = self.registry.get_model(inst.model.name)
        if deployed is not None and deployed.cache_on_load != []:  # None: the node's default, DRAM and NVMe
            inst.node.cache(inst.model)
        self.heartbeat(inst.node)
        self.retry(inst.model.name)

    def stop_instance(self, inst: SimInstance, heartbeat: bool = True) -> None:
        """Stop a worker: requests still on it are aborted and resume through the gateway from their tokens."""
        if self.instances.pop(inst.instance_id, None) is None:
            return
        if self.params.start_capacity:
            self.starts.drop(inst)
        inst.node.instances.pop(inst.instance_id, None)
        self.instance_by_url.pop(inst.url, None)
        inst.state = "stopped"
        for req in list(inst.running.values()) + [r for r, _ in inst.queue]:
            req.progress(self.loop.now)
            self._detach(req)
            req.resumes += 1
            self.loop.at(self.loop.now, self.route, req)
        inst.running.clear()
        inst.queue.clear()
        if heartbeat:
            self.loop.at(self.loop.now, self.heartbeat, inst.node)  # after the controller call that stopped it

    def move_requests(self, source: SimInstance, target: SimInstance) -> list[MigrationResult]:
        """Live migration: the target prefilled their tokens while the source decoded; a short hand-over pause."""
        moved = []
        for req in list(source.running.values()) + [r for r, _ in source.queue]:
            req.progress(self.loop.now)
            self._detach(req)
            req.migrations += 1
            self.live_migrated += 1
            self.loop.at(self.loop.now + self.params.handover, self.admit, target, req, True)
            moved.append(MigrationResult(request_id=str(req.req.id), destination_url=target.url,
                                         destination_request_id=str(req.req.id), rounds=1,
                                         tokens_per_round=[req.req.prompt_tokens + req.generated],
                                         handover_seconds=self.params.handover, total_seconds=self.params.handover,
                                         output_tokens_at_handover=req.generated))
        source.running.clear()
        source.queue.clear()
        return moved

    def preempt(self, job: SimJob) -> None:
        """Slurm preempts an allocation: its agent drains as hpcllm's does (node.on_preempt), then the job ends and
        the node goes to the preemptor."""
        node = self.nodes.get(job.node)
        if job.state != JobState.RUNNING:
            return
        self.preemptions += 1
        if node is not None:
            node.draining = True
            for inst in node.instances.values():
                if inst.state == "ready":
                    inst.state = "draining"
            self.heartbeat(node)
            if self.config.node.on_preempt == "migrate":
                for inst in list(node.instances.values()):
                    if inst.running or inst.queue:
                        self._migrate_on_drain(node, inst)
        self.slurm.end(job.job_id, JobState.PREEMPTED)
        self.slurm.hold_for_other(job.node, 3600.0)

    def preempt_busiest(self) -> None:
        """One preemption where bench/replay.py --preempt-at injects it: the node running the most requests."""
        busy = [n for n in self.nodes.values() if self.slurm.jobs[n.job_id].state == JobState.RUNNING]
        if busy:
            self.preempt(self.slurm.jobs[max(busy, key=lambda n: n.load()).job_id])

    def _migrate_on_drain(self, node: SimNode, inst: SimInstance) -> None:
        try:
            target = self.controller.migration_target(MigrationTargetRequest(model=inst.model.name,
                                                                              exclude_node=node.node_id))
        except ControllerError:
            return
        if isinstance(target, MigrationTarget) and target.instance_id in self.instances:
            dest = self.instances[target.instance_id]
            if dest.state == "ready":
                self.preempt_migrated += len(self.move_requests(inst, dest))

    # ---------------------------------------------------------------------------------------- gateway

    def arrive(self, req: SimRequest) -> None:
        self.route(req)

    def route(self, req: SimRequest) -> None:
        if req.done is not None or req.lost:
            return
        try:
            outcome = self.controller.route_once(req.req.model)
        except ControllerError:
            outcome = None
        if isinstance(outcome, RouteReady):
            inst = self.instances.get(outcome.instance_id)
            if inst is not None and inst.state == "ready":
                self.admit(inst, req)
                return
        self.waiting[req.req.model].append(req)

    def retry(self, model: str) -> None:
        """Route a model's waiting requests again: one route call for the first (the controller answers the same
        for all while the model starts), then one per request once an instance is ready (each picks the least
        loaded instance and may scale out)."""
        waiting = [r for r in self.waiting.pop(model, []) if r.done is None and not r.lost]
        if not waiting:
            return
        self.route(waiting[0])
        if self.waiting.get(model):  # still not ready: the others keep waiting
            self.waiting[model].extend(waiting[1:])
            return
        for req in waiting[1:]:
            self.route(req)

    def retry_all(self) -> None:
        for model in [m for m, reqs in self.waiting.items() if reqs]:
            self.retry(model)

    def admit(self, inst: SimInstance, req: SimRequest, migrated: bool = False) -> None:
        if inst.instance_id not in self.instances or inst.state not in ("ready",):
            req.resumes += 1
            self.route(req)  # its instance went away meanwhile: the gateway routes again
            return
        req.instance = inst
        if len(inst.running) >= MAX_BATCH:
            inst.queue.append((req, migrated))
            return
        self._run(inst, req, migrated)

    def _run(self, inst: SimInstance, req: SimRequest, migrated: bool) -> None:
        prefill_tps, tpot = self.params.service[inst.model.size_class]
        if self.params.decode_contention:
            base, per_request = self.params.decode_contention[inst.model.size_class]
            tpot = base + per_request * sum(len(i.running) for i in self.instances.values())
        now = self.loop.now
        req.tpot = tpot
        req.instance = inst
        req.version += 1
        inst.running[req.req.id] = req
        inst.node.dirty = True
        prefill = 0.0 if migrated else (req.req.prompt_tokens + req.generated) / prefill_tps
        req.decode_from = now + prefill
        req.first_due = now + prefill + tpot
        left = req.req.output_tokens - req.generated
        self.loop.at(now + prefill + left * tpot, self.finish, req, req.version)

    def finish(self, req: SimRequest, version: int) -> None:
        if version != req.version or req.instance is None:
            return
        inst = req.instance
        req.progress(self.loop.now)
        req.generated, req.done = req.req.output_tokens, self.loop.now
        self._detach(req)
        while inst.queue and len(inst.running) < MAX_BATCH:
            queued, migrated = inst.queue.popleft()
            self._run(inst, queued, migrated)

    def _detach(self, req: SimRequest) -> None:
        inst = req.instance
        if inst is not None:
            inst.node.dirty = True
            inst.running.pop(req.req.id, None)
            inst.queue = deque((r, m) for r, m in inst.queue if r is not req)
        req.instance = None
        req.first_due = None
        req.version += 1

    # ------------------------------------------------------------------------------------------- ticks

    def tick(self) -> None:
        now = self.loop.now
        for node in list(self.nodes.values()):
            if node.registered and node.dirty:  # a real agent heartbeats every 5 s: its load and last use
                self.heartbeat(node)
        self.autoscaler.tick(now)
        timeout = self.config.gateway.route_timeout_seconds
        for model, reqs in list(self.waiting.items()):
            for req in reqs:
                if now - req.req.t - self.start > timeout:
                    req.lost = True
            self.waiting[model] = [r for r in reqs if not r.lost]
        self.ticks += 1
        if self.ticks % ROUTE_POLL_TICKS == 0:
            self.retry_all()
        if self.params.preempt_rate > 0:
            p = self.params.preempt_rate * self.config.controller.tick_seconds / 3600.0
            for job in [j for j in self.slurm.jobs.values() if j.state == JobState.RUNNING]:
                if self.rng.random() < p:
                    self.preempt(job)
        self.loop.at(now + self.config.controller.tick_seconds, self.tick)

    def run(self) -> dict:
        began, cpu = time.perf_counter(), time.process_time()
        for req in self.requests:
            self.loop.at(self.start + req.req.t, self.arrive, req)
        self.loop.at(self.start, self.tick)
        if self.params.preempt_at is not None:
            self.loop.at(self.start + self.params.preempt_at, self.preempt_busiest)
        last = max((r.req.t for r in self.requests), default=0.0)
        end = self.start + last + self.params.tail
        self.loop.run(end)
        report = self.report(end, time.perf_counter() - began)
        report["cpu_seconds"] = round(time.process_time() - cpu, 1)
        return report

    # ------------------------------------------------------------------------------------------ report

    def report(self, end: float, wall: float) -> dict:
        served = [r for r in self.requests if r.done is not None]
        ttft = np.array([r.first_token - self.start - r.req.t for r in served])
        e2e = np.array([r.done - self.start - r.req.t for r in served])
        if self.params.cost_horizon is not None:
            end = min(end, self.start + self.params.cost_horizon)
        runs = self.held_runs + [(j.start_time, j.end_time) for j in self.slurm.jobs.values()
                                 if j.start_time is not None]
        slot_seconds = sum(max(0.0, min(stop, end) - start) * self.params.gpus_per_node
                           for start, stop in runs if start < end)
        tiers = {t: sum(1 for c in self.cold_starts if c["tier"] == t) for t in ("dram", "nvme", "sharedfs")}
        return {
            "policy": self.policy,
            "requests": len(self.requests),
            "served": len(served),
            "lost": len(self.requests) - len(served),
            "ttft": stats(ttft),
            "e2e": stats(e2e),
            "cold_starts": tiers,
            "gpu_slot_hours": slot_seconds / 3600.0,
            "allocations": len(self.slurm.jobs),
            "preemptions": self.preemptions,
            "live_migrated_requests": self.live_migrated,
            "live_migrated_on_preemption": self.preempt_migrated,
            "resumed_requests": sum(1 for r in self.requests if r.resumes),
            "wall_seconds": round(wall, 1),
            "ttft_by_arrival": [[round(r.req.t, 2), round(float(v), 4)] for r, v in zip(served, ttft)],
        }


def stats(values: np.ndarray) -> dict:
    if not len(values):
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p99": float(np.percentile(values, 99))}


def parse_seconds(walltime: str) -> float:
    h, m, s = (int(x) for x in walltime.split(":"))
    return h * 3600 + m * 60 + s


# ------------------------------------------------------------------------------------------ measured inputs


def measured_inputs(params: SimParams, results: Path = RESULTS) -> SimParams:
    """Tier bandwidths and the migration pause from the other benches' latest JSON, when present."""
    load = results / "load-latest.json"
    report = json.loads(load.read_text()) if load.exists() else {}
    # A `bench/load.py --quick` smoke test (a checkpoint of tens of MB, where fixed costs dominate) says nothing of a
    # tier's bandwidth; the simulated instances load onto GPUs, so a GPU run's rows come before the CPU ones.
    if report.get("size") == "bench":
        rows = {(r["method"], r["state"]): r for r in report.get("rows", [])}
        found, not_used = {}, []
        for tier, keys in (("dram", [("hpcllm_gpu_dram", "shm"), ("hpcllm_dram", "shm")]),
                           ("nvme", [("hpcllm_gpu_disk", "cold"), ("hpcllm_disk", "cold")])):
            key = next((k for k in keys if rows.get(k, {}).get("gbps")), None)
            if not key:
                continue
            # A cold median over runs that found the files in the page cache is not the disk's bandwidth (a run
            # from before bench/load.py left such runs out of the median has only max_residency_before).
            row = rows[key]
            residency = row.get("max_residency_in_median", row.get("max_residency_before")) or 0
            if key[1] == "cold" and residency > COLD_THRESHOLD:
                not_used.append(f"{tier}: default, {key[0]} {key[1]} was not cold ({residency:.0%} in the page cache)")
            else:
                found[tier] = (float(row["gbps"]), f"{tier}: {key[0]} {key[1]}")
        if found or not_used:
            params.bandwidth.update({tier: gbps for tier, (gbps, _) in found.items()})
            used = [row for _, row in found.values()] + not_used
            params.bandwidth_source = f"{load} ({', '.join(used)}); shared FS: default"
    elif report:
        params.bandwidth_source = f"defaults ({load} is a run of the {report.get('size')!r} size: not used)"
    migration = results / "migration-latest.json"
    if migration.exists():
        report = json.loads(migration.read_text())
        # Only a passing run's pause (every run measured, every text equal to the uninterrupted run): a file from
        # before bench/migration.py stopped writing failing runs here has no "passed", but has the other two fields.
        passed = (report.get("passed") is not False and report.get("all_texts_match_uninterrupted")
                  and not report.get("failed_runs"))
        pause = report.get("median_pause_seconds", {}).get("live")
        if pause and passed:
            params.handover, params.handover_source = float(pause), str(migration)
        elif pause:
            params.handover_source += f" ({migration} is a failing run: not used)"
    return params


# --------------------------------------------------------------------------------------------------- output


def table(reports: list[dict]) -> str:
    head = (f"{'policy':14s} {'TTFT mean':>9s} {'p50':>7s} {'p99':>8s} | {'E2E mean':>8s} {'p50':>7s} {'p99':>8s} | "
            f"{'cold: dram':>10s} {'nvme':>5s} {'sharedfs':>8s} | {'GPU-h held':>10s} | {'lost':>5s} {'served':>7s}")
    lines = [head, "-" * len(head)]
    for r in reports:
        t, e, c = r["ttft"], r["e2e"], r["cold_starts"]
        lines.append(f"{r['policy']:14s} {fmt(t['mean']):>9s} {fmt(t['p50']):>7s} {fmt(t['p99']):>8s} | "
                     f"{fmt(e['mean']):>8s} {fmt(e['p50']):>7s} {fmt(e['p99']):>8s} | {c['dram']:>10d} "
                     f"{c['nvme']:>5d} {c['sharedfs']:>8d} | {r['gpu_slot_hours']:>10.1f} | {r['lost']:>5d} "
                     f"{r['served']:>7d}")
    return "\n".join(lines)


def fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def ratios(reports: list[dict], base: str = "hpcllm") -> list[str]:
    by = {r["policy"]: r for r in reports}
    if base not in by:
        return []
    mine = by[base]
    out = []
    for r in reports:
        if r["policy"] == base or r["ttft"]["mean"] is None or mine["ttft"]["mean"] is None:
            continue
        out.append(f"{r['policy']:14s}: mean TTFT {r['ttft']['mean'] / mine['ttft']['mean']:.1f}x hpcllm's, "
                   f"p99 {r['ttft']['p99'] / mine['ttft']['p99']:.1f}x; GPU-hours held "
                   f"{r['gpu_slot_hours'] / max(mine['gpu_slot_hours'], 1e-9):.2f}x; lost {r['lost']} vs {mine['lost']}")
    return out


def plot(reports: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for r in reports:
        values = np.sort([v for _, v in r["ttft_by_arrival"]])
        if len(values):
            axes[0].plot(values, np.arange(1, len(values) + 1) / len(values), label=r["policy"])
    axes[0].set_xscale("log")
    axes[0].set_xlabel("TTFT (s, log)")
    axes[0].set_ylabel("fraction of served requests")
    axes[0].set_title("TTFT CDF")
    axes[0].legend(fontsize=8)
    for r in reports:
        pts = np.array(r["ttft_by_arrival"])
        if len(pts):
            order = np.argsort(pts[:, 0])
            pts = pts[order]
            window = max(1, len(pts) // 60)
            kernel = np.ones(window) / window
            axes[1].plot(pts[window - 1:, 0], np.convolve(pts[:, 1], kernel, mode="valid"), label=r["policy"])
    axes[1].set_yscale("log")
    axes[1].set_xlabel("arrival time (s)")
    axes[1].set_ylabel(f"TTFT, moving mean (s, log)")
    axes[1].set_title("TTFT over time")
    names = [r["policy"] for r in reports]
    axes[2].bar(names, [r["gpu_slot_hours"] for r in reports], color="tab:gray")
    axes[2].set_ylabel("GPU-hours held by allocations")
    axes[2].set_title("Cost")
    axes[2].tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for policy in sorted({r["policy"] for r in rows}):
        mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: (r["nodes"], r["rate"]))
        labels = [f"{r['nodes']}n/{r['rate']:g}rps" for r in mine]
        axes[0].plot(labels, [r["ttft"]["p99"] or np.nan for r in mine], marker="o", label=policy)
        axes[1].plot(labels, [r["gpu_slot_hours"] for r in mine], marker="o", label=policy)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("p99 TTFT (s, log)")
    axes[1].set_ylabel("GPU-hours held")
    for ax in axes:
        ax.set_xlabel("cluster size / load")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_policy(policy: str, models, requests, params: SimParams) -> dict:
    logging.basicConfig(level=logging.ERROR)  # in a worker process too: the controller logs every decision
    with tempfile.TemporaryDirectory(prefix=f"simulate-{policy}-") as tmp:
        sim = Simulation(policy, models, requests, params, Path(tmp))
        try:
            return sim.run()
        finally:
            sim.registry.close()


def simulate(policies: list[str], models, requests, params: SimParams, jobs: int = 1,
             quiet: bool = False) -> list[dict]:
    """One simulation per policy (each its own controller and registry), `jobs` at a time in processes."""
    def done(r: dict) -> dict:
        if quiet:
            return r
        print(f"  {r['policy']}: {r['served']}/{r['requests']} served, {r['allocations']} allocations, "
              f"{r['preemptions']} preemptions, {r['live_migrated_requests']} live-migrated "
              f"({r['live_migrated_on_preemption']} at preemptions), "
              f"{r['resumed_requests']} resumed; {r['wall_seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU",
              flush=True)
        return r

    if jobs <= 1 or len(policies) == 1:
        return [done(run_policy(p, models, requests, params)) for p in policies]
    with ProcessPoolExecutor(min(jobs, len(policies))) as pool:
        futures = {p: pool.submit(run_policy, p, models, requests, params) for p in policies}
        for future in as_completed(futures.values()):
            done(future.result())
        return [futures[p].result() for p in policies]


# ----------------------------------------------------------------------------- checked against the dev cluster


def replay_sim_params(result: dict, calibration: dict | None = None) -> SimParams:
    """The dev cluster as bench/replay.py ran it (4 nodes of 2 GPU slots, CPU-served dev models, the controller
    settings it gave the real controller), with the costs that replay measured (bench/calibration.py: the queue
    wait, agent start and instance start of each allocation and cold start drawn from the measured lists; prefill
    and decode per size, decode slowed by the requests decoding beside it on the one shared host)."""
    from calibration import calibrate

    cal = calibration or calibrate(result["raw"], {m["name"]: m["size_class"] for m in result["models"]})
    service = {size: (s["prefill_tokens_per_second"], s["decode"]["base"]) for size, s in cal["service"].items()}
    contention = {size: (s["decode"]["base"], s["decode"]["per_request"]) for size, s in cal["service"].items()}
    return SimParams(nodes=4, gpus_per_node=2, queue_wait=float(np.mean(cal["queue_waits"])),
                     queue_wait_samples=cal["queue_waits"], agent_start_samples=cal["agent_starts"],
                     instance_start_samples=cal["instance_starts_alone"], start_capacity=cal["start_capacity"],
                     decode_contention=contention,
                     preempt_rate=0.0, walltime=result["walltime"], max_instances=result.get("max_instances", 2),
                     tail=result.get("drain", 180.0), seed=result["workload"]["seed"], service=service,
                     controller={"tick_seconds": 1.0, "allocation_start_estimate_seconds": 5.0},
                     bandwidth_source="defaults (dev checkpoints are MBs: the instance start dominates)")


def compare_with_replay(result: dict, seeds: int = 1, calibration: dict | None = None,
                        own_costs: bool = False) -> list[dict]:
    """The replay's trace and policies simulated at dev-cluster size: one report per policy, as simulate() gives;
    with seeds > 1 each policy is simulated with that many seeds (draws of the measured costs) and each latency
    statistic and the slot-seconds are the mean over them ("seed_range" holds their min and max). own_costs: each
    policy with the costs measured in its own replay only (the host's load changes between replays), else with
    `calibration` (default: all policies' measurements pooled)."""
    from calibration import calibrate

    models = [ModelInfo(**m) for m in result["models"]]
    requests = [Request(**r) for r in result["requests"]]
    size_class = {m.name: m.size_class for m in models}
    params = replay_sim_params(result, calibration)
    out = []
    for r in result["reports"]:
        if own_costs:
            params = replay_sim_params(result, calibrate({r["policy"]: result["raw"][r["policy"]]}, size_class))
        # Held slots count up to when the policy's own replay ended; its preemption (if one was made) comes when it
        # came in its replay (the replay waits for a node that serves requests).
        runs = [simulate([r["policy"]], models, requests,
                         replace(params, seed=params.seed + k, cost_horizon=r.get("replay_seconds"),
                                 preempt_at=preempted_at(r)), quiet=True)[0] for k in range(seeds)]
        out.append(mean_report(runs))
    return out


def mean_report(runs: list[dict]) -> dict:
    """The first run's report with its latency statistics, slot-hours and cold starts averaged over all runs."""
    report = dict(runs[0])
    if len(runs) == 1:
        return report
    report["seed_range"] = {}
    for key in ("ttft", "e2e"):
        report[key] = {}
        for stat in ("mean", "p50", "p99"):
            values = [r[key][stat] for r in runs if r[key][stat] is not None]
            report[key][stat] = float(np.mean(values)) if values else None
            if values:
                report["seed_range"][f"{key} {stat}"] = [min(values), max(values)]
    hours = [r["gpu_slot_hours"] for r in runs]
    report["gpu_slot_hours"] = float(np.mean(hours))
    report["seed_range"]["slot-seconds"] = [min(hours) * 3600, max(hours) * 3600]
    report["cold_starts"] = {t: round(float(np.mean([r["cold_starts"][t] for r in runs])), 1)
                             for t in runs[0]["cold_starts"]}
    report["lost"] = float(np.mean([r["lost"] for r in runs]))
    report["seeds"] = len(runs)
    report["ttft_by_arrival"] = [p for r in runs for p in r["ttft_by_arrival"]]  # every seed's, for the CDFs
    return report


def plot_comparison(measured: list[dict], simulated: list[dict], path: Path, title: str) -> None:
    """TTFT CDF per policy: measured on the dev cluster (solid) and simulated with its costs (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    sims = {r["policy"]: r for r in simulated}
    for i, m in enumerate(measured):
        color = f"C{i}"
        for report, style, label in ((m, "-", "measured"), (sims.get(m["policy"]), "--", "simulated")):
            values = np.sort([v for _, v in (report or {}).get("ttft_by_arrival", [])])
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), style, color=color,
                        label=f"{m['policy']} {label}")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s, log)")
    ax.set_ylabel("fraction of served requests")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def preempted_at(report: dict) -> float | None:
    preemption = report.get("preemption") or {}
    return preemption.get("at") if "preemptor_job" in preemption else None


COMPARED = (("TTFT mean", ("ttft", "mean")), ("TTFT p50", ("ttft", "p50")), ("TTFT p99", ("ttft", "p99")),
            ("E2E mean", ("e2e", "mean")), ("E2E p50", ("e2e", "p50")), ("E2E p99", ("e2e", "p99")))


def relative_error(measured: float | None, simulated: float | None) -> float | None:
    """(simulated - measured) / measured; None when either is missing or measured is 0."""
    if measured is None or simulated is None or measured == 0:
        return None
    return (simulated - measured) / measured


def comparison_rows(measured: list[dict], simulated: list[dict]) -> list[dict]:
    """Per policy and metric: measured, simulated and the relative error (latencies in s, slot-seconds, counts)."""
    sims = {r["policy"]: r for r in simulated}
    rows = []
    for m in measured:
        s = sims.get(m["policy"])
        if s is None:
            continue
        pairs = [(name, m[a][b], s[a][b]) for name, (a, b) in COMPARED]
        pairs += [("cold starts", sum(m["cold_starts"].values()), sum(s["cold_starts"].values())),
                  ("slot-seconds", m["gpu_slot_hours"] * 3600, s["gpu_slot_hours"] * 3600),
                  ("lost", m["lost"], s["lost"])]
        rows += [{"policy": m["policy"], "metric": name, "measured": mv, "simulated": sv,
                  "error": relative_error(mv, sv)} for name, mv, sv in pairs]
    return rows


def comparison_table(measured: list[dict], simulated: list[dict]) -> str:
    head = (f"{'policy':14s} {'metric':13s} {'measured':>10s} {'simulated':>10s} {'error':>8s}  "
            f"{'simulated over seeds':>20s}")
    lines = [head, "-" * len(head)]
    ranges = {s["policy"]: s.get("seed_range", {}) for s in simulated}
    for r in comparison_rows(measured, simulated):
        err = "-" if r["error"] is None else f"{100 * r['error']:+.0f}%"
        low_high = ranges.get(r["policy"], {}).get(r["metric"].replace("TTFT", "ttft").replace("E2E", "e2e"))
        spread = f"{low_high[0]:.1f}-{low_high[1]:.1f}" if low_high else ""
        lines.append(f"{r['policy']:14s} {r['metric']:13s} {fmt(r['measured']):>10s} {fmt(r['simulated']):>10s} "
                     f"{err:>8s}  {spread:>20s}")
    return "\n".join(lines)


def error_bound(measured: list[dict], simulated: list[dict]) -> dict[str, float]:
    """Per metric, the largest |relative error| over the policies."""
    bound: dict[str, float] = {}
    for r in comparison_rows(measured, simulated):
        if r["error"] is not None and r["metric"] != "lost":
            bound[r["metric"]] = max(bound.get(r["metric"], 0.0), abs(r["error"]))
    return bound


def compare_main(path: Path, seeds: int, out: Path | None = None, own_costs: bool = False) -> int:
    """--calibrate-from RESULT.json: simulate a bench/replay.py run's trace at its size with the costs it measured
    and print simulated and measured side by side (and write them to `out`)."""
    from calibration import calibrate, summary

    try:
        result = json.loads(path.read_text())
        calibration = calibrate(result["raw"], {m["name"]: m["size_class"] for m in result["models"]})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: --calibrate-from {path}: not a usable bench/replay.py result ({exc})", file=sys.stderr)
        return 2
    print(f"costs measured by the replay ({path}):")
    print("\n".join(f"  {line}" for line in summary(calibration)))
    began, cpu = time.perf_counter(), time.process_time()
    simulated = compare_with_replay(result, seeds, calibration, own_costs)
    costs = "each policy with its own replay's costs" if own_costs else "all replays' costs pooled"
    print(f"\nsimulated ({costs}; {seeds} seeds, {time.perf_counter() - began:.0f} s wall, "
          f"{time.process_time() - cpu:.0f} s CPU) vs measured, error = (simulated - measured) / measured:")
    print(comparison_table(result["reports"], simulated))
    bound = error_bound(result["reports"], simulated)
    print("\nlargest |error| over the policies: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in bound.items()))
    if out is not None:
        out.write_text(json.dumps({"replay": str(path), "own_costs": own_costs, "calibration": calibration,
                                   "simulated": simulated,
                                   "rows": comparison_rows(result["reports"], simulated), "error_bound": bound}))
        plot_comparison(result["reports"], simulated, out.with_suffix(".png"),
                        f"dev cluster: measured (replay) vs simulated with its costs ({seeds} seeds)")
        print(f"wrote {out} and .png")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, WorkloadParams(models=100, rate=2.0, duration=600.0))
    parser.add_argument("--trace", type=Path, help="a trace from bench/workload.py (instead of generating one)")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--gpus-per-node", type=int, default=4)
    parser.add_argument("--queue-wait", type=float, default=60.0, help="mean Slurm queue wait, s")
    parser.add_argument("--instance-overhead", type=float, default=2.0, help="worker start besides the weights, s")
    parser.add_argument("--preempt-rate", type=float, default=0.05, help="preemptions per allocation-hour")
    parser.add_argument("--walltime", default="04:00:00")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--sweep", action="store_true",
                        help="also hpcllm and serverlessllm at each --sweep-nodes size and --sweep-loads rate factor")
    parser.add_argument("--sweep-nodes", default="100,300,1000", help="cluster sizes of the sweep")
    parser.add_argument("--sweep-loads", default="1,3", help="factors on --rate of the sweep")
    parser.add_argument("--jobs", type=int, default=3, help="policies simulated at once (processes)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--calibrate-from", "--compare", dest="compare", type=Path, metavar="RESULT.json",
                        help="a bench/replay.py result: simulate its trace at dev-cluster size with the costs it "
                             "measured (bench/calibration.py) and print simulated vs measured")
    parser.add_argument("--own-costs", action="store_true",
                        help="--calibrate-from: simulate each policy with the costs measured in its own replay")
    parser.add_argument("--seeds", type=int, default=5,
                        help="--calibrate-from: simulations per policy (draws of the measured costs), averaged")
    args = parser.parse_args()
    require_at_least(parser, args, 1, "jobs")
    logging.basicConfig(level=logging.ERROR)
    if args.compare:
        require_at_least(parser, args, 1, "seeds")
        args.out.mkdir(parents=True, exist_ok=True)
        return compare_main(args.compare, args.seeds, args.out / "calibration-latest.json", args.own_costs)

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        parser.error(f"unknown policies {unknown}: choose from {', '.join(POLICIES)}")
    require_at_least(parser, args, 1, "nodes", "gpus_per_node")
    if args.queue_wait < 0 or args.preempt_rate < 0:  # seconds and a rate, floats: not require_at_least's counts
        parser.error(f"--queue-wait and --preempt-rate must be >= 0, not {args.queue_wait} and {args.preempt_rate}")
    try:
        parse_seconds(args.walltime)
    except ValueError:
        parser.error(f"--walltime must be HH:MM:SS, not {args.walltime!r}")
    try:  # now, not after the main simulations have run for minutes
        sweep_nodes = [int(n) for n in args.sweep_nodes.split(",")]
        sweep_loads = [float(f) for f in args.sweep_loads.split(",")]
    except ValueError:
        parser.error(f"--sweep-nodes must be integers and --sweep-loads numbers, comma-separated, not "
                     f"{args.sweep_nodes!r} and {args.sweep_loads!r}")
    if min(sweep_nodes) < 1 or min(sweep_loads) <= 0:
        parser.error("--sweep-nodes must be >= 1 and --sweep-loads > 0")
    try:
        if args.trace:
            wparams, models, requests = load_trace(args.trace)
        else:
            wparams = params_from(args)
            models, requests = generate(wparams)
    except (ValueError, OSError, KeyError) as exc:
        parser.error(f"workload: {exc}")
    params = measured_inputs(SimParams(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                       queue_wait=args.queue_wait, instance_overhead=args.instance_overhead,
                                       preempt_rate=args.preempt_rate, walltime=args.walltime, seed=wparams.seed))
    print(f"machine: {platform.processor() or platform.machine()}; Python {platform.python_version()}")
    print(f"cluster: {params.nodes} nodes x {params.gpus_per_node} GPUs; queue wait mean {params.queue_wait:.0f} s; "
          f"preemptions {params.preempt_rate}/allocation-hour; walltime {params.walltime}")
    print(f"tier GB/s {params.bandwidth} from {params.bandwidth_source}; live-migration pause "
          f"{params.handover * 1000:.0f} ms from {params.handover_source}")
    print(f"workload: {len(requests)} requests over {wparams.duration:.0f} s, {len(models)} models, "
          f"{wparams.arrivals} arrivals, zipf {wparams.zipf}, lengths {wparams.lengths}, seed {wparams.seed}")
    began = time.perf_counter()
    reports = simulate(policies, models, requests, params, args.jobs)
    print()
    print(table(reports))
    print()
    print("\n".join(ratios(reports)))
    sweep = []
    if args.sweep:
        for nodes in sweep_nodes:
            for factor in sweep_loads:
                p = dict(asdict(wparams), rate=wparams.rate * factor)
                m, reqs = generate(WorkloadParams(**p))
                sp = measured_inputs(SimParams(**{**asdict(params), "nodes": nodes}))
                for r in simulate(["hpcllm", "serverlessllm"], m, reqs, sp, args.jobs):
                    r.pop("ttft_by_arrival")
                    sweep.append({**r, "nodes": nodes, "rate": p["rate"]})
    print(f"\ntotal wall time {time.perf_counter() - began:.0f} s")
    result = {"params": asdict(params), "workload": asdict(wparams), "reports": reports, "sweep": sweep}
    name = new_result_stem(args.out, "simulate")
    made = [name.with_suffix(".json"), name.with_suffix(".png")]
    made[0].write_text(json.dumps(result))
    plot(reports, made[1], f"{params.nodes} nodes x {len(models)} models, {len(requests)} "
         f"requests ({wparams.arrivals}), {params.preempt_rate} preemptions/allocation-hour")
    if sweep:
        made.append(name.with_name(f"{name.name}-sweep.png"))
        plot_sweep(sweep, made[-1])
    for path in made:
        shutil.copyfile(path, args.out / path.name.replace(name.name, "simulate-latest"))
    print(f"wrote {name}.json and .png (and simulate-latest.*)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
