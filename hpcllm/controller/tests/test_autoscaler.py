"""Autoscaler policy with a fake clock, in-memory node agents and an in-memory Slurm."""

from __future__ import annotations

import pytest

from hpcllm.controller.autoscaler import RESERVATION_TIMEOUT_SECONDS
from hpcllm.controller.errors import UnknownModel
from hpcllm.controller.protocol import Heartbeat, InstanceInfo
from hpcllm.controller.service import STALE_REPORT_MARGIN_SECONDS
from hpcllm.controller.tests.conftest import GB
from hpcllm.slurm.base import JobState, NodeInfo


def ready_instance(h, model="m", node="n1", tier="nvme"):
    """Route once (cold start) and let the node report it ready."""
    outcome = h.controller.route(model)
    h.heartbeat(node, tier=tier)
    return outcome.instance_id


def test_idle_instance_scales_to_zero_after_keep_alive(harness):
    harness.deploy("m", keep_alive_seconds=120)
    harness.register("n1")
    instance_id = ready_instance(harness)
    assert harness.tick(119).kinds() == []  # 119 s idle < 120 s keep-alive
    report = harness.tick(2)
    assert ("stop_idle", instance_id) in report.kinds()
    assert harness.agents.stopped == [("http://n1:9000", instance_id)]
    assert harness.registry.instances() == []


def test_traffic_keeps_an_instance_alive(harness):
    harness.deploy("m", keep_alive_seconds=120)
    harness.register("n1")
    ready_instance(harness)
    for _ in range(3):
        harness.clock.advance(100)
        assert harness.controller.route("m").status == "ready"  # each request resets last_used
        harness.heartbeat("n1")
        assert harness.tick().kinds() == []
    assert len(harness.registry.instances()) == 1


def test_min_instances_are_started_and_never_scaled_away(harness):
    harness.deploy("m", min_instances=1, keep_alive_seconds=10)
    harness.register("n1")
    report = harness.tick()
    assert [kind for kind, _ in report.kinds()] == ["start_min"]
    harness.heartbeat("n1", tier="dram")
    assert harness.tick(3600).kinds() == []
    assert len(harness.registry.instances()) == 1


def test_default_keep_alive_applies_when_the_model_has_none(make_harness):
    h = make_harness(keep_alive_seconds=50)
    h.deploy("m")
    h.register("n1")
    ready_instance(h)
    assert [k for k, _ in h.tick(51).kinds()] == ["stop_idle"]


def test_silent_node_is_lost_and_its_instances_forgotten(harness):
    harness.deploy("m")
    harness.register("n1")
    ready_instance(harness)
    timeout = harness.config.controller.node_timeout_seconds
    assert harness.tick(timeout - 1, heartbeats=False).kinds() == []
    report = harness.tick(2, heartbeats=False)
    assert ("node_lost", "n1") in report.kinds()
    assert harness.registry.get_node("n1").state == "lost"
    assert harness.registry.instances() == []


def test_demand_without_capacity_becomes_an_allocation_that_serves_it(harness):
    harness.deploy("m", gpus=1, size_bytes=4 * GB)
    outcome = harness.controller.route("m")
    assert outcome.status == "allocating"
    job_id = outcome.job_id

    harness.backend.start(job_id, "n2", harness.clock.now + 20, walltime=3600)
    report = harness.tick(20)
    assert ("allocation_running", job_id) in report.kinds()
    alloc = harness.registry.get_allocation(job_id)
    assert alloc.state == "running" and alloc.nodes == ["n2"]
    assert alloc.walltime_end == harness.clock.now + 3600
    assert alloc.retire_at == alloc.walltime_end - harness.config.controller.retire_lead_seconds

    harness.register("n2", job=job_id)  # the agent inside the allocation registers
    report = harness.tick(1)
    assert [k for k, _ in report.kinds()] == ["start_for_demand"]  # the waiting model is started at once
    assert harness.agents.started == [("http://n2:9000", "m", [0])]
    harness.heartbeat("n2", tier="sharedfs")
    assert harness.controller.route("m").status == "ready"
    report = harness.tick(1)  # the served demand is forgotten: nothing more is started for it
    assert not [k for k, _ in report.kinds() if k == "start_for_demand"]
    assert harness.registry.demand() == {}


def test_slurm_is_polled_once_per_tick_for_all_allocations(harness):
    harness.deploy("a")
    harness.deploy("b")
    jobs = [harness.controller.route(name).job_id for name in ("a", "b")]
    harness.backend.calls.clear()
    harness.tick(5)
    assert [arg for call, arg in harness.backend.calls if call == "statuses"] == [tuple(jobs)]


