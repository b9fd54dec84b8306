"""Faithful in-memory test doubles for the controller's collaborators (used only in tests).

- FakeClock: the time the controller sees, moved by hand.
- RecordingBackend: a SlurmBackend that keeps jobs in a dict; tests start / finish jobs and take Slurm down.
- FakeAgents: an AgentClient whose node agents live in memory; tests read what was started and stopped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hpcllm.controller.agents import AgentClient, StartedInstance
from hpcllm.controller.errors import AgentError
from hpcllm.controller.protocol import InstanceInfo
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


class RecordingBackend(SlurmBackend):
    name = "recording"

    def __init__(self, nodes: list[NodeInfo] | None = None, partitions: tuple[str, ...] = ("debug",)):
        self.jobs: dict[str, FakeJob] = {}
        self.node_infos = nodes if nodes is not None else [
            NodeInfo(name=f"n{i}", state="IDLE", partitions=partitions, gpus_total=2) for i in range(1, 5)]
        self.partition_names = partitions
        self.down = False  # every call raises SlurmUnavailable
        self.refuse_submit: str | None = None  # sbatch answers with this error
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
                                        start_time=job.start_time, end_time=job.end_time)
        return out

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

    # test controls
    def start(self, job_id: str, node: str, now: float, walltime: float = 3600.0) -> None:
        job = self.jobs[job_id]
        job.state, job.nodes, job.start_time, job.end_time = JobState.RUNNING, (node,), now, now + walltime

    def finish(self, job_id: str, state: JobState = JobState.COMPLETED) -> None:
        self.jobs[job_id].state = state

    def submitted(self) -> list[JobSpec]:
        return [arg for call, arg in self.calls if call == "submit" and not self.down and not self.refuse_submit]


@dataclass
class FakeNodeAgent:
    url: str
    instances: dict[str, InstanceInfo] = field(default_factory=dict)


class FakeAgents(AgentClient):
    """Node agents in memory, keyed by agent URL."""

    def __init__(self):  # no HTTP client: nothing leaves the process
        self.agents: dict[str, FakeNodeAgent] = {}
        self.started: list[tuple[str, str, list[int]]] = []  # (agent_url, model, gpu_ids)
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

    def start_instance(self, agent_url: str, model: str, source: str, gpu_ids: list[int]) -> StartedInstance:
        agent = self._agent(agent_url)
        if self.refuse_start:
            raise AgentError(f"node agent {agent_url} refused to start {model!r}: HTTP 500 out of memory")
        instance_id = f"inst-{next(self._ids)}"
        worker_url = f"{agent_url}/workers/{instance_id}"
        agent.instances[instance_id] = InstanceInfo(instance_id=instance_id, model=model, state="loading",
                                                    worker_url=worker_url, gpu_ids=gpu_ids)
        self.started.append((agent_url, model, gpu_ids))
        return StartedInstance(instance_id, worker_url)

    def stop_instance(self, agent_url: str, instance_id: str) -> None:
        agent = self._agent(agent_url)
        agent.instances.pop(instance_id, None)
        self.stopped.append((agent_url, instance_id))

    def list_instances(self, agent_url: str) -> list[InstanceInfo]:
        return list(self._agent(agent_url).instances.values())

    # test controls
    def finish_loading(self, agent_url: str, tier: str = "nvme", load_seconds: float = 1.5) -> list[InstanceInfo]:
        agent = self.agents[agent_url]
        for instance_id, info in agent.instances.items():
            if info.state == "loading":
                agent.instances[instance_id] = info.model_copy(
                    update={"state": "ready", "load_tier": tier, "load_seconds": load_seconds})
        return list(agent.instances.values())
