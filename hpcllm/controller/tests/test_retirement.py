"""Retirement before the walltime, make before break (autoscaler step 5): from retire_at the allocation serves on
while a replacement of each of its models starts elsewhere; it drains (its requests live-migrate into the
replacement) once the replacement is ready, or at the drain deadline without one (its requests resume from tokens).
Fake clock, in-memory Slurm and node agents (doubles.py)."""

from __future__ import annotations

import pytest

from hpcllm.controller.cli import print_status
from hpcllm.controller.errors import InvalidModelConfig
from hpcllm.controller.tests.test_migration import metric, ready_instance, target, use_migrating_agents
from hpcllm.slurm.base import JobState

WALLTIME = 1000  # the allocation's; retire_lead_seconds = 300: it retires 700 s after it started


def retiring_cluster(make_harness, other_nodes=("n9",), cpu_slots_per_node=1, max_instances=1, **settings):
    """A model with one instance, on n1 in an allocation made for it (walltime 1000 s), running two requests;
    other_nodes registered and empty, outside the allocation. (harness, agents, job, old instance id)"""
    h = make_harness(retire_lead_seconds=300, drain_seconds=60, cpu_slots_per_node=cpu_slots_per_node, **settings)
    agents = use_migrating_agents(h)
    h.deploy("m", keep_alive_seconds=3600, max_instances=max_instances)
    job = h.controller.route("m").job_id
    h.backend.start(job, "n1", h.clock.now, walltime=WALLTIME)
    h.tick()
    h.register("n1", gpus=0, job=job)
    h.tick()  # the demand starts m on n1, the node allocated for it
    h.heartbeat("n1", tier="sharedfs")
    [old] = h.registry.instances()
    assert old.node_id == "n1"
    agent = agents.agents["http://n1:9000"]
    agent.instances[old.instance_id] = agent.instances[old.instance_id].model_copy(update={"running_requests": 2})
    for node in other_nodes:
        h.register(node, gpus=0)
    h.tick()
    return h, agents, job, old.instance_id


def test_a_single_instance_model_is_replaced_before_its_allocation_drains(make_harness, capsys):
    # Two CPU slots a node: n1 has room for one more instance, n9 for two.
    h, agents, job, old = retiring_cluster(make_harness, cpu_slots_per_node=2)
    h.deploy("b")
    client = h.app_client()

    report = h.tick(700 - h.clock.now + h.registry.get_allocation(job).started_at)  # retire_at
    # The replacement starts first, off the retiring node; the old instance serves on, nothing moves yet.
    assert report.kinds() == [("start_replacement", "m")], report
    assert h.agents.started[-1] == ("http://n9:9000", "m", [])
    assert agents.migrations == [] and h.agents.stopped == []
    assert h.registry.get_node("n1").state == "up"
    assert h.controller.route("m").instance_id == old  # still the only ready instance
    # The retiring allocation gets no new instance (n1's free slot would win the tie with n9's last one), and
    # `hpcllm status` shows the phase.
    assert h.controller.route("b").node_id == "n9"
    [alloc] = h.controller.status().allocations
    assert (alloc.state, alloc.phase) == ("running", "retiring, replacement starting")
    assert alloc.drain_deadline == alloc.walltime_end - h.config.slurm.signal_seconds - 60
    print_status(h.controller.status())
    shown = capsys.readouterr().out
    assert "running, retiring, replacement starting" in shown and "drains within 180 s" in shown, shown

    report = h.tick(5)  # still loading: one replacement at a time, no drain
    assert report.kinds() == []
    assert h.agents.started[-1] == ("http://n9:9000", "b", [])

    [replacement] = [i.instance_id for i in h.registry.instances(model="m") if i.node_id == "n9"]
    h.heartbeat("n9", tier="sharedfs")  # the replacement is ready
    report = h.tick(1)
    assert ("retire", job) in report.kinds()
    assert agents.migrations == [("http://n1:9000", old, f"http://n9:9000/workers/{replacement}")]
    assert metric(client, "hpcllm_controller_migrations_total", model_name="m", trigger="retire", outcome="migrated") == 1
    assert ("start_replacement", "m") not in report.kinds()  # the ready one is the replacement

    report = h.tick(1)  # empty: cancelled long before the walltime
    assert ("cancel_drained_allocation", job) in report.kinds()
    assert h.backend.jobs[job].state == JobState.CANCELLED
    report = h.tick(1)
    assert ("allocation_ended", job) in report.kinds()
    assert h.registry.get_node("n1").state == "gone"
    assert h.registry.get_allocation(job).reason == "walltime"


def test_the_replacement_may_be_a_new_allocation_the_retiring_one_is_never_asked_for(make_harness):
    h, agents, job, old = retiring_cluster(make_harness, other_nodes=(), max_allocations=2)

    report = h.tick(700 - h.clock.now + h.registry.get_allocation(job).started_at)
    [(kind, model)] = report.kinds()
    assert (kind, model) == ("start_replacement", "m") and "allocating" in report.actions[0].detail
    replacement_job = next(j for j in h.backend.jobs if j != job)
    assert "n1" not in (h.backend.jobs[replacement_job].spec.nodelist or ())
    assert h.tick(5).kinds() == []  # the allocation is on its way: nothing more is submitted
    assert len(h.backend.jobs) == 2

    h.backend.start(replacement_job, "n2", h.clock.now, walltime=WALLTIME)
    h.tick(1)
    h.register("n2", gpus=0, job=replacement_job)
    report = h.tick(1)
    assert ("start_replacement", "m") in report.kinds()
    assert h.agents.started[-1] == ("http://n2:9000", "m", [])
    h.heartbeat("n2", tier="sharedfs")
    report = h.tick(1)
    assert ("retire", job) in report.kinds()
    assert [m[:2] for m in agents.migrations] == [("http://n1:9000", old)]
    assert agents.migrations[0][2].startswith("http://n2:9000/workers/")