def test_allocations_started_together_retire_staggered(make_harness):
    h = make_harness(retire_lead_seconds=300, retire_stagger_seconds=60, max_allocations=3)
    for name in ("a", "b", "c"):
        h.deploy(name)
    jobs = [h.controller.route(name).job_id for name in ("a", "b", "c")]
    for i, job in enumerate(jobs):
        h.backend.start(job, f"n{i + 1}", h.clock.now, walltime=3600)
    h.tick(1)
    retire = sorted(h.registry.get_allocation(j).retire_at for j in jobs)
    end = h.clock.now - 1 + 3600
    # 300 s before the end, then 60 s apart: the three pools leave one by one.
    assert retire == [end - 420, end - 360, end - 300]


def test_a_retirement_moves_only_as_early_as_the_stagger_needs(make_harness):
    h = make_harness(retire_lead_seconds=300, retire_stagger_seconds=60, max_allocations=3)
    for name in ("a", "b", "c"):
        h.deploy(name)
    a, b = (h.controller.route(name).job_id for name in ("a", "b"))
    h.backend.start(a, "n1", h.clock.now, walltime=3600)
    h.backend.start(b, "n2", h.clock.now, walltime=3570)  # its walltime ends 30 s before a's
    h.tick(1)
    end = h.clock.now - 1 + 3600
    assert [h.registry.get_allocation(j).retire_at for j in (a, b)] == [end - 300, end - 360]
    c = h.controller.route("c").job_id
    h.backend.start(c, "n3", h.clock.now - 1, walltime=3600)
    h.tick(1)
    # end - 300 and end - 360 are taken; end - 420 is the latest time 60 s from both (not end - 480).
    assert h.registry.get_allocation(c).retire_at == end - 420


def test_a_retirement_is_never_staggered_to_before_its_allocation_started(make_harness):
    """Two short allocations ending together: the second's staggered time would be before its start (it would retire
    as it started and its model's demand submit another); it retires at its own ideal time, beside the first."""
    h = make_harness(retire_lead_seconds=300, retire_stagger_seconds=60, max_allocations=2)
    for name in ("a", "b"):
        h.deploy(name)
    a, b = (h.controller.route(name).job_id for name in ("a", "b"))
    h.backend.start(a, "n1", h.clock.now, walltime=340)
    h.backend.start(b, "n2", h.clock.now, walltime=340)
    h.tick(1)
    start, end = h.clock.now - 1, h.clock.now - 1 + 340
    assert sorted(h.registry.get_allocation(j).retire_at for j in (a, b)) == [end - 300, end - 300]
    assert end - 300 > start


def test_idle_allocation_is_released_after_its_keep_alive(make_harness):
    h = make_harness(allocation_keep_alive_seconds=600, keep_alive_seconds=60)
    h.deploy("m")
    job = h.controller.route("m").job_id
    h.backend.start(job, "n1", h.clock.now, walltime=7200)
    h.tick()
    h.register("n1", job=job)
    h.tick()
    h.heartbeat("n1", tier="sharedfs")
    h.tick(61)  # the instance scales to zero after 60 s idle: the allocation is empty from now
    h.heartbeat("n1")
    assert h.registry.instances() == []
    assert h.tick(599).kinds() == []
    report = h.tick(1)
    assert ("cancel_idle_allocation", job) in report.kinds()
    assert h.backend.jobs[job].state == JobState.CANCELLED
    assert h.registry.get_allocation(job).state == "cancelling"
    h.tick(1)
    assert h.registry.get_allocation(job).state == "ended"


def test_job_ending_in_slurm_takes_its_node_but_keeps_persistent_cache(harness):
    harness.deploy("m")
    job = harness.controller.route("m").job_id
    harness.backend.start(job, "n1", harness.clock.now)
    harness.tick()
    harness.register("n1", job=job, cached=(("m", "nvme"), ("m", "dram")))
    harness.tick()
    harness.heartbeat("n1", tier="nvme")
    harness.backend.finish(job, JobState.TIMEOUT)
    report = harness.tick(1)
    assert ("allocation_ended", job) in report.kinds()
    assert harness.registry.get_allocation(job).reason == "timeout"
    assert harness.registry.get_node("n1").state == "gone"
    assert harness.registry.instances() == []
    assert [(c.node_id, c.tier) for c in harness.registry.cache()] == [("n1", "nvme")]


def test_requeued_job_goes_back_to_pending(harness):
    harness.deploy("m")
    job = harness.controller.route("m").job_id
    harness.backend.start(job, "n1", harness.clock.now)
    harness.tick()
    harness.register("n1", job=job)
    harness.backend.jobs[job].state = JobState.PENDING  # preempted and requeued: same id, queued again
    report = harness.tick(1)
    assert ("allocation_pending", job) in report.kinds()
    alloc = harness.registry.get_allocation(job)
    assert (alloc.state, alloc.nodes, alloc.reason) == ("pending", [], "requeued")
    assert harness.registry.get_node("n1").state == "gone"


