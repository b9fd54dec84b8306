"""The autoscaler's counts of a model's instances (min_instances, demand, keep-alive) and a group's own pool.

A group's pool (registered with a pool token, not --shared) serves only that group's API keys (docs/security.md):
for everyone else the model has no instance there, so it neither keeps the model at its min_instances nor answers
the demand of a request that found no capacity.
"""

from __future__ import annotations

import pytest

from hpcllm.controller.errors import NoCapacity
from hpcllm.controller.protocol import NodeRegistration, PoolTokenRequest
from hpcllm.controller.tests.test_distinct_nodes import agent_up
from hpcllm.controller.tests.test_migration import ready_instance, use_migrating_agents
from hpcllm.controller.tests.test_pools import group_pool, ordinary_instance, pool_instance


def physics_pool(h, model: str) -> None:
    """A pool of `model` on pool1 registered with a physics pool token (slurm/model-pool.sbatch), its instance ready."""
    token = h.controller.issue_pool_token(PoolTokenRequest(model=model, group="physics")).token
    h.backend.run_job("71", "pool1")
    h.controller.register(NodeRegistration(node_id="pool1", agent_url="http://pool1:9000", slurm_job_id="71",
                                           pool_model=model), h.controller.authenticate_token(token))
    pool_instance(h, "pool1", model, f"pool-{model}-1")


def test_a_groups_own_pool_does_not_keep_the_model_at_min_instances_for_everyone(harness):
    harness.deploy("m", keep_alive_seconds=3600, min_instances=1, max_instances=2)
    group_pool(harness, "pool1", "71", "physics")
    pool_instance(harness, "pool1", "m", "pool-m-1")
    harness.register("n2")

    report = harness.tick(1)
    assert report.kinds() == [("start_min", "m")], report
    assert [(url, model) for url, model, _ in harness.agents.started] == [("http://n2:9000", "m")]


def test_an_idle_instance_is_not_stopped_for_a_groups_own_pool_under_min_instances(harness):
    harness.deploy("m", keep_alive_seconds=10, min_instances=1, max_instances=2)
    group_pool(harness, "pool1", "71", "physics")
    pool_instance(harness, "pool1", "m", "pool-m-1")
    harness.register("n2")
    ordinary = ordinary_instance(harness, "n2", "m")

    for _ in range(3):  # idle long past keep-alive: it is everyone else's only instance of m
        assert harness.tick(600).kinds() == []
    assert harness.registry.get_instance(ordinary).state == "ready"
    assert harness.controller.route("m").instance_id == ordinary


def test_demand_that_another_groups_pool_cannot_serve_starts_the_model_when_there_is_room(make_harness):
    h = make_harness(allocate_on_demand=False)
    h.deploy("m", keep_alive_seconds=3600, max_instances=2)
    group_pool(h, "pool1", "71", "physics")
    pool_instance(h, "pool1", "m", "pool-m-1")
    with pytest.raises(NoCapacity):
        h.controller.route("m", group="chemistry")  # no node may host it now: demand is noted

    h.register("n2")  # room comes
    report = h.tick(1)
    assert report.kinds() == [("start_for_demand", "m")], report
    h.heartbeat("n2", tier="sharedfs")
    assert h.controller.route("m", group="chemistry").node_id == "n2"


def test_placement_does_not_take_another_groups_pool_for_where_a_moved_instances_requests_go(make_harness):
    """A busy instance whose model has no other instance its requests may go to costs their cold start when moved
    (docs/placement.md, migration): a group's own pool of that model is no such instance (its requests are
    everyone's), so placement asks for an allocation rather than stop it, as with no pool at all."""
    h = make_harness(cpu_slots_per_node=1)
    agents = use_migrating_agents(h)
    h.deploy("a")
    h.deploy("b")
    physics_pool(h, "a")
    h.register("n1", gpus=0)
    a1 = ready_instance(h, "n1", "a", running=1)

    assert h.controller.route("b").status == "allocating"
    assert agents.migrations == [] and agents.stopped == []
    assert h.registry.get_instance(a1).state == "ready"


def test_an_agent_up_for_a_models_cold_start_is_kept_for_it_though_a_groups_own_pool_serves_that_model(make_harness):
    """b's allocation came up for a request physics' pool of b cannot serve: a's route must not take its node (b
    would ask for a third allocation while a's own comes up idle), as when b has no pool at all."""
    h = make_harness(cpu_slots_per_node=1)
    h.deploy("a", gpus=0)
    h.deploy("b", gpus=0)
    physics_pool(h, "b")
    job_a = h.controller.route("a").job_id
    job_b = h.controller.route("b").job_id
    assert job_a and job_b
    agent_up(h, job_b, "n2")
    assert h.controller.route("a").status == "allocating"  # its own allocation, still coming
    assert [i.node_id for i in h.registry.instances()] == ["pool1"]
    h.controller.route("b")
    assert sorted((i.model, i.node_id) for i in h.registry.instances()) == [("b", "n2"), ("b", "pool1")]


def test_a_groups_own_pool_coming_up_does_not_answer_another_groups_demand(make_harness):
    """chemistry's request found no capacity while physics' pool was still loading: the pool becoming ready serves
    physics only, so chemistry's demand stays and the model starts for it once there is room."""
    h = make_harness(allocate_on_demand=False)
    h.deploy("m", keep_alive_seconds=3600, max_instances=2)
    group_pool(h, "pool1", "71", "physics")
    with pytest.raises(NoCapacity):
        h.controller.route("m", group="chemistry")  # no node may host it now: demand is noted

    pool_instance(h, "pool1", "m", "pool-m-1")  # physics' pool's load is done
    h.register("n2")  # room comes
    report = h.tick(1)
    assert report.kinds() == [("start_for_demand", "m")], report