def test_without_a_replacement_the_allocation_drains_at_the_deadline(make_harness):
    # No other node and Slurm refuses: no replacement can start. It serves on until the drain deadline (the drain
    # must end before Slurm's own signal), then drains as before retirement waited: stop, resume from tokens.
    h, agents, job, old = retiring_cluster(make_harness, other_nodes=())
    h.backend.refuse_submit = "QOSMaxSubmitJobPerUserLimit"
    client = h.app_client()
    started = h.registry.get_allocation(job).started_at
    deadline = started + WALLTIME - h.config.slurm.signal_seconds - 60

    report = h.tick(started + 700 - h.clock.now)
    assert report.kinds() == [] and "QOSMaxSubmitJobPerUserLimit" in report.errors[0], report
    report = h.tick(deadline - 1 - h.clock.now)
    assert ("retire", job) not in report.kinds()
    assert h.registry.get_node("n1").state == "up" and h.agents.stopped == []

    report = h.tick(1)
    assert report.kinds()[:2] == [("retire_without_replacement", job), ("retire", job)], report
    assert "no ready instance of ['m']" in report.actions[0].detail
    assert h.agents.stopped == [("http://n1:9000", old)] and agents.migrations == []
    assert metric(client, "hpcllm_controller_migrations_total", model_name="m", trigger="retire", outcome="no_target") == 1
    assert h.registry.get_allocation(job).state == "draining"


def test_a_controller_restarted_between_the_phases_waits_for_the_same_replacement(make_harness):
    h, agents, job, old = retiring_cluster(make_harness)
    h.tick(700 - h.clock.now + h.registry.get_allocation(job).started_at)
    assert h.agents.started[-1] == ("http://n9:9000", "m", [])

    # The controller dies and starts again on the same database: the phase is derived from what the registry holds
    # (past retire_at, still running; the replacement loading on n9).
    h.restart_controller()
    assert h.tick(5).kinds() == []  # no second replacement, no drain
    assert len(h.agents.started) == 2

    h.heartbeat("n9", tier="sharedfs")
    report = h.tick(1)
    assert ("retire", job) in report.kinds()
    [replacement] = [i.instance_id for i in h.registry.instances(model="m") if i.node_id == "n9"]
    assert agents.migrations == [("http://n1:9000", old, f"http://n9:9000/workers/{replacement}")]


def test_a_retiring_instance_is_a_migration_target_only_when_there_is_no_other(make_harness):
    # n1 (retiring) runs m and k; m also runs on n9, busier than n1's; k has no other instance, so n1 stays in its
    # retiring phase while k's replacement loads on n8.
    h, agents, job, old = retiring_cluster(make_harness, other_nodes=(), cpu_slots_per_node=2, max_instances=2)
    h.deploy("k", keep_alive_seconds=3600)
    h.backend.down = True  # placement may only use the registered nodes
    h.controller.route("k")
    h.heartbeat("n1", tier="sharedfs")
    h.register("n9", gpus=0)
    busy = ready_instance(h, "n9", "m", running=3)
    h.register("n8", gpus=0)
    h.backend.down = False
    report = h.tick(700 - h.clock.now + h.registry.get_allocation(job).started_at)
    assert report.kinds() == [("start_replacement", "k")] and h.agents.started[-1][:2] == ("http://n8:9000", "k")

    # A node leaving (its agent's drain) asks where m's requests go: n9's instance, although n1's is less loaded.
    answer = target(h.app_client(), {"model": "m", "exclude_node": "n8"}).get_json()
    assert answer["instance_id"] == busy, answer
    # With no other, the retiring one still takes them (better than a resume).
    h.registry.set_instance_state(busy, "draining")
    assert target(h.app_client(), {"model": "m", "exclude_node": "n8"}).get_json()["instance_id"] == old


def test_a_walltime_no_longer_than_the_retire_lead_is_refused_at_deploy(make_harness):
    """An allocation retires retire_lead_seconds (300 s) before its walltime ends: a 4-minute allocation retired as
    it started, the model's demand submitted another, which retired as it started too. Deploy says what to change;
    a walltime longer than the lead deploys."""
    h = make_harness()
    with pytest.raises(InvalidModelConfig, match="retire_lead_seconds") as refused:
        h.deploy("short", slurm={"time": "00:04:00"})
    assert refused.value.param == "slurm.time"
    assert h.registry.get_model("short") is None
    h.deploy("long", slurm={"time": "00:10:00"})
    h.deploy("unlimited", slurm={"time": "0"})  # Slurm's no time limit: nothing retires
    h.controller.settings.retire_lead_seconds = 900  # raised after "long" was deployed with a 10-minute walltime
    h.deploy("long", slurm={"time": "00:10:00"}, min_instances=0)  # a redeploy keeping the walltime (a LoRA load)
    with pytest.raises(InvalidModelConfig, match="agent_start_seconds"):
        h.deploy("long", slurm={"time": "00:15:05"})  # a new walltime within the lead and the agent's start
    fixed_nodes = make_harness(allocate_on_demand=False)  # no allocation is ever made: nothing retires
    fixed_nodes.deploy("short", slurm={"time": "00:04:00"})