def test_slurm_down_does_not_stop_the_other_steps(harness):
    harness.deploy("m", keep_alive_seconds=10)
    harness.controller.route("m")  # an allocation, so there is something to poll
    harness.register("n1")
    harness.registry.clear_demand("m")
    instance_id = harness.controller.start_instance(harness.registry.get_model("m")).instance_id
    harness.heartbeat("n1", tier="dram")
    harness.backend.down = True
    report = harness.tick(11)
    assert any("cannot poll Slurm" in e for e in report.errors)
    assert ("stop_idle", instance_id) in report.kinds()


def test_unconfirmed_reservation_is_dropped(harness):
    harness.registry.reserve_instance("m", "n1", [0], harness.clock.now, None)
    assert harness.tick(RESERVATION_TIMEOUT_SECONDS - 1).kinds() == []
    assert [k for k, _ in harness.tick(2).kinds()] == ["drop_reservation"]
    assert harness.registry.instances() == []


def test_instances_of_undeployed_models_are_stopped(harness):
    harness.deploy("m")
    harness.register("n1")
    harness.controller.route("m")
    # The agent also runs an instance of a model that is not (or no longer) deployed.
    harness.agents.start_instance("http://n1:9000", "old", "/models/old", [1])
    harness.heartbeat("n1", tier="dram")
    report = harness.tick(1)
    orphans = [subject for kind, subject in report.kinds() if kind == "stop_orphan"]
    assert len(orphans) == 1 and harness.registry.get_instance(orphans[0]).model == "old"


def test_an_undeploy_during_a_start_stops_the_instance_once_its_start_is_confirmed(harness, monkeypatch):
    """The model is undeployed while its agent is starting an instance (only a reservation to remove, nothing for
    its agent to stop yet): the start's confirmation stops the instance at once, and the request that started it
    is told the model is gone, not "starting" until the next heartbeat and tick stop the orphan."""
    harness.deploy("m")
    harness.register("n1")
    start, started = harness.agents.start_instance, []

    def start_during_an_undeploy(*args, **kwargs):
        instance = start(*args, **kwargs)
        started.append(instance.instance_id)
        harness.controller.undeploy("m")
        return instance

    monkeypatch.setattr(harness.agents, "start_instance", start_during_an_undeploy)
    with pytest.raises(UnknownModel, match="undeployed"):
        harness.controller.route("m")
    assert harness.agents.stopped == [("http://n1:9000", started[0])]
    harness.heartbeat("n1")
    assert harness.registry.instances() == []


def test_an_undeploy_and_redeploy_during_a_start_stops_the_instance_of_the_old_deployment(harness, monkeypatch):
    """The model is undeployed and deployed again (another context length) while its agent starts an instance of
    the old deployment: the start's confirmation finds its reservation gone and stops that instance, the request
    is told to retry, and the next request starts an instance of the new deployment (not the old one adopted)."""
    harness.deploy("m")
    harness.register("n1")
    start, started = harness.agents.start_instance, []

    def start_during_a_redeploy(*args, **kwargs):
        instance = start(*args, **kwargs)
        started.append(instance.instance_id)
        harness.controller.undeploy("m")
        harness.deploy("m", max_model_len=1024)
        return instance

    monkeypatch.setattr(harness.agents, "start_instance", start_during_a_redeploy)
    outcome = harness.controller.route("m")
    monkeypatch.setattr(harness.agents, "start_instance", start)
    assert (outcome.status, outcome.instance_id) == ("starting", None)
    assert harness.agents.stopped == [("http://n1:9000", started[0])]
    harness.heartbeat("n1")
    assert harness.registry.get_instance(started[0]) is None
    again = harness.controller.route("m")
    assert again.status == "starting" and again.instance_id not in (None, started[0])
    assert harness.agents.max_model_lens[-1] == 1024


def test_max_allocations_is_honoured(make_harness):
    h = make_harness(max_allocations=1)
    h.deploy("a")
    h.deploy("b")
    assert h.controller.route("a").status == "allocating"
    with pytest.raises(Exception, match="max_allocations"):
        h.controller.route("b")
    assert len(h.backend.submitted()) == 1


def test_allocation_stuck_on_its_preferred_node_is_resubmitted_for_any_node(make_harness):
    h = make_harness(preferred_node_wait_seconds=120)
    h.deploy("m")
    h.register("n3", cached=(("m", "nvme"),), job="1")
    h.registry.node_left("n3", "gone")  # n3 holds m on persistent NVMe
    first = h.controller.route("m").job_id
    assert h.backend.jobs[first].spec.nodelist == ("n3",)
    assert h.tick(119).kinds() == []  # still queued, within the wait
    report = h.tick(2)
    assert ("cancel_stuck_allocation", first) in report.kinds()
    [(_, second)] = [k for k in report.kinds() if k[0] == "resubmit_allocation"]
    assert h.backend.jobs[first].state == JobState.CANCELLED
    assert h.backend.jobs[second].spec.nodelist == ("n1",)  # another idle node: Slurm's first, not n3 again
    # sinfo still shows n3 idle, but the controller does not ask for it by name again for a while.
    assert "n3" not in h.allocator.idle_nodes(h.registry.get_model("m"))


