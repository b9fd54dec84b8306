"""Faithful in-memory test doubles for the controller's collaborators (used only in tests).

- FakeClock: the time the controller sees, moved by hand.
- RecordingBackend: a SlurmBackend that keeps jobs in a dict; tests start / finish jobs and take Slurm down.
- FakeAgents: an AgentClient whose node agents live in memory; tests read what was started and stopped.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from hpcllm.controller.agents import AgentClient, StartedInstance
from hpcllm.controller.errors import AgentError
from hpcllm.controller.protocol import AdapterFailure, InstanceInfo, LoraAdaptersApplied
from hpcllm.node.protocol import first_instances_version
from hpcllm.slurm.base import JobSpec, JobState, JobStatus, NodeInfo, PartitionInfo, SlurmBackend
from hpcllm.slurm.errors import SlurmError, SlurmUnavailable


class FakeClock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@dataclass
class FakeJob:
    spec: JobSpec
    state: JobState = JobState.PENDING
    nodes: tuple[str, ...] = ()
    start_time: float | None = None
    end_time: float | None = None
    reason: str | None = None  # why Slurm keeps it pending (squeue's REASON), as tests set it


class RecordingBackend(SlurmBackend):
    name = "recording"

    def __init__(self, nodes: list[NodeInfo] | None = None, partitions: tuple[str, ...] = ("debug",)):
        self.jobs: dict[str, FakeJob] = {}
        self.node_infos = nodes if nodes is not None else [
            NodeInfo(name=f"n{i}", state="IDLE", partitions=partitions, gpus_total=2) for i in range(1, 5)]
        self.partition_names = partitions
        self.down = False  # every call raises SlurmUnavailable
        self.refuse_submit: str | None = None  # sbatch answers with this error
        # sbatch --test-only / squeue --start: spec -> StartEstimate (None: no estimate, the default: like a backend
        # that cannot ask), and job id -> StartEstimate; refuse_estimate makes --test-only fail.
        self.start_estimate_for = None
        self.queued_starts: dict = {}
        self.refuse_estimate: str | None = None
        self.calls: list[tuple[str, object]] = []
        self._ids = itertools.count(1001)

    def _check(self, call: str, arg: object = None) -> None:
        self.calls.append((call, arg))
        if self.down:
            raise SlurmUnavailable("slurmctld is not responding (test: Slurm down)")

    def submit(self, spec: JobSpec) -> str:
        self._check("submit", spec)
        if self.refuse_submit:
            raise SlurmError(f"sbatch refused the job: {self.refuse_submit}", self.refuse_submit)
        job_id = str(next(self._ids))
        self.jobs[job_id] = FakeJob(spec)
        return job_id

    def statuses(self, job_ids):
        self._check("statuses", tuple(job_ids))
        out = {}
        for job_id in job_ids:
            job = self.jobs.get(job_id)
            if job is None:
                out[job_id] = JobStatus(job_id=job_id, state=JobState.UNKNOWN, missing=True)
            else:
                out[job_id] = JobStatus(job_id=job_id, state=job.state, raw_state=job.state.value, nodes=job.nodes,
                                        start_time=job.start_time, end_time=job.end_time, reason=job.reason)
        return out

    def list_jobs(self) -> dict[str, JobStatus]:
        self._check("list_jobs")
        return {job_id: JobStatus(job_id=job_id, state=job.state, raw_state=job.state.value, nodes=job.nodes,
                                  name=job.spec.name, start_time=job.start_time, end_time=job.end_time,
                                  comment=job.spec.comment, reason=job.reason)
                for job_id, job in self.jobs.items()}

    def cancel(self, job_id: str) -> None:
        self._check("cancel", job_id)
        job = self.jobs.get(job_id)
        if job is not None and not job.state.is_terminal:
            job.state = JobState.CANCELLED

    def requeue(self, job_id: str) -> None:
        self._check("requeue", job_id)
        self.jobs[job_id].state = JobState.PENDING

    def signal(self, job_id: str, sig: str, batch_only: bool = True) -> None:
        self._check("signal", (job_id, sig))

    def nodes(self) -> list[NodeInfo]:
        self._check("nodes")
        return list(self.node_infos)

    def partitions(self) -> list[PartitionInfo]:
        self._check("partitions")
        return [PartitionInfo(name=p) for p in self.partition_names]

    def estimate_start(self, spec: JobSpec):
        self._check("estimate_start", spec)
        if self.refuse_estimate:
            raise SlurmError(f"sbatch --test-only failed: {self.refuse_estimate}", self.refuse_estimate)
        return self.start_estimate_for(spec) if self.start_estimate_for else None

    def pending_start_times(self, job_ids):
        self._check("pending_start_times", tuple(job_ids))
        return {job_id: self.queued_starts[job_id] for job_id in job_ids if job_id in self.queued_starts}

    def estimates_asked(self) -> int:
        return sum(1 for call, _ in self.calls if call == "estimate_start")

    # test controls
    def start(self, job_id: str, node: str, now: float, walltime: float = 3600.0) -> None:
        job = self.jobs[job_id]
        job.state, job.nodes, job.start_time, job.end_time = JobState.RUNNING, (node,), now, now + walltime
        job.reason = None

    def run_job(self, job_id: str, node: str, now: float = 0.0) -> None:
        """Someone else's job (a group's model pool) running on `node`, as squeue would list it."""
        self.jobs[job_id] = FakeJob(JobSpec(name=f"job-{job_id}", script="true\n"))
        self.start(job_id, node, now)

    def finish(self, job_id: str, state: JobState = JobState.COMPLETED) -> None:
        self.jobs[job_id].state = state

    def submitted(self) -> list[JobSpec]:
        return [arg for call, arg in self.calls if call == "submit" and not self.down and not self.refuse_submit]


@dataclass
class FakeNodeAgent:
    url: str
    instances: dict[str, InstanceInfo] = field(default_factory=dict)
    # Its instance-list version, as the real agent's: from the clock when its process starts (a new FakeNodeAgent:
    # the agent restarted), one more with each instance added or removed.
    version: int = field(default_factory=first_instances_version)

    def add(self, info: InstanceInfo) -> int:
        self.instances[info.instance_id] = info
        self.version += 1
        return self.version

    def update(self, instance_id: str, **fields) -> InstanceInfo:
        """An instance's state (or other fields) changed: a new version, as the real agent's."""
        self.instances[instance_id] = self.instances[instance_id].model_copy(update=fields)
        self.version += 1
        return self.instances[instance_id]

    def remove(self, instance_id: str) -> InstanceInfo | None:
        removed = self.instances.pop(instance_id, None)
        if removed is not None:
            self.version += 1
        return removed


class FakeAgents(AgentClient):
    """Node agents in memory, keyed by agent URL."""

    def __init__(self):  # no HTTP client: nothing leaves the process
        self._keys: dict[str, str] = {}
        self.agents: dict[str, FakeNodeAgent] = {}
        self.started: list[tuple[str, str, list[int]]] = []  # (agent_url, model, gpu_ids)
        self.max_model_lens: list[int | None] = []  # the context length each start asked the worker for
        self.cache_on_loads: list[list[str] | None] = []  # each start's model cache_on_load (None: the node's)
        self.tensor_parallel: list[int] = []  # the ranks each start asked for
        self.nodes: list[int] = []  # the nodes each start asked the ranks to span
        self.lora_adapters: list[dict[str, str] | None] = []  # the adapters each start asked the worker to serve
        self.serving_adapters: dict[str, dict[str, str]] = {}  # instance id -> the adapters its worker serves
        self.refuse_adapters: dict[str, AdapterFailure] = {}  # adapter name -> how every worker refuses to load it
        # instance id -> {adapter name -> how that instance's worker alone refuses it} (over refuse_adapters)
        self.refuse_adapters_on: dict[str, dict[str, AdapterFailure]] = {}
        self.adapter_timeouts: list[float] = []  # the timeout of each set_lora_adapters call
        self.stopped: list[tuple[str, str]] = []
        self.unreachable: set[str] = set()
        self.refuse_start = False
        self._ids = itertools.count(1)

    def close(self) -> None:
        pass

    def _agent(self, url: str) -> FakeNodeAgent:
        if url in self.unreachable:
            raise AgentError(f"node agent {url}: ConnectError (test: unreachable)")
        return self.agents.setdefault(url, FakeNodeAgent(url))

    def start_instance(self, agent_url: str, model: str, source: str, gpu_ids: list[int],
                       max_model_len: int | None = None, engine: str = "hpcllm",
                       cache_on_load: list[str] | None = None, tensor_parallel: int = 1,
                       nodes: int = 1, lora_adapters: dict[str, str] | None = None) -> StartedInstance:
        agent = self._agent(agent_url)
        if self.refuse_start:
            raise AgentError(f"node agent {agent_url} refused to start {model!r}: HTTP 500 out of memory")
        instance_id = f"inst-{next(self._ids)}"
        worker_url = f"{agent_url}/workers/{instance_id}"
        version = agent.add(InstanceInfo(instance_id=instance_id, model=model, state="loading", worker_url=worker_url,
                                         gpu_ids=gpu_ids))
        self.started.append((agent_url, model, gpu_ids))
        self.max_model_lens.append(max_model_len)
        self.cache_on_loads.append(cache_on_load)
        self.tensor_parallel.append(tensor_parallel)
        self.nodes.append(nodes)
        self.lora_adapters.append(lora_adapters)
        self.serving_adapters[instance_id] = dict(lora_adapters or {})
        return StartedInstance(instance_id, worker_url, version)

    def set_lora_adapters(self, agent_url: str, instance_id: str, adapters: dict[str, str],
                          timeout: float) -> LoraAdaptersApplied:
        """As the agent's relay does: unload what is no longer wanted, load the rest, those in refuse_adapters
        (or this instance's refuse_adapters_on) failing."""
        self.adapter_timeouts.append(timeout)
        agent = self._agent(agent_url)
        if instance_id not in agent.instances:
            raise AgentError(f"node agent {agent_url}: HTTP 404 no instance {instance_id!r} on this node")
        serving = {n: f for n, f in self.serving_adapters.get(instance_id, {}).items() if adapters.get(n) == f}
        refusals = {**self.refuse_adapters, **self.refuse_adapters_on.get(instance_id, {})}
        failed = {n: refusals[n] for n in adapters if n not in serving and n in refusals}
        serving.update({n: f for n, f in adapters.items() if n not in failed})
        self.serving_adapters[instance_id] = serving
        return LoraAdaptersApplied(instance_id=instance_id, lora_adapters=serving, failed=failed)

    def stop_instance(self, agent_url: str, instance_id: str) -> int | None:
        agent = self._agent(agent_url)
        removed = agent.remove(instance_id)
        self.stopped.append((agent_url, instance_id))
        return agent.version if removed is not None else None  # the agent's 404 carries none

    def list_instances(self, agent_url: str) -> list[InstanceInfo]:
        return list(self._agent(agent_url).instances.values())

    def instances_version(self, agent_url: str) -> int | None:
        return self._agent(agent_url).version

    # test controls
    def restart(self, agent_url: str, version: int | None = None) -> None:
        """The node's agent process restarts: a new one, with no instances, its versions from the clock again (or
        from `version`: an agent that counts from 0, a clock stepped back)."""
        self.agents[agent_url] = FakeNodeAgent(agent_url) if version is None else FakeNodeAgent(agent_url, version=version)

    def finish_loading(self, agent_url: str, tier: str = "nvme", load_seconds: float = 1.5) -> list[InstanceInfo]:
        agent = self._agent(agent_url)
        for instance_id, info in list(agent.instances.items()):
            if info.state == "loading":
                agent.update(instance_id, state="ready", load_tier=tier, load_seconds=load_seconds)
        return list(agent.instances.values())


class FileBackend(RecordingBackend):
    """A RecordingBackend whose jobs live in a JSON file, so a test can change Slurm's answers while the
    controller process that uses it is dead (kill -9 / restart tests)."""

    def __init__(self, path, nodes: list[NodeInfo] | None = None):
        super().__init__(nodes)
        self.path = path

    def _load(self) -> dict:
        import json
        from pathlib import Path

        path = Path(self.path)
        return json.loads(path.read_text()) if path.exists() else {"next_id": 2001, "jobs": {}}

    def _save(self, data: dict) -> None:
        import json
        import os
        from pathlib import Path

        tmp = Path(f"{self.path}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    def submit(self, spec: JobSpec) -> str:
        data = self._load()
        job_id = str(data["next_id"])
        data["next_id"] += 1
        data["jobs"][job_id] = {"state": "PENDING", "nodes": [], "name": spec.name, "comment": spec.comment}
        self._save(data)
        return job_id

    def statuses(self, job_ids):
        jobs = self._load()["jobs"]
        out = {}
        for job_id in job_ids:
            job = jobs.get(job_id)
            if job is None:
                out[job_id] = JobStatus(job_id=job_id, state=JobState.UNKNOWN, missing=True)
            else:
                out[job_id] = JobStatus(job_id=job_id, state=JobState(job["state"]), raw_state=job["state"],
                                        nodes=tuple(job["nodes"]), start_time=job.get("start_time"),
                                        end_time=job.get("end_time"))
        return out

    def list_jobs(self) -> dict[str, JobStatus]:
        return {job_id: JobStatus(job_id=job_id, state=JobState(job["state"]), raw_state=job["state"],
                                  nodes=tuple(job["nodes"]), name=job.get("name"), comment=job.get("comment"))
                for job_id, job in self._load()["jobs"].items()}

    def cancel(self, job_id: str) -> None:
        self.set_job(job_id, state="CANCELLED")

    def set_job(self, job_id: str, **fields) -> None:
        data = self._load()
        data["jobs"][job_id].update(fields)
        self._save(data)


class HttpNodeAgent:
    """A node agent's instance API over real HTTP (in a thread): what the controller calls when it starts, stops
    or lists instances. Tests drive registration and heartbeats themselves."""

    def __init__(self, node_id: str, secret: str):
        from flask import Flask, abort, request

        from hpcllm.httpkit.auth import SECRET_HEADER
        from hpcllm.httpkit.tests.thread_server import ThreadServer

        self.node_id = node_id
        self.instances: dict[str, InstanceInfo] = {}
        self._ids = itertools.count(1)
        app = Flask(f"fake-agent-{node_id}")

        @app.before_request
        def _auth():
            if request.headers.get(SECRET_HEADER) != secret:
                abort(401)

        @app.post("/v1/internal/instances")
        def start():
            from hpcllm.node.protocol import StartInstance

            body = request.get_json()
            StartInstance.model_validate(body)  # the real agent's strict body: the controller must send real types
            instance_id = f"{node_id}-i{next(self._ids)}"
            self.instances[instance_id] = InstanceInfo(
                instance_id=instance_id, model=body["model"], state="loading", gpu_ids=body["gpu_ids"],
                worker_url=f"http://{node_id}.workers/{instance_id}")
            return {"instance_id": instance_id, "worker_url": self.instances[instance_id].worker_url}, 201

        @app.get("/v1/internal/instances")
        def listing():
            return {"instances": [i.model_dump() for i in self.instances.values()]}

        @app.delete("/v1/internal/instances/<instance_id>")
        def stop(instance_id):
            self.instances.pop(instance_id, None)
            return {"stopped": instance_id}

        self._server = ThreadServer(app)
        self.url = self._server.url

    def finish_loading(self, tier: str = "nvme", load_seconds: float = 0.8) -> None:
        for instance_id, info in list(self.instances.items()):
            if info.state == "loading":
                self.instances[instance_id] = info.model_copy(
                    update={"state": "ready", "load_tier": tier, "load_seconds": load_seconds})

    def close(self) -> None:
        self._server.stop()


def checkpoint_folder(path: Path, positions: int = 4096) -> Path:
    """A stand-in checkpoint folder: only the config.json deploy reads the model's context length from."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": positions}))
    return path
