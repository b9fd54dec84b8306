"""Slurm allocations the controller owns: the only module that talks to the Slurm backend (hpcllm.slurm).

An allocation is one Slurm job running a node agent (the slurm package's node-agent template); the agent registers
with the controller and serves instances until the job ends. This module submits such jobs (on nodes that hold the
checkpoint, else on idle nodes no agent or allocation of ours has taken: one agent per node), polls their states in
one batched call, cancels them, and lists partitions / idle nodes for validation and placement. Every Slurm failure
becomes an AllocationFailed carrying Slurm's own words.

Crash safety: before sbatch runs, an *intent* (model, preferred nodes, a unique tag `hpcllm-alloc-<uuid>`) is
committed, and the job carries the tag as its --comment. Once sbatch answers, the intent becomes the allocation row
in one transaction (a refusal just drops it, leaving nothing behind). If the controller dies in between, or sbatch's
answer was lost (timeout), the next `sync()` (at restart: `reconcile()`) finds the tagged job in `list_jobs()` and
adopts it, or drops the intent when Slurm has no such job. While an intent is unsettled, no other allocation is
submitted: a second sbatch after a lost answer could double the allocation.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hpcllm.config import Config
from hpcllm.controller.errors import AllocationFailed
from hpcllm.controller.placement import slurm_order
from hpcllm.controller.protocol import DeployedModel
from hpcllm.controller.registry import Registry
from hpcllm.credentials import TOKEN_ENV, mint_token
from hpcllm.errors import ConfigError
from hpcllm.slurm.base import (
    JobSpec,
    JobState,
    JobStatus,
    NodeInfo,
    SlurmBackend,
    StartEstimate,
    make_job_spec,
    parse_walltime,
)
from hpcllm.slurm.errors import SlurmError, SlurmUnavailable
from hpcllm.slurm.templates import node_agent_job_spec

log = logging.getLogger(__name__)

# How the node agent inside an allocation finds this controller.
CONTROLLER_URL_ENV = "HPCLLM_CONTROLLER_URL"
# Reason recorded on an allocation cancelled because the node it asked for by name stayed busy.
PREFERRED_NODE_BUSY = "preferred node busy"
# Reasons of a running allocation whose job went back to pending (preempted and requeued; suspended or stopped:
# Slurm's state, lower case): cleared once it runs again.
REQUEUED = "requeued"
PAUSED_REASONS = (REQUEUED, "suspended", "stopped")
# Slurm's pending reasons (squeue's REASON, its first word) of a job held back by what would hold a new job as
# well: a QOS or association limit (QOSMaxJobsPerUserLimit, AssocGrpGRES), a limit of the job (PartitionTimeLimit),
# licenses, an invalid account or QOS. Any other reason - waiting for its named node (Resources, Priority,
# ReqNodeNotAvail, or the description squeue prints instead: "Nodes required for job are DOWN, DRAINED ..."),
# BeginTime after a requeue - may start sooner as a new job elsewhere. A held job (JobStatus.held: JobHeldUser,
# JobHeldAdmin) keeps its place too, whatever its reason (Allocator.is_held): a hold is someone's to release
# (SBATCH_HOLD, a job_submit plugin would hold a new job as well), and sync() handles one after a failed launch.
LIMIT_REASON_PREFIXES = ("QOS", "Assoc", "Invalid")
LIMIT_REASONS = frozenset({"Licenses"})
# A model's allocations whose launch failed (Slurm held them, reason LAUNCH_FAILED_HELD) are cancelled and replaced
# once in this window; the next one is left held: a launch failure the job causes (its prolog, its environment)
# would otherwise drain a fresh node with each replacement - what Slurm's hold is there to prevent.
FAILED_LAUNCH_WINDOW_SECONDS = 3600.0
FAILED_LAUNCH_REPLACEMENTS = 1
# Node states (sinfo) where a new job could start soon.
USABLE_NODE_STATES = {"IDLE", "MIXED"}
# Every allocation's job carries a comment TAG_PREFIX + uuid4 hex: how it is found after a crash.
TAG_PREFIX = "hpcllm-alloc-"


def new_allocation_tag() -> str:
    return f"{TAG_PREFIX}{uuid.uuid4().hex}"


def waits_for_its_nodes(pending_reason: str | None) -> bool:
    """Whether a queued job asking for nodes by name may start sooner as a new job on any node: unless Slurm holds
    it for a limit a new job would meet as well (LIMIT_REASON_PREFIXES, LIMIT_REASONS, a reason ending in Limit).
    No reason given (a backend that tells none) counts as waiting for the node, as before reasons were read."""
    if not pending_reason:
        return True
    word = re.split(r"[\s,:(]", pending_reason.strip(), maxsplit=1)[0]
    return not (word.startswith(LIMIT_REASON_PREFIXES) or word in LIMIT_REASONS or word.endswith("Limit"))


# Where a queue wait comes from (PlacementBreakdown.queue_wait_source).
FROM_TEST_ONLY = "slurm test-only"
FROM_SQUEUE_START = "slurm squeue --start"
FROM_JOB_STARTED = "job started"
FROM_CONSTANT = "constant"


@dataclass(frozen=True)
class QueueWait:
    """Seconds until an allocation's agent could take an instance, and where the figure comes from."""

    seconds: float
    source: str
    start_time: float | None = None  # Slurm's expected job start (epoch seconds), when it gave one