def test_an_allocation_for_any_node_asks_for_an_idle_node_where_no_agent_of_ours_runs(make_harness):
    """Slurm packs small jobs onto one node, and agents are known by their node's name: the dev cluster put both
    allocations of a CPU model on n1, where the second agent took over the first one's registration."""
    h = make_harness(cpu_slots_per_node=1)
    h.deploy("m", gpus=0, min_instances=2, max_instances=2, keep_alive_seconds=3600)
    assert ("start_min", "m") in h.tick().kinds()
    [first] = [a.job_id for a in h.registry.allocations()]
    assert h.backend.jobs[first].spec.nodelist == ("n1",)  # nothing of ours runs anywhere yet: Slurm's first
    h.backend.start(first, "n1", h.clock.now)
    h.tick()
    h.register("n1", gpus=0, job=first)
    h.deploy("other", gpus=0)
    h.register("n4", gpus=0)  # a user's own pool, outside any allocation of ours, its only CPU slot taken
    h.agents.start_instance("http://n4:9000", "other", "/x", [])
    h.tick()  # the first instance starts on n1
    h.heartbeat("n1", tier="sharedfs")
    report = h.tick()  # the second needs a new allocation: n1 is full
    [second] = [a.job_id for a in h.registry.allocations() if a.job_id != first]
    assert ("start_min", "m") in report.kinds()
    spec = h.backend.jobs[second].spec
    assert spec.nodelist == ("n2",) and spec.exclude == (), spec


def test_with_no_other_idle_node_listed_the_allocation_excludes_the_nodes_our_agents_run_on(make_harness):
    h = make_harness(cpu_slots_per_node=1)
    h.backend.node_infos = [NodeInfo(name="n1", state="IDLE", partitions=("debug",)),
                            NodeInfo(name="n2", state="ALLOCATED", partitions=("debug",)),
                            NodeInfo(name="n3", state="IDLE", state_flags=("DRAIN",), partitions=("debug",))]
    h.deploy("m", gpus=0, min_instances=2, max_instances=2, keep_alive_seconds=3600)
    h.register("n1", gpus=0)  # a user's own agent, its only CPU slot taken
    h.deploy("other", gpus=0)
    h.agents.start_instance("http://n1:9000", "other", "/x", [])
    assert ("start_min", "m") in h.tick().kinds()
    [alloc] = h.registry.allocations()
    spec = h.backend.jobs[alloc.job_id].spec
    assert spec.nodelist == () and spec.exclude == ("n1",), spec  # queued for whatever node frees up first
    assert alloc.preferred_nodes == []


def test_old_history_is_pruned(make_harness):
    h = make_harness(history_seconds=3600)
    h.deploy("m")
    job = h.controller.route("m").job_id
    h.backend.finish(job, JobState.FAILED)
    h.tick(1)
    assert h.registry.get_allocation(job).state == "ended"
    h.tick(3599)
    assert h.registry.get_allocation(job) is not None
    assert ("prune_history", "registry") in h.tick(2).kinds()
    assert h.registry.get_allocation(job) is None


def test_an_instance_on_a_draining_node_does_not_count_towards_min_instances(harness):
    """min_instances = 1 with one instance on a node whose agent got Slurm's signal (draining: it exits soon) and
    an idle one on an up node: the up node's is the one that keeps the model warm, not stopped as idle (then
    started again cold by the same tick's min_instances)."""
    harness.deploy("m", min_instances=1, max_instances=2, keep_alive_seconds=10)
    harness.register("n1")
    first = ready_instance(harness, node="n1")
    harness.register("n2")
    harness.controller.start_instance(harness.registry.get_model("m"), exclude_nodes=frozenset({"n1"}))
    harness.heartbeat("n2", tier="dram")
    harness.controller.heartbeat("n2", Heartbeat(instances=harness.agents.list_instances("http://n2:9000"),
                                                 draining=True))
    assert harness.registry.get_node("n2").state == "draining"
    report = harness.tick(60)
    assert ("stop_idle", first) not in report.kinds()
    assert not [k for k, _ in report.kinds() if k in ("start_min", "start_for_demand")]
    assert first in {i.instance_id for i in harness.registry.instances()}


