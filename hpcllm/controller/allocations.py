"""Slurm allocations the controller owns: the only module that talks to the Slurm backend (hpcllm.slurm).

An allocation is one Slurm job running a node agent (the slurm package's node-agent template); the agent registers
with the controller and serves instances until the job ends. This module submits such jobs (preferring nodes that
hold the checkpoint), polls their states in one batched call, cancels them, and lists partitions / idle nodes for
validation and placement. Every Slurm failure becomes an AllocationFailed carrying Slurm's own words; the
allocation row is written only after sbatch accepted the job, so a refusal leaves nothing behind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from hpcllm.config import Config
from hpcllm.controller.errors import AllocationFailed
from hpcllm.controller.protocol import DeployedModel
from hpcllm.controller.registry import Registry
from hpcllm.errors import ConfigError
from hpcllm.slurm.base import JobSpec, JobState, JobStatus, NodeInfo, SlurmBackend, make_job_spec, parse_walltime
from hpcllm.slurm.errors import SlurmError
from hpcllm.slurm.templates import node_agent_job_spec

log = logging.getLogger(__name__)

# How the node agent inside an allocation finds this controller.
CONTROLLER_URL_ENV = "HPCLLM_CONTROLLER_URL"
# Reason recorded on an allocation cancelled because the node it asked for by name stayed busy.
PREFERRED_NODE_BUSY = "preferred node busy"
# Node states (sinfo) where a new job could start soon.
USABLE_NODE_STATES = {"IDLE", "MIXED"}


class Allocator:
    def __init__(self, config: Config, registry: Registry, backend: SlurmBackend | None, controller_url: str,
                 config_path: str | None = None, clock: Callable[[], float] = time.time):
        self.config = config
        self.settings = config.controller
        self.registry = registry
        self.backend = backend  # None: no Slurm (allocations disabled)
        self.controller_url = controller_url
        self.config_path = config_path
        self.clock = clock
        self._nodes_cache: tuple[float, list[NodeInfo]] | None = None

    # ----------------------------------------------------------------------------------------- questions

    def why_not_submit(self, model: DeployedModel) -> str | None:
        """None when a new allocation may be submitted for this model, else the reason it may not."""
        if self.backend is None:
            return "no Slurm backend is configured"
        if not self.settings.allocate_on_demand:
            return "controller.allocate_on_demand is off"
        active = len(self.registry.allocations(active_only=True))
        if active >= self.settings.max_allocations:
            return f"{active} allocations active, controller.max_allocations = {self.settings.max_allocations}"
        return None

    def partitions(self) -> set[str] | None:
        """Partition names Slurm knows; None when Slurm cannot be asked."""
        if self.backend is None:
            return None
        try:
            return {p.name for p in self.backend.partitions()}
        except SlurmError as exc:
            log.warning("cannot list Slurm partitions: %s", exc)
            return None

    def idle_nodes(self, model: DeployedModel) -> list[str]:
        """Slurm nodes of the model's partition where a new allocation could start soon."""
        partition = self._partition(model)
        nodes = self._slurm_nodes() or []
        avoid = self._recently_busy_preferred_nodes()
        return sorted(n.name for n in nodes if n.available and n.state in USABLE_NODE_STATES and n.name not in avoid
                      and (partition is None or partition in n.partitions)
                      and n.gpus_free >= self.gpus_requested(model))

    def gpus_requested(self, model: DeployedModel) -> int:
        """GPUs an allocation made for this model asks for: slurm.gpus_per_node, at least the model's; none for
        a CPU model."""
        return max(model.gpus, self.config.slurm.gpus_per_node) if model.gpus else 0

    def _recently_busy_preferred_nodes(self) -> set[str]:
        """Nodes an allocation asked for by name and never got, lately: idle in sinfo is not idle for us."""
        since = self.clock() - 5 * self.settings.preferred_node_wait_seconds
        return {node for a in self.registry.allocations() if a.reason == PREFERRED_NODE_BUSY and a.submitted_at >= since
                for node in a.preferred_nodes}

    def _slurm_nodes(self) -> list[NodeInfo] | None:
        if self.backend is None:
            return None
        now = time.monotonic()
        if self._nodes_cache and now - self._nodes_cache[0] < self.settings.slurm_nodes_ttl_seconds:
            return self._nodes_cache[1]
        try:
            nodes = list(self.backend.nodes())
        except SlurmError as exc:
            log.warning("cannot list Slurm nodes: %s", exc)
            return None
        self._nodes_cache = (now, nodes)
        return nodes

    def _partition(self, model: DeployedModel) -> str | None:
        return model.slurm.partition or self.config.slurm.partition

    # ------------------------------------------------------------------------------------------- actions

    def submit(self, model: DeployedModel, preferred_nodes: list[str], now: float) -> str:
        """sbatch one node-agent allocation for this model; the row is recorded only once Slurm accepted it."""
        why = self.why_not_submit(model)
        if why is not None:
            raise AllocationFailed(f"cannot submit an allocation for {model.name!r}: {why}")
        try:
            spec = self._job_spec(model, preferred_nodes)
            if spec.output:  # Slurm cannot create the log's folder itself: the job would fail at once
                Path(spec.output).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AllocationFailed(f"cannot create the folder for the allocation's log: {exc}") from None
        except ConfigError as exc:
            raise AllocationFailed(f"cannot describe the allocation for {model.name!r}: {exc}") from None
        try:
            job_id = str(self.backend.submit(spec))
        except SlurmError as exc:
            raise AllocationFailed(f"Slurm refused the allocation for {model.name!r}: {exc}") from None
        time_limit = parse_walltime(model.slurm.time or self.config.slurm.time)
        self.registry.add_allocation(job_id, model.name, preferred_nodes, self._partition(model), time_limit, now)
        self._nodes_cache = None  # a node just got busier
        log.info("submitted allocation %s for %s (prefer %s)", job_id, model.name, preferred_nodes or "any node")
        return job_id

    def cancel(self, job_id: str, reason: str, now: float) -> None:
        try:
            self.backend.cancel(job_id)
        except SlurmError as exc:
            raise AllocationFailed(f"cannot cancel allocation {job_id}: {exc}") from None
        self.registry.update_allocation(job_id, state="cancelling", reason=reason)

    def sync(self, now: float) -> dict[str, str]:
        """Ask Slurm about every active allocation in one call; returns {job_id: new state} for changes.

        An ended job's nodes leave the registry (their instances with them); a requeued one goes back to pending.
        """
        active = self.registry.allocations(active_only=True)
        if not active or self.backend is None:
            return {}
        try:
            statuses = self.backend.statuses([a.job_id for a in active])
        except SlurmError as exc:
            raise AllocationFailed(f"cannot poll Slurm: {exc}") from None
        changes = {}
        for alloc in active:
            status = statuses.get(alloc.job_id)
            new_state = self._apply_status(alloc, status, now)
            if new_state is not None:
                changes[alloc.job_id] = new_state
        return changes

    def _apply_status(self, alloc, status: JobStatus | None, now: float) -> str | None:
        if status is None or status.is_terminal:
            # Completed, cancelled, failed, timed out, preempted, node failure, or purged from Slurm's memory.
            self._nodes_left(alloc.job_id)
            state_word = "missing" if status is None or status.missing else (status.raw_state or status.state.value)
            self.registry.update_allocation(alloc.job_id, state="ended", ended_at=now,
                                            reason=alloc.reason or state_word.lower())
            return "ended"
        if status.state.is_active:
            started = status.start_time or alloc.started_at or now
            end = status.end_time or (started + alloc.time_limit_seconds if alloc.time_limit_seconds else None)
            changes: dict = {}
            if alloc.state == "pending":
                changes["state"] = "running"
            if alloc.started_at != started:
                changes["started_at"] = started
            if end is not None and alloc.walltime_end != end and alloc.retire_at is None:
                changes["walltime_end"] = end  # frozen once a retirement time was derived from it
            if status.nodes and list(status.nodes) != alloc.nodes:
                changes["nodes"] = sorted(status.nodes)
            if changes:
                self.registry.update_allocation(alloc.job_id, **changes)
            return changes.get("state")
        if status.state in (JobState.PENDING, JobState.REQUEUED) and alloc.state == "running":
            # Preempted and requeued (same job id): its agents are gone; it will start (and register) again.
            self._nodes_left(alloc.job_id)
            self.registry.update_allocation(alloc.job_id, state="pending", started_at=None, walltime_end=None,
                                            retire_at=None, idle_since=None, nodes=[], reason="requeued")
            return "pending"
        return None

    def _nodes_left(self, job_id: str) -> None:
        for node in self.registry.nodes(states=("up", "draining", "lost")):
            if node.slurm_job_id == job_id:
                self.registry.node_left(node.node_id, "gone")

    # ----------------------------------------------------------------------------- the job we submit

    def _job_spec(self, model: DeployedModel, preferred_nodes: list[str]) -> JobSpec:
        """The slurm package's node-agent job (one node) with the model's [slurm] overrides (partition, account,
        qos, time; else the [slurm] config). A node holding the checkpoint is asked for by name (--nodelist):
        placement proposes only nodes that are idle now. The agent finds us through HPCLLM_CONTROLLER_URL."""
        env = {CONTROLLER_URL_ENV: self.controller_url}
        if self.config_path:
            env["HPCLLM_CONFIG"] = self.config_path
        spec = node_agent_job_spec(
            self.config,
            nodes=1,
            gpus_per_node=self.gpus_requested(model),
            time=model.slurm.time,
            partition=model.slurm.partition,
            account=model.slurm.account,
            qos=model.slurm.qos,
            name=f"hpcllm-pool-{model.name}",
            hpcllm=self.settings.agent_command,
            env=env,
        )
        if not preferred_nodes:
            return spec
        return make_job_spec(**{**spec.model_dump(), "nodelist": tuple(preferred_nodes)})


__all__ = ["PREFERRED_NODE_BUSY", "Allocator"]