class _SlurmAnswers:
    """Slurm's answers to one kind of question (start estimates, node lists), reused for ttl seconds, asked by one
    caller at a time, with a back-off after failures (backoff seconds, doubling per failure up to max_backoff) so a
    slow or refusing Slurm is not asked on every poll: placement asks on every cold route poll, and against a hung
    slurmctld each question waits [slurm] command_timeout_seconds (60 s)."""

    def __init__(self, what: str, ttl: float, backoff: float, max_backoff: float, log_level: int = logging.INFO):
        self.what, self.log_level = what, log_level
        self.ttl, self.backoff, self.max_backoff = ttl, backoff, max_backoff
        self._cache: dict[object, tuple[float, object]] = {}
        self._failures = 0
        self._quiet_until = 0.0
        # One question at a time: a caller that waited for another's gets its answer, or its failure's back-off,
        # instead of asking again (each would wait a command timeout of a hung slurmctld).
        self._lock = threading.Lock()

    def get(self, key: object, ask: Callable[[], object], newer_than: float | None = None) -> object | None:
        """The answer to key (ask() when none is cached), None while in back-off after a failure. newer_than: a
        time.monotonic() value; a cached answer asked before it is not used (a fresh look)."""
        with self._lock:
            now = time.monotonic()
            cached = self._cache.get(key)
            if (cached is not None and now - cached[0] < self.ttl
                    and (newer_than is None or cached[0] >= newer_than)):
                return cached[1]
            if now < self._quiet_until:
                return None
            try:
                answer = ask()
            except (SlurmError, ConfigError) as exc:
                self._failures += 1
                pause = min(self.backoff * 2 ** (self._failures - 1), self.max_backoff)
                # From when the failed call returned, not when it began: it may have waited a command timeout
                # (60 s), longer than the back-off.
                self._quiet_until = time.monotonic() + pause
                log.log(self.log_level, "no %s from Slurm (not asked again for %.0f s): %s", self.what, pause, exc)
                return None
            self._failures = 0
            self._cache[key] = (now, answer)
            return answer

    def forget(self) -> None:
        self._cache.clear()  # not under the lock: a submission does not wait for a hung question


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
        # A failed node list is not asked again for its reuse time (no doubling: docs/controller.md).
        self._nodes = _SlurmAnswers("node list", self.settings.slurm_nodes_ttl_seconds,
                                    self.settings.slurm_nodes_ttl_seconds, self.settings.slurm_nodes_ttl_seconds,
                                    logging.WARNING)
        self._estimates = _SlurmAnswers("start estimate", self.settings.queue_estimate_ttl_seconds,
                                        self.settings.queue_estimate_backoff_seconds,
                                        8 * self.settings.queue_estimate_backoff_seconds)
        # Tags of intents this process is submitting right now: sync() leaves them to submit().
        self._in_flight: set[str] = set()
        self._in_flight_lock = threading.Lock()
        # Held from picking an allocation's nodes until its intent (naming them) is committed, so two submissions
        # at once (a route call and the autoscaler) never pick the same node.
        self._pick_lock = threading.Lock()
        # The jobs of queued allocations as the last poll (sync) saw them: why Slurm keeps each pending
        # (pending_reason), whether it is held (is_held).
        self._queued: dict[str, JobStatus] = {}
        # Allocations whose job someone holds in Slurm, told once in the log (sync() sees them every tick).
        self._held_told: set[str] = set()
        # Per model: when an allocation of it whose launch failed was cancelled (replaced), and on which nodes.
        self._failed_launches: dict[str | None, list[tuple[float, tuple[str, ...]]]] = {}

    # ----------------------------------------------------------------------------------------- questions

    def why_never_submit(self) -> str | None:
        """None when allocations may be submitted at all, else why none ever is: the configuration, which nothing
        while a request waits can change (Controller.why_never_capacity builds on it)."""
        if self.backend is None:
            return "no Slurm backend is configured"
        if not self.settings.allocate_on_demand:
            return "controller.allocate_on_demand is off"
        if self.settings.max_allocations == 0:
            return "controller.max_allocations = 0"
        return None

    def why_not_submit(self, model: DeployedModel) -> str | None:
        """None when a new allocation may be submitted for this model now, else the reason it may not: never
        (why_never_submit) or not now (max_allocations in use, an earlier submission not settled: both pass)."""
        never = self.why_never_submit()
        if never is not None:
            return never
        active = len(self.registry.allocations(active_only=True))
        if active >= self.settings.max_allocations:
            return f"{active} allocations active, controller.max_allocations = {self.settings.max_allocations}"
        unsettled = self._unsettled_intents()
        if unsettled:
            return (f"Slurm has not told yet whether an earlier submission ({unsettled[0].tag}, for "
                    f"{unsettled[0].model!r}) was accepted; it is settled at the next successful Slurm poll")
        return None

    def _unsettled_intents(self):
        """Intents whose submission is not in progress in this process: left by a crash or a lost sbatch answer."""
        # Intents before the in-flight set: submit() marks a tag in flight before writing its intent and unmarks it
        # after settling, so an intent read here whose tag is not in flight afterwards is not being submitted.
        intents = self.registry.allocation_intents()
        with self._in_flight_lock:
            in_flight = set(self._in_flight)
        return [i for i in intents if i.tag not in in_flight]

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
        return sorted(n.name for n in self._usable_nodes(model))

    def _usable_nodes(self, model: DeployedModel, fresh: bool = False) -> list[NodeInfo]:
        """idle_nodes() with Slurm's view of each (fresh: sinfo asked now, not the cached answer)."""
        partition = self._partition(model)
        nodes = self._slurm_nodes(fresh) or []
        avoid = self._recently_busy_preferred_nodes()
        gpus = self.gpus_requested(model)
        return [n for n in nodes if n.available and n.state in USABLE_NODE_STATES and n.name not in avoid
                and (partition is None or partition in n.partitions) and n.gpus_free >= gpus]

    def distinct_nodes(self, model: DeployedModel, in_use: list[str]) -> list[str]:
        """The nodes to ask for by name for an allocation placement left to Slurm: `model.nodes` idle or mixed
        nodes of the model's partition (fresh from sinfo) that are not in in_use (nodes_in_use(): our agents',
        our allocations', and the nodes our queued allocations and unsettled submissions asked for). So allocations
        submitted close together (one autoscaler tick, or before the earlier ones started) land on distinct nodes:
        Slurm would pack small jobs (a CPU model's, asking for no GPU) onto one node, where only the first agent can
        register (agents are known by their node's name). Slurm's own pick for the job (`sbatch --test-only`,
        which honours node weights) when it names such nodes; else the best fit on free GPUs (a CPU model does
        not take a GPU node while a CPU node is free), idle before mixed, in Slurm's name order. [] when Slurm lists
        too few (or cannot be asked): the job is then left to Slurm, minus in_use (--exclude)."""
        taken = set(in_use)
        free = [n for n in self._usable_nodes(model, fresh=True) if n.name not in taken]
        if len(free) < model.nodes:
            return []
        names = {n.name for n in free}
        estimate = self._estimate(model, [], in_use)
        if estimate is not None and len(estimate.nodes) == model.nodes and set(estimate.nodes) <= names:
            return slurm_order(estimate.nodes)
        gpus = self.gpus_requested(model)
        rank = {name: i for i, name in enumerate(slurm_order(names))}
        best = sorted(free, key=lambda n: (n.gpus_free - gpus, n.state != "IDLE", rank[n.name]))[: model.nodes]
        return slurm_order(n.name for n in best)

    def gpus_requested(self, model: DeployedModel) -> int:
        """GPUs per node an allocation made for this model asks for: slurm.gpus_per_node, at least the model's; none
        for a CPU model. An instance spanning nodes asks for exactly its share of each node (gpus / nodes)."""
        if model.spans_nodes:
            return model.gpus // model.nodes
        return max(model.gpus, self.config.slurm.gpus_per_node) if model.gpus else 0

    def _recently_busy_preferred_nodes(self) -> set[str]:
        """Nodes an allocation asked for by name and never got, lately: idle in sinfo is not idle for us."""
        since = self.clock() - 5 * self.settings.preferred_node_wait_seconds
        return {node for a in self.registry.allocations() if a.reason == PREFERRED_NODE_BUSY and a.submitted_at >= since
                for node in a.preferred_nodes}

    def _slurm_nodes(self, fresh: bool = False) -> list[NodeInfo] | None:
        """Slurm's node list (None: cannot be asked); fresh: one asked since this call began, not a cached one."""
        if self.backend is None:
            return None
        return self._nodes.get("nodes", lambda: list(self.backend.nodes()),
                               newer_than=time.monotonic() if fresh else None)

    def _partition(self, model: DeployedModel) -> str | None:
        return model.slurm.partition or self.config.slurm.partition

    # ------------------------------------------------------------------------------------- queue waits

    def new_allocation_wait(self, model: DeployedModel, preferred_nodes: list[str], now: float,
                            in_use: list[str] | None = None) -> QueueWait:
        """Queue wait of an allocation for this model submitted now (asking for preferred_nodes by name, else any
        node but ours), of the job's whole shape (a spanning instance's: nodes x ranks per node, preferred_nodes
        its node set): Slurm's `sbatch --test-only` start plus agent_start_seconds; the constant when Slurm gives
        no estimate (backend without one, refused shape, unreachable, in back-off). in_use: nodes_in_use() when the
        caller already read it (placement asks for many candidates at once)."""
        if not preferred_nodes and in_use is None:
            in_use = self.nodes_in_use()
        estimate = self._estimate(model, preferred_nodes, in_use)
        if estimate is None:
            return QueueWait(self.settings.allocation_start_estimate_seconds, FROM_CONSTANT)
        return self._from_slurm(estimate, now, FROM_TEST_ONLY)

    def _estimate(self, model: DeployedModel, preferred_nodes: list[str], in_use: list[str]) -> StartEstimate | None:
        """Slurm's `sbatch --test-only` answer (when, and on which nodes) for an allocation of this model asking for
        preferred_nodes by name, else any node but in_use; cached briefly (placement asks on every cold route poll,
        and submit() asks the same question right after it)."""
        if self.backend is None:
            return None

        def ask() -> StartEstimate | None:
            return self.backend.estimate_start(self._job_spec(model, preferred_nodes, None, in_use=in_use))

        # The job's whole shape: a spanning instance's nodes x ranks per node, on exactly preferred_nodes.
        key = ("new", self._partition(model), self.gpus_requested(model), model.nodes,
               model.ranks_per_node if model.spans_nodes else 1, model.slurm.account, model.slurm.qos,
               model.slurm.time, tuple(preferred_nodes), () if preferred_nodes else tuple(in_use))
        return self._estimates.get(key, ask)

    def pending_wait(self, alloc, now: float) -> QueueWait:
        """Queue wait of an allocation submitted earlier whose agent has not registered: job started -> what is left
        of agent_start_seconds; queued -> Slurm's `squeue --start` (one call for all our queued jobs) plus
        agent_start_seconds; else what is left of the constant since it was submitted."""
        if alloc.state == "running" and alloc.started_at is not None:
            left = max(0.0, alloc.started_at + self.settings.agent_start_seconds - now)
            return QueueWait(left, FROM_JOB_STARTED, alloc.started_at)
        queued = tuple(sorted(a.job_id for a in self.registry.allocations(active_only=True) if a.state == "pending"))
        starts = self._estimates.get(("queued", queued), lambda: self.backend.pending_start_times(queued)) \
            if self.backend is not None and queued else None
        estimate = (starts or {}).get(alloc.job_id)
        if estimate is None:
            left = max(0.0, alloc.submitted_at + self.settings.allocation_start_estimate_seconds - now)
            return QueueWait(left, FROM_CONSTANT)
        return self._from_slurm(estimate, now, FROM_SQUEUE_START)

    def _from_slurm(self, estimate: StartEstimate, now: float, source: str) -> QueueWait:
        return QueueWait(max(0.0, estimate.start_time - now) + self.settings.agent_start_seconds, source,
                         estimate.start_time)

    # ------------------------------------------------------------------------------------------- actions

    def submit(self, model: DeployedModel, preferred_nodes: list[str], now: float) -> str:
        """sbatch one node-agent allocation for this model, on preferred_nodes (placement's pick: they hold the
        checkpoint) or else on distinct_nodes() (recorded as the allocation's preferred nodes, so later submissions
        leave them alone until its agent registers there). The intent is committed first and the job tagged with
        it, so a crash between sbatch and the record loses nothing (module docstring)."""
        why = self.why_not_submit(model)
        if why is not None:
            raise AllocationFailed(f"cannot submit an allocation for {model.name!r}: {why}")
        tag = new_allocation_tag()
        # The job's own token (docs/security.md): registers and heartbeats only that job's node, revoked when the job
        # ends. It reaches the agent through the job's environment (never argv, never the script on disk).
        minted = mint_token("allocation")
        with self._in_flight_lock:
            self._in_flight.add(tag)
        try:
            with self._pick_lock:  # until the intent names the picked nodes: nodes_in_use() counts them from then on
                in_use = self.nodes_in_use()
                nodes = list(preferred_nodes) or self.distinct_nodes(model, in_use)
                spec = self._spec_for_submit(model, nodes, tag, minted.token, in_use)
                time_limit = parse_walltime(model.slurm.time or self.config.slurm.time)  # valid: the spec has it
                self.registry.add_allocation_intent(tag, model.name, nodes, self._partition(model), time_limit, now)
            self.registry.add_credential(minted.credential_id, "allocation", minted.secret_hash, now,
                                         model=model.name, job_tag=tag)
            job_id = self._sbatch(spec, model, tag)
            self.registry.settle_allocation_intent(tag, job_id)
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(tag)
        self._nodes.forget()  # a node just got busier
        self._estimates.forget()  # and so did the queue
        log.info("submitted allocation %s (%s) for %s (%s)", job_id, tag, model.name,
                 f"prefer {preferred_nodes}" if preferred_nodes else f"on {nodes}, where no agent of ours is"
                 if nodes else f"any node but {in_use or 'none'}: Slurm lists no other idle node")
        return job_id

    def _spec_for_submit(self, model: DeployedModel, nodes: list[str], tag: str, token: str,
                         in_use: list[str]) -> JobSpec:
        """_job_spec(), with its log's folder made (AllocationFailed saying why when either fails)."""
        try:
            spec = self._job_spec(model, nodes, tag, token, in_use=in_use)
            if spec.output:  # Slurm cannot create the log's folder itself: the job would fail at once
                Path(spec.output).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AllocationFailed(f"cannot create the folder for the allocation's log: {exc}") from None
        except ConfigError as exc:
            raise AllocationFailed(f"cannot describe the allocation for {model.name!r}: {exc}") from None
        return spec

    def _sbatch(self, spec: JobSpec, model: DeployedModel, tag: str) -> str:
        try:
            return str(self.backend.submit(spec))
        except SlurmUnavailable as exc:
            # Slurm may have accepted the job before its answer was lost (a timeout): keep the intent; the next
            # successful poll adopts the tagged job or drops the intent.
            raise AllocationFailed(f"Slurm did not answer the allocation for {model.name!r} ({tag}): {exc}") from None
        except SlurmError as exc:
            self.registry.settle_allocation_intent(tag, None)  # refused: nothing was submitted
            raise AllocationFailed(f"Slurm refused the allocation for {model.name!r}: {exc}") from None

    def cancel(self, job_id: str, reason: str, now: float) -> None:
        try:
            self.backend.cancel(job_id)
        except SlurmError as exc:
            raise AllocationFailed(f"cannot cancel allocation {job_id}: {exc}") from None
        self.registry.update_allocation(job_id, state="cancelling", reason=reason)

    def sync(self, now: float) -> dict[str, str]:
        """Ask Slurm about every active allocation in one call; returns {job_id: new state} for changes.

        An ended job's nodes leave the registry (their instances with them); a requeued one goes back to pending.
        Unsettled intents are settled first: their tagged jobs are adopted (state "adopted").
        """
        if self.backend is None:
            return {}
        changes = self._settle_intents()
        active = self.registry.allocations(active_only=True)
        if not active:
            return changes
        try:
            statuses = self.backend.statuses([a.job_id for a in active])
        except SlurmError as exc:
            raise AllocationFailed(f"cannot poll Slurm: {exc}") from None
        self._queued = {job_id: status for job_id, status in statuses.items()
                        if status.state in (JobState.PENDING, JobState.REQUEUED)}
        # Released (or gone): told again if held again.
        self._held_told &= {job_id for job_id, status in self._queued.items() if status.held}
        for alloc in active:
            status = statuses.get(alloc.job_id)
            new_state = self._apply_status(alloc, status, now)
            if new_state is not None:
                changes[alloc.job_id] = new_state
        return changes

    def pending_reason(self, job_id: str) -> str | None:
        """Why Slurm keeps a queued allocation of ours pending (squeue's REASON, e.g. Resources,
        QOSMaxJobsPerUserLimit), as of the last poll; None when it is not queued or Slurm gave no reason."""
        status = self._queued.get(job_id)
        return (status.reason or None) if status is not None else None

    def is_held(self, job_id: str) -> bool:
        """Whether the last poll (sync) saw the allocation's job held in Slurm (JobStatus.held): it starts only when
        released; sync() logs it with the scontrol release to run."""
        status = self._queued.get(job_id)
        return status is not None and status.held

    def _settle_intents(self) -> dict[str, str]:
        """Adopt the Slurm jobs of intents left by a crash (or a lost sbatch answer); drop intents with no live job.
        One list_jobs() call, only when there is something to settle."""
        intents = self._unsettled_intents()
        if not intents:
            return {}
        try:
            jobs = self.backend.list_jobs()
        except SlurmError as exc:
            raise AllocationFailed(f"cannot ask Slurm about {len(intents)} unsettled submission(s): {exc}") from None
        by_tag = {status.comment: status for status in jobs.values() if status.comment}
        adopted = {}
        for intent in intents:
            status = by_tag.get(intent.tag)
            if status is not None and not status.is_terminal:
                if self.registry.settle_allocation_intent(intent.tag, status.job_id):
                    adopted[status.job_id] = "adopted"
                    log.warning("adopted allocation %s (%s) for %s: submitted before a crash or a lost answer",
                                status.job_id, intent.tag, intent.model)
            else:
                self.registry.settle_allocation_intent(intent.tag, None)
                log.info("dropped allocation intent %s for %s: %s", intent.tag, intent.model,
                         f"its job {status.job_id} already ended ({status.raw_state})" if status
                         else "Slurm has no such job (never submitted)")
        self._nodes.forget()
        return adopted

    def _apply_status(self, alloc, status: JobStatus | None, now: float) -> str | None:
        if status is None or status.is_terminal:
            # Completed, cancelled, failed, timed out, preempted, node failure, or purged from Slurm's memory.
            revoked = self.registry.revoke_job_credentials(alloc.job_id, now)
            if revoked:
                log.info("allocation %s ended: revoked its node token", alloc.job_id)
            self._nodes_left(alloc.job_id)
            state_word = "missing" if status is None or status.missing else (status.raw_state or status.state.value)
            self.registry.update_allocation(alloc.job_id, state="ended", ended_at=now,
                                            reason=alloc.reason or state_word.lower())
            return "ended"
        if status.held_after_failed_launch and alloc.state in ("pending", "running") \
                and alloc.job_id not in self._held_told:
            earlier = self._failed_launches_of(alloc.model, now)
            if len(earlier) < FAILED_LAUNCH_REPLACEMENTS:
                return self._cancel_held(alloc, status, now)
            self._held_told.add(alloc.job_id)
            nodes = sorted({node for _, nodes in earlier for node in nodes} | set(self._launch_nodes(alloc, status)))
            log.error("allocation %s for %s is held by Slurm (%s), its launch failed again within %.0f s: left held, "
                      "not replaced, or each replacement could drain another node (failed on: %s; sinfo -R lists "
                      "the nodes Slurm drained and why). Fix the cause, then scontrol release %s (or scancel %s)",
                      alloc.job_id, alloc.model, status.reason or status.raw_state, FAILED_LAUNCH_WINDOW_SECONDS,
                      ", ".join(nodes) or "nodes not known", alloc.job_id, alloc.job_id)
        if status.held and alloc.job_id not in self._held_told:
            # Held by someone (an admin, a job_submit plugin): theirs to release; a replacement would be held too.
            self._held_told.add(alloc.job_id)
            log.warning("allocation %s for %s is held by Slurm (%s): it starts only when released (scontrol release "
                        "%s) or cancelled (scancel %s)", alloc.job_id, alloc.model,
                        status.reason or status.raw_state, alloc.job_id, alloc.job_id)
        if status.state.is_active:
            started = status.start_time or alloc.started_at or now
            end = status.end_time or (started + alloc.time_limit_seconds if alloc.time_limit_seconds else None)
            changes: dict = {}
            if alloc.state == "pending":
                changes["state"] = "running"
                if alloc.reason in PAUSED_REASONS:  # resumed, or started again after a requeue: no longer so
                    changes["reason"] = None
            if alloc.started_at != started:
                changes["started_at"] = started
            if end is not None and alloc.walltime_end != end and alloc.retire_at is None:
                changes["walltime_end"] = end  # frozen once a retirement time was derived from it
            if status.nodes and list(status.nodes) != alloc.nodes:
                changes["nodes"] = sorted(status.nodes)
            if changes:
                self.registry.update_allocation(alloc.job_id, **changes)
            if changes.get("state") == "running" and status.nodes:
                return self._give_back_if_sharing(alloc.job_id, status.nodes, now) or "running"
            return changes.get("state")
        if status.state in (JobState.PENDING, JobState.REQUEUED) and alloc.state == "running":
            # Preempted and requeued (same job id): its agents are gone; it will start (and register) again. Or
            # suspended (PreemptMode=SUSPEND, scontrol suspend): its agents stopped; they register again on resume.
            suspended = status.raw_state.lower() in PAUSED_REASONS
            self._nodes_left(alloc.job_id)
            self.registry.update_allocation(alloc.job_id, state="pending", started_at=None, walltime_end=None,
                                            retire_at=None, idle_since=None, nodes=[],
                                            reason=status.raw_state.lower() if suspended else REQUEUED)
            return "pending"
        return None

    def _cancel_held(self, alloc, status: JobStatus, now: float) -> str | None:
        """A job Slurm held after its launch failed starts only when someone releases it: as a pending allocation it
        would stand for its model's demand forever. Cancelled ("cancelling", Slurm's reason kept), so the demand
        submits another (Slurm drains a node whose prolog failed: it goes elsewhere); None when the cancel fails
        (tried again at the next sync)."""
        if alloc.state == "running":  # requeued held after it ran: its agents are gone
            self._nodes_left(alloc.job_id)
        reason = f"held by Slurm ({status.reason or status.raw_state})"
        try:
            self.cancel(alloc.job_id, reason, now)
        except AllocationFailed as exc:
            log.warning("allocation %s is %s and could not be cancelled: %s", alloc.job_id, reason, exc)
            return None
        self._failed_launches.setdefault(alloc.model, []).append((now, self._launch_nodes(alloc, status)))
        log.warning("cancelled allocation %s for %s: %s, it would start only when released", alloc.job_id,
                    alloc.model, reason)
        return "cancelling"

    def _failed_launches_of(self, model: str | None, now: float) -> list[tuple[float, tuple[str, ...]]]:
        """The model's allocations cancelled after a failed launch within FAILED_LAUNCH_WINDOW_SECONDS: (when, on
        which nodes)."""
        recent = [(at, nodes) for at, nodes in self._failed_launches.get(model, [])
                  if now - at < FAILED_LAUNCH_WINDOW_SECONDS]
        self._failed_launches[model] = recent
        return recent

    @staticmethod
    def _launch_nodes(alloc, status: JobStatus) -> tuple[str, ...]:
        """Where a job whose launch failed was launched, as far as we know: Slurm's nodes for it, the nodes the last
        poll saw it on, else the nodes it asked for by name."""
        return tuple(status.nodes or alloc.nodes or alloc.preferred_nodes)

    def _give_back_if_sharing(self, job_id: str, nodes: tuple[str, ...], now: float) -> str | None:
        """An allocation that just started where an agent of ours is registered or another allocation of ours runs
        (Slurm packed it there: the --exclude fallback, when no distinct idle node was listed) can never get its
        agent in (one agent per node): cancelled at once ("cancelling"), so demand submits another, instead of
        holding the node until allocation_keep_alive_seconds. None when it has its nodes to itself, or when the
        cancel fails (it is then released as idle, as before)."""
        shared = [f"{n.node_id} (agent of job {n.slurm_job_id or '-'})"
                  for n in self.registry.nodes(states=("up", "draining"))
                  if n.node_id in nodes and n.slurm_job_id != job_id]
        shared += [f"{node} (allocation {other.job_id})" for other in self.registry.allocations(active_only=True)
                   if other.job_id != job_id and other.state in ("running", "draining")
                   for node in sorted(set(other.nodes) & set(nodes))]
        if not shared:
            return None
        reason = f"shares a node with ours: {', '.join(shared)}"
        try:
            self.cancel(job_id, reason, now)
        except AllocationFailed as exc:
            log.warning("allocation %s started on a node of ours (%s) and could not be cancelled: %s", job_id,
                        ", ".join(shared), exc)
            return None
        log.warning("cancelled allocation %s: Slurm started it on a node of ours, %s; one agent per node",
                    job_id, ", ".join(shared))
        return "cancelling"

    def _nodes_left(self, job_id: str) -> None:
        for node in self.registry.nodes(states=("up", "draining", "lost")):
            if node.slurm_job_id == job_id:
                self.registry.node_left(node.node_id, "gone")

    # ----------------------------------------------------------------------------- the job we submit

    def slurm_job_nodes(self, job_id: str) -> list[str] | None:
        """The nodes Slurm says the job runs on now; [] for a job that ended; None when Slurm cannot say (no
        backend, no answer, or no nodes listed yet)."""
        if self.backend is None:
            return None
        try:
            status = self.backend.statuses([job_id]).get(job_id)
        except SlurmError as exc:
            log.warning("cannot ask Slurm where job %s runs (%s)", job_id, exc)
            return None
        if status is None or status.is_terminal:
            return []
        return sorted(status.nodes) or None

    def job_nodes(self, job_id: str | None) -> list[str] | None:
        """The nodes a job of ours runs on, as Slurm says now (a requeued job may come back elsewhere); the recorded
        ones when Slurm cannot say; [] for a job that ended; None when unknown."""
        if job_id is None:
            return None
        nodes = self.slurm_job_nodes(job_id)
        if nodes is not None:
            return nodes
        alloc = self.registry.get_allocation(job_id)
        return alloc.nodes if alloc is not None and alloc.nodes else None

    def _job_spec(self, model: DeployedModel, preferred_nodes: list[str], tag: str | None,
                  token: str | None = None, in_use: list[str] | None = None) -> JobSpec:
        """The slurm package's node-agent job (one node) with the model's [slurm] overrides (partition, account,
        qos, time; else the [slurm] config), tagged with --comment=<tag>. preferred_nodes are asked for by name
        (--nodelist; slurmrestd's "nodelist" key): a node holding the checkpoint (placement proposes only nodes
        that are idle now), or distinct_nodes()'s pick. With none the job is left to Slurm, minus the nodes where
        an agent of ours runs or may soon (--exclude). The agent finds us through HPCLLM_CONTROLLER_URL."""
        env = {CONTROLLER_URL_ENV: self.controller_url}
        if token:
            env[TOKEN_ENV] = token
        if self.config_path:
            env["HPCLLM_CONFIG"] = self.config_path
        # A model whose instance spans nodes gets an allocation of its own shape: nodes x ranks per node x its GPUs
        # per node, with one agent (on the first node) that starts the ranks across them (docs/tensor-parallel.md).
        spec = node_agent_job_spec(
            self.config,
            nodes=model.nodes,
            tasks_per_node=model.ranks_per_node if model.spans_nodes else 1,
            spanning_instance=model.spans_nodes,
            gpus_per_node=self.gpus_requested(model),
            time=model.slurm.time,
            partition=model.slurm.partition,
            account=model.slurm.account,
            qos=model.slurm.qos,
            name=f"hpcllm-pool-{model.name}",
            hpcllm=self.settings.agent_command,
            env=env,
        )
        extra: dict = {"comment": tag}
        if preferred_nodes:
            extra["nodelist"] = tuple(preferred_nodes)
        else:
            busy = self.nodes_in_use() if in_use is None else in_use
            if busy:  # Slurm packs small jobs onto one node: a second agent there would share the first's node id
                extra["exclude"] = tuple(busy)
        return make_job_spec(**{**spec.model_dump(), **extra})

    def nodes_in_use(self) -> list[str]:
        """Nodes where an agent of ours runs or may soon: registered agents (also of users' own pools), nodes of
        active allocations, the nodes a queued (or requeued) allocation asked for by name, and those of submissions
        not settled yet (being submitted now, or left by a crash). A node agent is known by its Slurm node name, so
        a second agent on such a node would take over the first one's registration. All of it is in the registry,
        so a restarted controller sees the same."""
        busy = {n.node_id for n in self.registry.nodes(states=("up", "draining"))}
        for alloc in self.registry.allocations(active_only=True):
            busy.update(alloc.nodes)
            if alloc.state == "pending":
                busy.update(alloc.preferred_nodes)
        for intent in self.registry.allocation_intents():
            busy.update(intent.preferred_nodes)
        return sorted(busy)


__all__ = ["PREFERRED_NODE_BUSY", "TAG_PREFIX", "Allocator", "QueueWait", "new_allocation_tag", "waits_for_its_nodes"]