def test_a_heartbeat_sent_before_a_start_does_not_forget_the_instance_just_started(harness):
    """The agent's heartbeat built just before it took a start arrives after the controller confirmed that start:
    the new instance is missing from it. It is not forgotten (the model's next request started a second cold
    start beside it); a heartbeat a heartbeat period later that still lacks it does drop it."""
    harness.deploy("m")
    harness.register("n1")
    started = harness.controller.route("m").instance_id
    harness.controller.heartbeat("n1", Heartbeat(instances=[]))  # the stale report
    again = harness.controller.route("m")
    assert (again.status, again.instance_id) == ("starting", started)
    assert len(harness.agents.started) == 1
    harness.clock.advance(harness.config.node.heartbeat_seconds + 1)
    harness.controller.heartbeat("n1", Heartbeat(instances=[]))
    assert harness.registry.instances() == []


def test_a_start_call_longer_than_a_heartbeat_period_does_not_lose_the_instance(harness, monkeypatch):
    """The agent takes longer than node.heartbeat_seconds to answer a start (a busy node); the heartbeat it built
    before taking the start arrives just after the confirmation. The stale window counts from the confirmation, not
    from the reservation: the instance is kept, and the next request waits for it instead of starting a second."""
    harness.deploy("m")
    harness.register("n1")
    start = harness.agents.start_instance

    def slow_start(*args, **kwargs):
        harness.clock.advance(harness.config.node.heartbeat_seconds + 5)
        return start(*args, **kwargs)

    monkeypatch.setattr(harness.agents, "start_instance", slow_start)
    started = harness.controller.route("m").instance_id
    harness.controller.heartbeat("n1", Heartbeat(instances=[]))  # built before the agent took the start
    again = harness.controller.route("m")
    assert (again.status, again.instance_id) == ("starting", started)
    assert len(harness.agents.started) == 1


def test_a_heartbeat_handled_as_a_start_is_confirmed_does_not_forget_the_instance(harness, monkeypatch):
    """A heartbeat built before the agent took a start is handled just as the controller confirms that start (the
    reservation already renamed to the agent's instance id): the new instance is kept, and the next request waits
    for it instead of starting a second one."""
    harness.deploy("m")
    harness.register("n1")
    confirm = harness.registry.confirm_instance

    def confirm_then_a_stale_heartbeat(*args, **kwargs):
        confirmed = confirm(*args, **kwargs)
        harness.controller.heartbeat("n1", Heartbeat(instances=[]))  # built before the agent took the start
        return confirmed

    monkeypatch.setattr(harness.registry, "confirm_instance", confirm_then_a_stale_heartbeat)
    started = harness.controller.route("m").instance_id
    again = harness.controller.route("m")
    assert (again.status, again.instance_id) == ("starting", started)
    assert len(harness.agents.started) == 1


def test_a_heartbeat_waiting_on_the_registry_while_a_start_is_confirmed_does_not_forget_the_instance(harness,
                                                                                                     monkeypatch):
    """A heartbeat built before the agent took a start passes the controller before the start is confirmed and
    reaches the registry after: the new instance is kept (the confirmation is checked in the registry's
    transaction), and the next request waits for it instead of starting a second one."""
    harness.deploy("m")
    harness.register("n1")
    heartbeat, routes = harness.registry.heartbeat, []

    def a_start_first(*args, **kwargs):  # the start takes the registry before the heartbeat does
        routes.append(harness.controller.route("m"))
        return heartbeat(*args, **kwargs)

    monkeypatch.setattr(harness.registry, "heartbeat", a_start_first)
    harness.controller.heartbeat("n1", Heartbeat(instances=[]))
    monkeypatch.setattr(harness.registry, "heartbeat", heartbeat)
    again = harness.controller.route("m")
    assert (again.status, again.instance_id) == ("starting", routes[0].instance_id)
    assert len(harness.agents.started) == 1


def test_a_heartbeat_built_before_a_stop_does_not_bring_the_stopped_instance_back(harness):
    """The agent's heartbeat built just before the controller stopped an idle instance arrives after the stop: it
    still lists the instance as ready. The instance stays gone (no route to a dead worker, no second cold start
    recorded), and the next request starts a new one."""
    harness.deploy("m", keep_alive_seconds=60)
    harness.register("n1")
    stopped = ready_instance(harness)
    stale = Heartbeat(instances=harness.agents.list_instances("http://n1:9000"))
    assert ("stop_idle", stopped) in harness.tick(61).kinds()
    harness.controller.heartbeat("n1", stale)
    assert harness.registry.instances() == []
    assert [c.instance_id for c in harness.registry.cold_starts()] == [stopped]
    assert harness.controller.route("m").status == "starting"
    assert len(harness.agents.started) == 2


