"""Autoscaling policy, one `tick(now)` at a time (driven by a timer in the service, by a fake clock in tests).

Each tick, in order:
1. Slurm: poll every active allocation in one call; ended jobs take their nodes with them; started ones get a
   walltime end and a staggered retirement time. An allocation queued too long for a node asked for by name is
   resubmitted for any node (unless Slurm holds it for a limit, not for the node: it keeps its place).
2. Node agents silent for node_timeout_seconds are lost (their instances forgotten).
3. Reservations the agent never confirmed (the controller died mid-start, the agent hung) are dropped.
4. Instances of undeployed models are stopped.
5. Retirement, make before break: from retire_at an allocation serves on but gets no new instance, while a
   replacement of each of its models starts elsewhere; once every one has a ready instance outside retiring
   allocations it drains (no new routes; instances moved off, their requests live-migrated there), at its drain
   deadline without (stopped: requests resume from tokens); it is cancelled once empty or after drain_seconds.
   A model pool whose agent reported its job's end is handed over the same way from retire_lead_seconds before that
   end, to an instance its requests may go to; without one ready it serves on until Slurm's signal, as before.
6. Instance-level scale to zero: ready instances idle longer than their model's keep_alive are stopped (never
   below min_instances, counted on up nodes as in step 8; never those of a model pool's node: its agent keeps them for its job's whole life).
7. Node-level scale to zero: an allocation whose nodes held no instance for allocation_keep_alive_seconds is
   cancelled (its idle time counts from the tick that found it empty).
8. min_instances and unmet demand (route calls that found no capacity) start instances or submit allocations.
9. History older than history_seconds (ended allocations, cold starts) is pruned.
With controller.keep_alive_policy = "per-model" (a baseline, docs/placement.md) steps 6 and 7 do nothing.
Each step is isolated: Slurm being down does not stop scale-to-zero, and so on.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from hpcllm.controller.allocations import PREFERRED_NODE_BUSY, waits_for_its_nodes
from hpcllm.controller.errors import AgentError, ControllerError
from hpcllm.controller.registry import AllocationRecord
from hpcllm.controller.service import ROUTABLE_NODE_STATES, Controller, allocation_agents, is_retiring

log = logging.getLogger(__name__)

# A reservation older than this was never confirmed by its agent (start timed out or the controller died).
RESERVATION_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class Action:
    kind: str  # e.g. "stop_idle", "retire", "cancel_idle_allocation", "node_lost", "start_min"
    subject: str
    detail: str = ""


@dataclass
class TickReport:
    now: float
    actions: list[Action] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def kinds(self) -> list[tuple[str, str]]:
        return [(a.kind, a.subject) for a in self.actions]


class Autoscaler:
    def __init__(self, controller: Controller):
        self.controller = controller
        self.registry = controller.registry
        self.allocator = controller.allocator
        self.settings = controller.settings
        # The Slurm reason each queued allocation kept past preferred_node_wait_seconds was logged with (once).
        self._kept_for_limit: dict[str, str] = {}

    def tick(self, now: float) -> TickReport:
        report = TickReport(now)
        for step in (self._sync_slurm, self._unstick_pending_allocations, self._lose_silent_nodes,
                     self._drop_stale_reservations, self._stop_orphans, self._retire_allocations,
                     self._retire_pools, self._stop_idle_instances, self._release_idle_allocations,
                     self._ensure_min_and_demand, self._prune_history):
            try:
                step(now, report)
            except ControllerError as exc:
                report.errors.append(f"{step.__name__}: {exc}")
                log.warning("autoscaler %s: %s", step.__name__, exc)
        for action in report.actions:
            log.info("autoscaler: %s %s %s", action.kind, action.subject, action.detail)
        return report

    # ------------------------------------------------------------------------------------------------ steps

    def _sync_slurm(self, now: float, report: TickReport) -> None:
        for job_id, state in self.allocator.sync(now).items():
            report.actions.append(Action(f"allocation_{state}", job_id))
        for alloc in self.registry.allocations(active_only=True):
            if alloc.state == "running" and alloc.retire_at is None and alloc.walltime_end is not None:
                retire_at = self._staggered_retire_time(alloc)
                self.registry.update_allocation(alloc.job_id, retire_at=retire_at)
                report.actions.append(Action("schedule_retire", alloc.job_id, f"at {retire_at:.0f}"))

    def _staggered_retire_time(self, alloc: AllocationRecord) -> float:
        """The latest time at most retire_lead_seconds before walltime that is retire_stagger_seconds away from
        every other allocation's retirement: pools started together leave one by one, none earlier than needed."""
        others = [a.retire_at for a in self.registry.allocations(active_only=True)
                  if a.job_id != alloc.job_id and a.retire_at is not None]
        ideal = alloc.walltime_end - self.settings.retire_lead_seconds
        stagger = self.settings.retire_stagger_seconds
        # The free times are outside (other - stagger, other + stagger): the latest one is the ideal time or
        # just before one of those windows.
        candidates = [ideal] + [other - stagger for other in others if other - stagger < ideal]
        start = alloc.started_at or alloc.submitted_at
        # Never staggered to before its start (it would retire as it starts): the ideal time then, beside another.
        free = [t for t in candidates if t >= start and all(abs(t - other) >= stagger for other in others)]
        return max(free) if free else max(ideal, start)

    def _unstick_pending_allocations(self, now: float, report: TickReport) -> None:
        """An allocation asking for a node by name can queue forever if that node got taken: ask for any node. Not
        when Slurm holds it for a limit (QOS, association, licenses: waits_for_its_nodes): a new job would queue
        behind the same limit, at the back; it keeps its place, and the admin is told why (log, hpcllm status).
        Nor when its job is held (JobHeldUser, JobHeldAdmin): that is someone's to release."""
        active = self.registry.allocations(active_only=True)
        active_jobs = {a.job_id for a in active}
        self._kept_for_limit = {job: why for job, why in self._kept_for_limit.items() if job in active_jobs}
        for alloc in active:
            if alloc.state != "pending" or not alloc.preferred_nodes \
                    or now - alloc.submitted_at < self.settings.preferred_node_wait_seconds:
                continue
            if self.allocator.is_held(alloc.job_id):
                continue  # starts only when released, wherever it queues; the allocator logs how to release it
            reason = self.allocator.pending_reason(alloc.job_id)
            if not waits_for_its_nodes(reason):
                if self._kept_for_limit.get(alloc.job_id) != reason:
                    self._kept_for_limit[alloc.job_id] = reason
                    log.warning("allocation %s for %s has queued %.0f s for %s: Slurm holds it for %s, which a new "
                                "job on another node would wait for as well; it stays queued", alloc.job_id,
                                alloc.model, now - alloc.submitted_at, ", ".join(alloc.preferred_nodes), reason)
                continue
            self.allocator.cancel(alloc.job_id, PREFERRED_NODE_BUSY, now)
            report.actions.append(Action("cancel_stuck_allocation", alloc.job_id, f"{alloc.preferred_nodes} busy"))
            model = self.registry.get_model(alloc.model) if alloc.model else None
            if model is not None:
                job_id = self.allocator.submit(model, [], now)
                report.actions.append(Action("resubmit_allocation", job_id, f"{model.name} on any node"))

    def _lose_silent_nodes(self, now: float, report: TickReport) -> None:
        for node in self.registry.nodes(states=("up", "draining")):
            if node.last_heartbeat is None or now - node.last_heartbeat > self.settings.node_timeout_seconds:
                removed = self.registry.node_left(node.node_id, "lost")
                report.actions.append(Action("node_lost", node.node_id, f"{len(removed)} instances forgotten"))

    def _drop_stale_reservations(self, now: float, report: TickReport) -> None:
        for inst in self.registry.instances():
            if inst.reserved and now - inst.requested_at > RESERVATION_TIMEOUT_SECONDS:
                self.registry.delete_instance(inst.instance_id)
                report.actions.append(Action("drop_reservation", inst.instance_id, inst.model))

    def _stop_orphans(self, now: float, report: TickReport) -> None:
        deployed = {m.name for m in self.registry.models()}
        for inst in self.registry.instances():
            if inst.model not in deployed and not inst.reserved and self._stop(inst.node_id, inst.instance_id):
                report.actions.append(Action("stop_orphan", inst.instance_id, inst.model))

    def _retire_allocations(self, now: float, report: TickReport) -> None:
        for alloc in self.registry.allocations(active_only=True):
            if is_retiring(alloc, now):
                self._hand_over(alloc, now, report)
            elif alloc.state == "draining":
                instances = self._instances_of(alloc)
                drain_started = alloc.retire_at if alloc.retire_at is not None else now  # _begin_drain's time
                if not instances or now >= drain_started + self.settings.drain_seconds:
                    self.allocator.cancel(alloc.job_id, alloc.reason or "retired", now)
                    report.actions.append(Action("cancel_drained_allocation", alloc.job_id,
                                                 f"{len(instances)} instances left"))

    def _hand_over(self, alloc: AllocationRecord, now: float, report: TickReport) -> None:
        """Make before break: a retiring allocation serves on while a replacement of each of its models starts
        elsewhere, and drains (its requests live-migrate) once every one of them has a ready instance outside the
        retiring allocations; at the drain deadline it drains without (requests resume from their tokens)."""
        leaving = self.controller.retiring_nodes(now)
        models = sorted({inst.model for inst in self._instances_of(alloc)})
        missing = [name for name in models if self.controller.ready_target(name, leaving) is None]
        if not missing:
            self._begin_drain(alloc, now, "walltime", report)
        elif now >= self.controller.drain_deadline(alloc):
            report.actions.append(Action("retire_without_replacement", alloc.job_id,
                                         f"no ready instance of {missing} elsewhere by the drain deadline: their "
                                         f"requests resume from their tokens"))
            self._begin_drain(alloc, now, "walltime", report)
        else:
            self._start_replacements(missing, leaving, report)

    def _start_replacements(self, names: list[str], leaving: frozenset[str], report: TickReport,
                            group: str | None = None) -> None:
        """Start an instance of each model off the leaving nodes, unless one is on its way there (loading, or an
        allocation made for it whose agent has not registered): one at a time per model, as for demand. group: the
        one group a retiring pool serves (only where its requests may go counts)."""
        routable = set(self.controller.routable_nodes(group, leaving))
        for name in names:
            model = self.registry.get_model(name)
            if model is None or self.controller.pending_allocations(name) or any(
                    i.state == "loading" and i.node_id in routable for i in self.registry.instances(model=name)):
                continue
            self._start(model, "start_replacement", report, exclude_nodes=leaving, group=group)

    def _retire_pools(self, now: float, report: TickReport) -> None:
        """A model pool's job ends too: its agent reports when. From retire_lead_seconds before that end the pool
        serves on while an instance of its model starts where its requests may go (public nodes, or its own group's
        pools: never another group's), and once one is ready the pool drains - its agent, told so by its next
        heartbeat's answer, live-migrates its requests there (the migration target) and exits. No drain deadline:
        with none ready the pool serves until Slurm's signal, whose drain takes the replacement if it is ready then."""
        pools = [n for n in self.registry.nodes(states=ROUTABLE_NODE_STATES)
                 if self.controller.is_retiring_pool(n, now)]
        if not pools:
            return
        leaving = self.controller.retiring_nodes(now)  # once: a pool set draining below is no target anyway
        for node in pools:
            target = self.controller.ready_target(node.pool_model, leaving, node.serves_group)
            if target is None:
                self._start_replacements([node.pool_model], leaving, report, group=node.serves_group)
                continue
            self.registry.set_node_state(node.node_id, "draining")
            report.actions.append(Action("retire_pool", node.node_id,
                                         f"job ends at {node.job_end:.0f}; {node.pool_model} ready on "
                                         f"{target.node_id}: its agent drains into it"))

    def _begin_drain(self, alloc: AllocationRecord, now: float, reason: str, report: TickReport) -> None:
        # retire_at becomes the drain's start: drain_seconds count from it, and status shows when it left.
        self.registry.update_allocation(alloc.job_id, state="draining", reason=reason, retire_at=now)
        affected_models = set()
        for node in self._nodes_of(alloc):
            self.registry.set_node_state(node.node_id, "draining")
        for inst in self._instances_of(alloc):
            affected_models.add(inst.model)
            self.registry.set_instance_state(inst.instance_id, "draining")
            self._move(inst)
        report.actions.append(Action("retire", alloc.job_id, f"{reason}; models {sorted(affected_models)}"))
        # Models left with no ready instance (the deadline came first) get one started elsewhere, as before.
        leaving = self.controller.retiring_nodes(now)
        self._start_replacements([name for name in sorted(affected_models)
                                  if self.controller.ready_target(name, leaving) is None], leaving, report)

    def _release_idle_allocations(self, now: float, report: TickReport) -> None:
        if self.settings.keep_alive_policy == "per-model":
            return  # a per-user launcher keeps its allocation until the walltime (retirement ends it)
        live = self.registry.nodes(states=("up", "draining"))  # read once: a tick over 1,000 allocations
        instances = self.registry.instances()
        for alloc in self.registry.allocations(active_only=True):
            if alloc.state != "running":
                continue
            if self._instances_of(alloc, live, instances):
                if alloc.idle_since is not None:
                    self.registry.update_allocation(alloc.job_id, idle_since=None)
                continue
            starting = now - (alloc.started_at or now) < self.settings.node_timeout_seconds
            if not allocation_agents(alloc, live) and starting:
                continue  # its agent is still starting (not registered yet): not idle, unless it never registers
            if alloc.idle_since is None:
                self.registry.update_allocation(alloc.job_id, idle_since=now)
            elif now - alloc.idle_since >= self.settings.allocation_keep_alive_seconds:
                up = [node.node_id for node in self._nodes_of(alloc) if node.state == "up"]
                for node_id in up:  # before the cancel: nothing is placed there meanwhile
                    self.registry.set_node_state(node_id, "draining")
                try:
                    self.allocator.cancel(alloc.job_id, "idle", now)
                except ControllerError:
                    # Slurm did not take the cancel (an outage): the node serves on, and the next tick tries again
                    # if it is still idle - left draining, it could not serve while no other allocation can be made.
                    for node_id in up:
                        self.registry.set_node_state(node_id, "up")
                    raise
                report.actions.append(Action("cancel_idle_allocation", alloc.job_id,
                                             f"idle {now - alloc.idle_since:.0f} s"))

    def _stop_idle_instances(self, now: float, report: TickReport) -> None:
        if self.settings.keep_alive_policy == "per-model":
            return  # per-user launcher style: a model's instance serves until its allocation ends
        # A model pool (`hpcllm node --model`) owns its instances: stopping one would only make its agent start it
        # again (and the next user wait for a cold start). They still count as active for min_instances.
        pool_nodes = {n.node_id for n in self.registry.nodes() if n.is_pool}
        started_at = self.controller.started_at  # no use seen before this controller started (Controller.started_at)
        # min_instances counts what serves on (as step 8 does): an instance on a draining node (its agent got
        # Slurm's signal) leaves soon, so stopping an up node's idle one for it meant a cold start in step 8. Nor
        # does a group's own pool count: it serves that group only, and min_instances is everyone's.
        routable = self.controller.routable_nodes(group=None)
        by_model = defaultdict(list)
        for inst in self.registry.instances():
            if inst.state in ("ready", "loading"):
                by_model[inst.model].append(inst)
        for model in self.registry.models():
            keep_alive = model.keep_alive_seconds
            if keep_alive is None:
                keep_alive = self.settings.keep_alive_seconds
            active = self.controller.counted_instances(by_model.get(model.name, []))
            idle = sorted((i for i in active if i.state == "ready" and i.load == 0
                           and now - max(i.last_used, started_at) >= keep_alive and i.node_id not in pool_nodes),
                          key=lambda i: (i.last_used, i.instance_id))
            can_stop = max(0, sum(i.node_id in routable for i in active) - model.min_instances)
            leaving = [i for i in idle if i.node_id not in routable]
            for inst in leaving + [i for i in idle if i.node_id in routable][:can_stop]:
                if self._stop(inst.node_id, inst.instance_id):
                    self.registry.delete_instance(inst.instance_id)
                    report.actions.append(Action("stop_idle", inst.instance_id,
                                                 f"{model.name} idle {now - inst.last_used:.0f} s"))

    def _ensure_min_and_demand(self, now: float, report: TickReport) -> None:
        # What everyone may be routed to (as step 6): a group's own pool neither keeps the model at min_instances
        # nor serves the demand of the other groups' requests that found no capacity. A group's own demand it does
        # serve: that group's requests may go there (routable_nodes(group)).
        demand = self.registry.demand()
        serving_by_model: dict[str, list] = defaultdict(list)  # one read for all models, not one per model
        for inst in self.registry.instances():
            if inst.state in ("ready", "loading"):
                serving_by_model[inst.model].append(inst)
        up = self.registry.nodes(states=ROUTABLE_NODE_STATES)  # one read for every group
        routable_for = {group: set(self.controller.routable_nodes(group, up=up))
                        for group in {g for d in demand.values() for g in d.groups} | {None}}
        routable = routable_for[None]
        for model in self.registry.models():
            serving = self.controller.counted_instances(serving_by_model[model.name])
            active = [i for i in serving if i.node_id in routable]
            unmet = []  # groups whose demand nothing ready or loading where their requests may go answers
            if model.name in demand:
                asked = demand[model.name]
                keep_alive = model.keep_alive_seconds if model.keep_alive_seconds is not None \
                    else self.settings.keep_alive_seconds
                if now - asked.last > keep_alive:
                    self.registry.clear_demand(model.name, asked.groups)  # nobody has asked for a long time
                else:
                    served = frozenset(g for g in asked.groups if any(
                        i.state == "ready" and i.node_id in routable_for[g] for i in serving))
                    if served:
                        self.registry.clear_demand(model.name, served)
                    unmet = [g for g in asked.groups - served
                             if not any(i.node_id in routable_for[g] for i in serving)]
            below_min = len(active) < model.min_instances
            if not unmet and not below_min:
                continue
            if any(i.state == "loading" for i in active) or self.controller.pending_allocations(model.name):
                continue  # capacity is on its way: one cold start / allocation at a time per model
            if unmet:  # started where everyone may go (placement never picks a pool), counted for that group
                first = min(unmet, key=lambda g: (g is not None, g or ""))  # no group first, then by name
                self._start(model, "start_for_demand", report, group=first)
            else:
                self._start(model, "start_min", report)

    def _prune_history(self, now: float, report: TickReport) -> None:
        if self.registry.prune_history(now - self.settings.history_seconds):
            report.actions.append(Action("prune_history", "registry"))

    # ---------------------------------------------------------------------------------------------- helpers

    def _start(self, model, kind: str, report: TickReport, exclude_nodes: frozenset[str] = frozenset(),
               group: str | None = None) -> None:
        try:
            outcome = self.controller.start_instance(model, exclude_nodes=exclude_nodes, group=group)
        except (ControllerError, AgentError) as exc:
            report.errors.append(f"{kind} {model.name}: {exc}")
            return
        report.actions.append(Action(kind, model.name, f"{outcome.status} {outcome.node_id or outcome.job_id}"))

    def _stop(self, node_id: str, instance_id: str) -> bool:
        node = self.registry.get_node(node_id)
        if node is None or node.state not in ("up", "draining"):
            self.registry.delete_instance(instance_id)  # its agent is gone: so is the instance
            return True
        try:
            self.controller.stop_on_agent(node, instance_id)
        except AgentError as exc:
            log.warning("could not stop %s on %s: %s", instance_id, node_id, exc)
            return False
        return True

    def _move(self, inst) -> None:
        """Retire an instance without losing its requests: live-migrate them to an instance elsewhere when there
        is one (else stop it: the gateway resumes them from their tokens)."""
        node = self.registry.get_node(inst.node_id)
        if node is None or node.state not in ("up", "draining"):
            self.registry.delete_instance(inst.instance_id)  # its agent is gone: so is the instance
            return
        self.controller.move_instance(node, inst, trigger="retire")

    def _nodes_of(self, alloc: AllocationRecord):
        return allocation_agents(alloc, self.registry.nodes(states=("up", "draining")))

    def _instances_of(self, alloc: AllocationRecord, live=None, instances=None):
        """Its agents' instances; `live` nodes and `instances` as read from the registry, when already at hand."""
        nodes = self._nodes_of(alloc) if live is None else allocation_agents(alloc, live)
        node_ids = {n.node_id for n in nodes}
        return [i for i in (self.registry.instances() if instances is None else instances)
                if i.node_id in node_ids and i.state != "stopped"]