def test_a_heartbeat_waiting_on_the_registry_while_an_instance_is_stopped_does_not_bring_it_back(harness,
                                                                                                 monkeypatch):
    """A heartbeat built before an idle stop is handled while the tick stops the instance: it passes the
    controller before the stop is recorded and reaches the registry after the instance was removed. The instance
    stays gone (the stop is checked in the registry's transaction), and the next request starts a new one."""
    harness.deploy("m", keep_alive_seconds=60)
    harness.register("n1")
    stopped = ready_instance(harness)
    harness.clock.advance(61)
    harness.heartbeat("n1")
    stale = Heartbeat(instances=harness.agents.list_instances("http://n1:9000"))
    heartbeat, ticks = harness.registry.heartbeat, []

    def a_tick_first(*args, **kwargs):  # the tick takes the registry before the heartbeat does
        ticks.append(harness.autoscaler.tick(harness.clock.now))
        return heartbeat(*args, **kwargs)

    monkeypatch.setattr(harness.registry, "heartbeat", a_tick_first)
    harness.controller.heartbeat("n1", stale)
    monkeypatch.setattr(harness.registry, "heartbeat", heartbeat)
    assert ("stop_idle", stopped) in ticks[0].kinds()
    assert harness.registry.instances() == []
    assert harness.controller.route("m").status == "starting"
    assert len(harness.agents.started) == 2


def reported_again(instance_id: str, node: str = "n1") -> Heartbeat:
    """A heartbeat listing a ready instance of that id (a new one, or a stale report of a stopped one)."""
    return Heartbeat(instances=[InstanceInfo(instance_id=instance_id, model="m", state="ready", gpu_ids=[0],
                                             worker_url=f"http://{node}:9000/workers/{instance_id}")])


def test_an_instance_id_a_restarted_agent_reuses_is_not_taken_for_the_stopped_instance(harness):
    """The agent restarts (registers again) and numbers its instances afresh (as the controller's HTTP test agent
    does): its new instance has the id of one the controller stopped on that node a moment before. It is adopted,
    not dropped as a stale report of the stopped one."""
    harness.deploy("m", keep_alive_seconds=60)
    harness.register("n1")
    stopped = ready_instance(harness)
    assert ("stop_idle", stopped) in harness.tick(61).kinds()
    harness.register("n1")
    harness.controller.heartbeat("n1", reported_again(stopped))
    assert harness.registry.get_instance(stopped).state == "ready"


def test_a_late_heartbeat_of_the_agent_process_before_a_restart_changes_nothing(harness):
    """The agent restarts (its instances died with it) and registers again; a heartbeat the old process sent just
    before it died arrives after that registration. It listed the old instance ready: it was taken as the node's
    (routes to a dead worker) until the new process's first heartbeat. Now it is refused and changes nothing."""
    from hpcllm.controller.errors import AgentReplaced
    from hpcllm.controller.tests.doubles import FakeNodeAgent

    old_process, new_process = "a" * 32, "b" * 32
    harness.deploy("m")
    harness.register("n1", agent_process=old_process)
    dead = ready_instance(harness)
    late_report = Heartbeat(instances=harness.agents.list_instances("http://n1:9000"),
                            instances_version=harness.agents.instances_version("http://n1:9000"),
                            agent_process=old_process)
    harness.agents.agents["http://n1:9000"] = FakeNodeAgent("http://n1:9000")  # a new process, without workers
    harness.register("n1", agent_process=new_process)
    with pytest.raises(AgentReplaced, match="served by another agent process"):
        harness.controller.heartbeat("n1", late_report)
    assert harness.registry.instances(node_id="n1") == []
    assert harness.controller.route("m").instance_id != dead  # a new start, not the dead worker
    harness.heartbeat("n1")  # the new process's heartbeats count
    assert harness.registry.get_node("n1").state == "up"


def test_the_earlier_agent_process_of_a_lost_node_is_told_to_register_again(harness):
    """Two agent processes on one node (two `hpcllm node` in one job): the second registered, then died; the node
    was declared lost. The first, still alive with its instances, was answered 409 agent_replaced (which it is not
    told to fix) where a lost node's heartbeat gets 404 (register again): it never registered and its instances
    went unused. Now it gets 404, registers again and serves."""
    from hpcllm.controller.errors import UnknownNode
    from hpcllm.controller.tests.doubles import FakeNodeAgent

    first, second = "a" * 32, "b" * 32
    harness.deploy("m")
    harness.register("n1", agent_process=first)
    serving = ready_instance(harness)
    first_agent = harness.agents.agents["http://n1:9000"]
    harness.agents.agents["http://n1:9000"] = FakeNodeAgent("http://n1:9000")
    harness.register("n1", agent_process=second)  # then it dies: no heartbeat of it comes
    harness.agents.agents["http://n1:9000"] = first_agent
    harness.agent_processes["n1"] = first
    harness.tick(harness.config.controller.node_timeout_seconds + 1, heartbeats=False)
    assert harness.registry.get_node("n1").state == "lost"
    with pytest.raises(UnknownNode, match="register again"):
        harness.heartbeat("n1")
    harness.register("n1", agent_process=first)
    harness.heartbeat("n1")
    assert harness.controller.route("m").instance_id == serving


def test_a_stop_is_remembered_only_while_a_heartbeat_built_before_it_may_arrive(harness):
    """A stopped instance's id is not refused for ever: two heartbeat periods and 30 s after the stop no heartbeat
    built before it is on its way, and an instance reported with that id is taken as what it is."""
    harness.deploy("m", keep_alive_seconds=60)
    harness.register("n1")
    stopped = ready_instance(harness)
    assert ("stop_idle", stopped) in harness.tick(61).kinds()
    harness.clock.advance(2 * harness.config.node.heartbeat_seconds + 29)
    harness.controller.heartbeat("n1", reported_again(stopped))
    assert harness.registry.get_instance(stopped) is None  # within the window: a stale report
    harness.clock.advance(2)
    harness.controller.heartbeat("n1", reported_again(stopped))
    assert harness.registry.get_instance(stopped).state == "ready"


def agents_report(harness, node: str = "n1") -> Heartbeat:
    """The heartbeat the node's agent builds now: its instances, with its instance-list version."""
    url = f"http://{node}:9000"
    return Heartbeat(instances=harness.agents.list_instances(url),
                     instances_version=harness.agents.instances_version(url))


def late(harness) -> float:
    """Longer than any window of time that tells a stale heartbeat (a report held up: a congested network, a paused
    VM): two heartbeat periods and STALE_REPORT_MARGIN_SECONDS, and a minute more."""
    return 2 * harness.config.node.heartbeat_seconds + STALE_REPORT_MARGIN_SECONDS + 60


def test_a_heartbeat_built_before_a_start_and_held_up_past_every_window_does_not_forget_the_instance(harness):
    """The agent's heartbeat built just before it took a start arrives long after the controller confirmed that
    start: its instance-list version is older than the start's, so the new instance is kept (not forgotten while
    its worker loads), and the next request waits for it instead of starting a second one beside it."""
    harness.deploy("m")
    harness.register("n1")
    stale = agents_report(harness)
    started = harness.controller.route("m").instance_id
    harness.clock.advance(late(harness))
    harness.controller.heartbeat("n1", stale)
    again = harness.controller.route("m")
    assert (again.status, again.instance_id) == ("starting", started)
    assert len(harness.agents.started) == 1
    harness.controller.heartbeat("n1", agents_report(harness))
    assert [i.instance_id for i in harness.registry.instances()] == [started]


def test_a_heartbeat_built_before_a_stop_and_held_up_past_every_window_does_not_bring_the_instance_back(harness):
    """The agent's heartbeat built just before the controller stopped an idle instance arrives long after the stop,
    listing it ready: its instance-list version is older than the stop's, so the instance stays gone (no route to a
    dead worker) and the next request starts a new one."""
    harness.deploy("m", keep_alive_seconds=60)
    harness.register("n1")
    stopped = ready_instance(harness)
    stale = agents_report(harness)
    assert ("stop_idle", stopped) in harness.tick(61).kinds()
    harness.clock.advance(late(harness))
    harness.controller.heartbeat("n1", stale)
    assert harness.registry.instances() == []
    assert harness.controller.route("m").status == "starting"
    assert len(harness.agents.started) == 2


def test_a_heartbeat_built_before_a_migration_and_held_up_does_not_bring_the_moved_instance_back(harness,
                                                                                                monkeypatch):
    """An instance moved off its node (the agent's migrate-out stops it) is not brought back by a heartbeat built
    before the move that arrives late: the controller reads the agent's instance-list version after the move."""
    from hpcllm.controller.tests.test_migration import MigratingAgents

    harness.agents = harness.controller.agents = MigratingAgents()
    harness.deploy("m", max_instances=2)
    harness.register("n1")
    harness.register("n2")
    moved = ready_instance(harness)
    node = harness.registry.get_instance(moved).node_id
    other = "n2" if node == "n1" else "n1"
    harness.controller.start_instance(harness.registry.get_model("m"), exclude_nodes=frozenset({node}))
    harness.heartbeat(other, tier="nvme")
    stale = agents_report(harness, node)
    record = harness.controller.move_instance(harness.registry.get_node(node), harness.registry.get_instance(moved),
                                              trigger="placement")
    assert record.outcome == "migrated"
    harness.heartbeat(node)
    harness.clock.advance(late(harness))
    harness.controller.heartbeat(node, stale)
    assert harness.registry.get_instance(moved) is None


def test_a_late_heartbeat_of_the_agents_previous_process_does_not_forget_an_instance_its_new_process_starts(harness):
    """The node's agent stopped its instances (it drained) and its last heartbeat, held up, arrives after the agent
    restarted, registered again and took a new start: the old process's report is older than that start (a new
    process counts its versions on from the clock), so the loading instance is kept and the next request waits for
    it instead of starting a second one beside it."""
    harness.deploy("m")
    harness.register("n1")
    url = "http://n1:9000"
    ready_instance(harness)
    old = harness.agents.agents[url]
    for instance_id in list(old.instances):
        old.remove(instance_id)  # stopped by the agent itself: its version counts on
    stale = agents_report(harness)
    harness.agents.restart(url)
    harness.register("n1")
    started = harness.controller.route("m").instance_id
    harness.controller.heartbeat("n1", stale)
    again = harness.controller.route("m")
    assert (again.status, again.instance_id) == ("starting", started)
    assert len(harness.agents.started) == 2  # the old process's instance, and the new one's: no third


def test_a_late_heartbeat_of_the_agents_previous_process_does_not_silence_a_new_process_that_counts_lower(harness):
    """The agent restarts with versions below its old process's (an agent counting from 0 during a rolling upgrade,
    a clock stepped back) and the old process's last heartbeat, held up, arrives after it registered: the new
    process's heartbeats are not taken as overtaken for ever: once that late report is older than the window a
    held-up heartbeat is told in, they are the newest again: the old instance is gone and a new start gets ready."""
    harness.deploy("m")
    harness.register("n1")
    url = "http://n1:9000"
    old_instance = ready_instance(harness)
    stale = agents_report(harness)
    harness.agents.restart(url, version=0)
    harness.register("n1")
    harness.controller.heartbeat("n1", stale)
    harness.tick(late(harness))
    assert harness.registry.get_instance(old_instance) is None
    started = harness.controller.route("m")
    assert started.status == "starting"
    harness.heartbeat("n1", tier="nvme")
    ready = harness.controller.route("m")
    assert (ready.status, ready.instance_id) == ("ready", started.instance_id)


def test_a_heartbeat_overtaken_by_a_later_one_does_not_bring_back_an_instance_the_agent_stopped_itself(harness):
    """The agent stops an instance by itself (it drains; a model pool's agent stops its failed instance) and
    reports the list without it; a heartbeat it built before, held up, arrives after that one: its older version
    does not bring the stopped instance back (no route to a dead worker)."""
    harness.deploy("m")
    harness.register("n1")
    stopped = ready_instance(harness)
    stale = agents_report(harness)
    harness.agents.agents["http://n1:9000"].remove(stopped)
    harness.heartbeat("n1")
    harness.controller.heartbeat("n1", stale)
    assert harness.registry.get_instance(stopped) is None
    assert harness.controller.route("m").status == "starting"


def test_a_heartbeat_overtaken_by_a_later_one_does_not_turn_a_failed_instance_back_to_ready(harness):
    """A heartbeat listing the instance ready, held up, arrives after the one that reported its worker failed: the
    failure stands (the state change has a version of its own), nothing routes to the dead worker."""
    harness.deploy("m")
    harness.register("n1")
    failed = ready_instance(harness)
    stale = agents_report(harness)
    harness.agents.agents["http://n1:9000"].update(failed, state="failed", error="worker exited with status 1")
    harness.heartbeat("n1")
    harness.controller.heartbeat("n1", stale)
    assert harness.registry.get_instance(failed) is None
    assert harness.controller.route("m").status == "starting"


def test_an_instance_reported_after_its_stop_by_the_agents_version_is_taken_as_what_it_is(harness):
    """A stop is not held against a report the agent built after it (its version is the stop's or newer): an
    instance of that id it lists then is taken as what it is, at once, with no time window to wait out."""
    harness.deploy("m", keep_alive_seconds=60)
    harness.register("n1")
    stopped = ready_instance(harness)
    assert ("stop_idle", stopped) in harness.tick(61).kinds()
    after = reported_again(stopped).model_copy(update={"instances_version": harness.agents.instances_version(
        "http://n1:9000")})
    harness.controller.heartbeat("n1", after)
    assert harness.registry.get_instance(stopped).state == "ready"


def test_an_instance_whose_load_outlasted_the_keep_alive_is_not_stopped_as_it_becomes_ready(harness):
    """A cold start longer than the model's keep-alive (a large model from the shared FS): its idle time counts from
    when it became ready, not from its start, or the tick after its first ready heartbeat stopped it before the
    request that started it (polling the route) could reach it."""
    harness.deploy("m", keep_alive_seconds=60)
    harness.register("n1")
    started = harness.controller.route("m").instance_id
    harness.clock.advance(120)  # loading
    harness.heartbeat("n1", tier="sharedfs")
    assert ("stop_idle", started) not in harness.tick(heartbeats=False).kinds()
    assert harness.controller.route("m").instance_id == started
    assert ("stop_idle", started) in harness.tick(61).kinds()  # idle from then on, it goes as before
