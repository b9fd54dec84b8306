"""Model pools (`hpcllm node --model NAME`, slurm/model-pool.sbatch) on the controller's side.

A pool's agent registers with `pool_model` and keeps NAME running for its job's whole life. The controller routes
to the pool's instances (and may name them as migration targets) but never places anything on a pool node, never
evicts or moves a pool's instance to make room, and never stops one for idleness; before the pool's job ends (its
agent reports when) it hands over to an instance started elsewhere. Registrations are hand-made (conftest.Harness);
the pool's own instance is what its agent would report in a heartbeat.
"""

from __future__ import annotations

import json

import pytest

from hpcllm.cli.main import main
from hpcllm.controller.cli import print_status
from hpcllm.controller.protocol import (ClusterStatus, Heartbeat, InstanceInfo, IssuedPoolToken, NodeRegistration,
                                       PoolTokenRequest)
from hpcllm.controller.tests.conftest import ADMIN_KEY, GB
from hpcllm.controller.tests.test_migration import use_migrating_agents
from hpcllm.credentials import TOKEN_HEADER

INTERNAL = {"X-Hpcllm-Secret": "test-secret"}


def pool_instance(h, node: str, model: str, instance_id: str, gpu_ids=(), running: int = 0) -> str:
    """The pool's agent started its pinned model by itself (nobody asked the controller) and heartbeats it ready."""
    url = f"http://{node}:9000"
    h.agents._agent(url).add(InstanceInfo(
        instance_id=instance_id, model=model, state="ready", worker_url=f"{url}/workers/{instance_id}",
        gpu_ids=list(gpu_ids), running_requests=running, load_tier="sharedfs", load_seconds=2.0))
    h.heartbeat(node)
    return instance_id


def ordinary_instance(h, node: str, model: str) -> str:
    """An instance the controller placed (placement must choose `node`), reported ready."""
    outcome = h.controller.start_instance(h.registry.get_model(model))
    assert (outcome.status, outcome.node_id) == ("starting", node), outcome
    h.heartbeat(node, tier="sharedfs")
    assert h.registry.get_instance(outcome.instance_id).state == "ready"
    return outcome.instance_id


# ------------------------------------------------------------------------------------------------ registry


def test_the_pool_model_is_kept_with_the_node_and_cleared_by_a_plain_registration(harness):
    harness.register("n1", pool_model="m")
    assert harness.registry.get_node("n1").pool_model == "m"
    assert harness.registry.get_node("n1").is_pool
    harness.register("n1")  # the same node, now in an ordinary node-agent job
    assert harness.registry.get_node("n1").pool_model is None
    assert not harness.registry.get_node("n1").is_pool


def test_a_registration_with_a_bad_pool_model_name_is_refused_naming_the_field(harness):
    client = harness.app_client()
    body = {"node_id": "n1", "agent_url": "http://n1:9000", "pool_model": "no spaces allowed"}
    resp = client.post("/v1/internal/nodes/register", json=body, headers=INTERNAL)
    assert resp.status_code in (400, 422), resp.get_data(as_text=True)
    error = resp.get_json()["error"]
    assert "pool_model" in f"{error['message']} {error.get('param')}"
    assert "Traceback" not in resp.get_data(as_text=True)
    assert harness.registry.get_node("n1") is None


# ------------------------------------------------------------------------------------------------ autoscaler


def test_an_idle_pool_instance_is_not_stopped_after_keep_alive_while_an_ordinary_one_is(harness):
    harness.deploy("m", keep_alive_seconds=60, max_instances=2)
    harness.register("pool1", pool_model="m")
    pooled = pool_instance(harness, "pool1", "m", "pool-m-1")
    harness.register("n2")
    ordinary = ordinary_instance(harness, "n2", "m")

    assert harness.tick(59).kinds() == []
    report = harness.tick(2)  # both idle past keep-alive
    assert report.kinds() == [("stop_idle", ordinary)]
    assert harness.agents.stopped == [("http://n2:9000", ordinary)]
    for _ in range(5):  # and long after: the pool's instance stays (no stop, so no restart by its agent)
        assert harness.tick(600).kinds() == []
    assert [i.instance_id for i in harness.registry.instances()] == [pooled]
    assert harness.registry.get_instance(pooled).state == "ready"


def test_a_pool_instance_counts_for_min_instances(harness):
    harness.deploy("m", keep_alive_seconds=10, min_instances=1, max_instances=2)
    harness.register("pool1", pool_model="m")
    pooled = pool_instance(harness, "pool1", "m", "pool-m-1")
    harness.register("n2")
    ordinary = ordinary_instance(harness, "n2", "m")
    # The ordinary instance may go: the pool's instance keeps the model at its minimum (no start_min either).
    assert harness.tick(11).kinds() == [("stop_idle", ordinary)]
    assert harness.tick(3600).kinds() == []
    assert [i.instance_id for i in harness.registry.instances()] == [pooled]


# ------------------------------------------------------------------------------------------------ placement


@pytest.mark.parametrize("pool_model, expected", [(None, "n1"), ("a", "n2")])
def test_placement_never_picks_a_pool_node_even_when_it_is_the_cheapest(harness, pool_model, expected):
    harness.deploy("a", gpus=1, size_bytes=20 * GB)
    harness.deploy("b", gpus=1, size_bytes=20 * GB)
    # n1 holds b's checkpoint in DRAM (1 s) and has a free GPU; n2 only reads the shared FS (20 s).
    harness.register("n1", cached=(("b", "dram"),), pool_model=pool_model)
    pool_instance(harness, "n1", "a", "pool-a-1", gpu_ids=[0])
    harness.register("n2")
    outcome = harness.controller.route("b")
    assert (outcome.status, outcome.node_id) == ("starting", expected)
    assert [(url, model) for url, model, _ in harness.agents.started] == [(f"http://{expected}:9000", "b")]


@pytest.mark.parametrize("running", [0, 3])
def test_placement_never_evicts_or_moves_a_pool_instance(harness, running):
    agents = use_migrating_agents(harness)
    harness.deploy("a", gpus=2, size_bytes=20 * GB, max_instances=2)
    harness.deploy("b", gpus=2, size_bytes=20 * GB)
    # Both nodes are full with pools of a; pool1 holds b in DRAM, so making room there would be the cheapest
    # start by far (0.5 s eviction or 5 s move + 1 s load, against 30 s + 20 s for a new allocation).
    harness.register("pool1", cached=(("b", "dram"),), pool_model="a")
    victim = pool_instance(harness, "pool1", "a", "pool-a-1", gpu_ids=[0, 1], running=running)
    harness.register("pool2", pool_model="a")
    pool_instance(harness, "pool2", "a", "pool-a-2", gpu_ids=[0, 1])  # a migration target, were it allowed

    outcome = harness.controller.route("b")
    assert outcome.status == "allocating"  # a new node, not the pool's
    assert agents.stopped == [] and agents.migrations == [] and agents.started == []
    assert harness.registry.get_instance(victim).state == "ready"
    assert harness.registry.get_instance(victim).running_requests == running
    assert len(harness.backend.submitted()) == 1


def test_without_the_pool_mark_the_same_node_would_be_evicted(harness):
    """The control for the test above: the idle instance on the node holding b in DRAM is the cheapest victim."""
    harness.deploy("a", gpus=2, size_bytes=20 * GB)
    harness.deploy("b", gpus=2, size_bytes=20 * GB)
    harness.register("n1", cached=(("b", "dram"),))
    victim = pool_instance(harness, "n1", "a", "inst-a-1", gpu_ids=[0, 1])
    outcome = harness.controller.route("b")
    assert (outcome.status, outcome.node_id) == ("starting", "n1")
    assert harness.agents.stopped == [("http://n1:9000", victim)]


def test_an_allocation_for_any_node_is_not_sent_to_a_pool_node(harness):
    harness.deploy("b", gpus=1)
    harness.register("n1", pool_model="a")
    assert harness.controller.route("b").status == "allocating"
    spec = harness.backend.submitted()[0]
    assert spec.nodelist == ("n2",)  # an idle node by name, not the pool's n1


# ------------------------------------------------------------------------------------------------ routing


def test_requests_are_routed_to_the_pool_instance(harness):
    harness.deploy("m")
    harness.register("pool1", pool_model="m")
    pooled = pool_instance(harness, "pool1", "m", "pool-m-1")
    outcome = harness.controller.route("m")
    assert (outcome.status, outcome.instance_id, outcome.node_id) == ("ready", pooled, "pool1")
    assert harness.agents.started == []


def test_scale_out_from_a_busy_pool_goes_to_another_node(make_harness):
    h = make_harness(scale_out_running_requests=1)
    h.deploy("m", max_instances=2)
    h.register("pool1", pool_model="m")
    pooled = pool_instance(h, "pool1", "m", "pool-m-1", running=1)
    h.register("n2")
    outcome = h.controller.route("m")
    assert outcome.instance_id == pooled  # served by the pool now
    assert [(url, model) for url, model, _ in h.agents.started] == [("http://n2:9000", "m")]


def test_migration_targets_may_be_pool_instances_but_new_targets_never_start_on_a_pool(harness):
    harness.deploy("m", max_instances=3)
    harness.register("n1")
    leaving = ordinary_instance(harness, "n1", "m")
    harness.register("pool2", pool_model="m")
    pooled = pool_instance(harness, "pool2", "m", "pool-m-2")
    client = harness.app_client()
    resp = client.post("/v1/internal/migration-target", json={"model": "m", "exclude_node": "n1"},
                       headers=INTERNAL)
    assert resp.status_code == 200 and resp.get_json()["instance_id"] == pooled
    assert leaving != pooled

    # The pool itself drains (preemption, time limit): its streams go to the ordinary instance.
    resp = client.post("/v1/internal/migration-target", json={"model": "m", "exclude_node": "pool2"},
                       headers=INTERNAL)
    assert resp.status_code == 200 and resp.get_json()["instance_id"] == leaving


def test_a_draining_pool_gets_a_new_target_started_off_every_pool_node(harness):
    harness.deploy("m", max_instances=3)
    harness.register("pool1", pool_model="m")
    pool_instance(harness, "pool1", "m", "pool-m-1")
    harness.register("pool2", pool_model="other")  # free, but a pool: not a place for m
    harness.register("n3")
    resp = harness.app_client().post("/v1/internal/migration-target", json={"model": "m", "exclude_node": "pool1"},
                                     headers=INTERNAL)
    assert resp.status_code == 202, resp.get_data(as_text=True)
    assert resp.get_json()["node_id"] == "n3"
    assert [(url, model) for url, model, _ in harness.agents.started] == [("http://n3:9000", "m")]


# ------------------------------------------------------------------------------------------------ the pool ends


def test_a_pool_whose_job_ends_is_forgotten(harness):
    harness.deploy("m")
    harness.register("pool1", pool_model="m")
    pooled = pool_instance(harness, "pool1", "m", "pool-m-1")
    # The agent drains (Slurm's signal): a draining heartbeat, then one with nothing left, then it exits.
    harness.controller.heartbeat("pool1", Heartbeat(instances=[InstanceInfo(
        instance_id=pooled, model="m", state="draining", worker_url="http://pool1:9000/workers/pool-m-1")],
        draining=True))
    assert harness.registry.get_node("pool1").state == "draining"
    harness.controller.heartbeat("pool1", Heartbeat(instances=[], draining=True))
    assert harness.registry.instances() == []
    timeout = harness.config.controller.node_timeout_seconds
    report = harness.tick(timeout + 1, heartbeats=False)
    assert ("node_lost", "pool1") in report.kinds()
    # A request now needs a new instance: the former pool node is gone, so any node may be asked for.
    assert harness.controller.route("m").status == "allocating"


def test_a_pool_killed_without_a_drain_is_forgotten_after_the_node_timeout(harness):
    harness.deploy("m")
    harness.register("pool1", pool_model="m")
    pool_instance(harness, "pool1", "m", "pool-m-1")
    timeout = harness.config.controller.node_timeout_seconds
    report = harness.tick(timeout + 1, heartbeats=False)
    assert ("node_lost", "pool1") in report.kinds()
    assert harness.registry.instances() == []


# ------------------------------------------------------------------------------------------------ status


def test_status_shows_which_nodes_are_pools(harness, capsys, monkeypatch):
    harness.deploy("m")
    harness.register("pool1", pool_model="m")
    harness.register("n2")
    resp = harness.app_client().get("/v1/admin/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    nodes = {n["node_id"]: n for n in resp.get_json()["nodes"]}
    assert nodes["pool1"]["pool_model"] == "m"
    assert nodes["n2"]["pool_model"] is None

    monkeypatch.setenv("COLUMNS", "250")
    print_status(ClusterStatus.model_validate(resp.get_json()))
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "node" in line and "state" in line and "job" in line)
    assert "pool" in header
    pool_row = next(line for line in out.splitlines() if "pool1" in line)
    n2_row = next(line for line in out.splitlines() if " n2 " in line)
    cells = [c.strip() for c in pool_row.split("│")]
    assert cells[cells.index("pool1") + 3] == "m"  # node, state, job, pool
    cells = [c.strip() for c in n2_row.split("│")]
    assert cells[cells.index("n2") + 3] == "-"


def test_status_json_of_an_old_controller_without_pools_still_renders(capsys, monkeypatch):
    """`hpcllm status` against a controller from before pools: no pool_model field at all."""
    body = {"now": 10.0, "models": [], "instances": [], "allocations": [], "cold_starts": [],
            "nodes": [{"node_id": "n1", "state": "up", "agent_url": "http://n1:9000", "slurm_job_id": "7",
                       "job_scoped": True, "gpus": 0, "free_gpus": 0, "tiers": {}, "last_heartbeat": 9.0,
                       "cached": []}]}
    monkeypatch.setenv("COLUMNS", "250")
    print_status(ClusterStatus.model_validate(json.loads(json.dumps(body))))
    assert "n1" in capsys.readouterr().out


def test_node_cli_refuses_a_bad_model_name_without_a_traceback(capsys):
    assert main(["node", "--model", "bad name!"]) == 2
    err = capsys.readouterr().err
    assert "is not a model name" in err and "Traceback" not in err


# ------------------------------------------------------------------------ the pool's job ends: make before break

JOB_END = 1000  # seconds after the pool registered; retire_lead_seconds = 300: it retires 700 s in


def ending_pool(make_harness, job_end: float | None = JOB_END, running: int = 2, **settings):
    """A pool of m on pool1 (its agent reports its job's end, job_end s from now; None: no time limit) serving
    `running` requests, and an empty ordinary node n2. (harness, the pool's instance id)"""
    h = make_harness(retire_lead_seconds=300, **settings)
    h.deploy("m", keep_alive_seconds=3600, max_instances=1)
    h.register("pool1", pool_model="m")
    if job_end is not None:
        h.job_ends["pool1"] = h.clock.now + job_end
    pooled = pool_instance(h, "pool1", "m", "pool-m-1", running=running)
    h.register("n2")
    return h, pooled


def ask_target(h, node: str, instance_id: str, headers=None):
    """What the pool's agent asks when it drains: where do the requests of instance_id go?"""
    return h.app_client().post("/v1/internal/migration-target", headers=headers or INTERNAL,
                               json={"model": "m", "exclude_node": node, "instance_id": instance_id})


def test_a_pool_gets_a_replacement_before_its_job_ends_and_drains_into_it_once_ready(make_harness, capsys,
                                                                                    monkeypatch):
    h, pooled = ending_pool(make_harness)
    assert h.tick(699).kinds() == []  # not yet: retire_lead_seconds before the end
    assert h.controller.status().nodes[0].phase is None

    report = h.tick(1)
    # The replacement starts first (max_instances = 1: the leaving pool does not count); the pool serves on.
    assert report.kinds() == [("start_replacement", "m")], report
    assert [(url, model) for url, model, _ in h.agents.started] == [("http://n2:9000", "m")]
    assert h.registry.get_node("pool1").state == "up"
    assert h.controller.route("m").instance_id == pooled
    pool_status = next(n for n in h.controller.status().nodes if n.node_id == "pool1")
    assert (pool_status.job_end, pool_status.phase) == (h.job_ends["pool1"], "retiring, replacement starting")
    monkeypatch.setenv("COLUMNS", "250")
    print_status(h.controller.status())
    row = next(line for line in capsys.readouterr().out.splitlines() if "pool1" in line)
    assert "up, retiring, replacement starting" in row and "in 300 s" in row, row

    assert h.tick(5).kinds() == []  # loading: one replacement at a time, no drain
    [replacement] = [i.instance_id for i in h.registry.instances(model="m") if i.node_id == "n2"]
    h.heartbeat("n2", tier="sharedfs")
    report = h.tick(1)
    assert report.kinds() == [("retire_pool", "pool1")], report
    # No route goes to the pool any more, and its agent learns from its heartbeat's answer that it drains: it asks
    # where its running requests go (the replacement), migrates them, and exits.
    assert h.registry.get_node("pool1").state == "draining"
    assert h.controller.route("m").instance_id == replacement
    answer = h.controller.heartbeat("pool1", Heartbeat(instances=h.agents.list_instances("http://pool1:9000"),
                                                       job_end=h.job_ends["pool1"]))
    assert answer.state == "draining"
    resp = ask_target(h, "pool1", pooled)
    assert resp.status_code == 200 and resp.get_json()["instance_id"] == replacement, resp.get_json()
    assert ("retire_pool", "pool1") not in h.tick(1).kinds()  # once


def test_a_pool_without_a_time_limit_is_left_alone(make_harness):
    h, pooled = ending_pool(make_harness, job_end=None)
    for _ in range(10):
        assert h.tick(3600).kinds() == []
    assert h.registry.get_node("pool1").state == "up" and h.agents.started == []
    assert h.controller.status().nodes[0].phase is None


def test_an_extended_job_end_postpones_the_hand_over(make_harness):
    h, pooled = ending_pool(make_harness)
    assert h.tick(700).kinds() == [("start_replacement", "m")]
    # `scontrol update TimeLimit=...`: the agent reads the new end and reports it; the pool is not retiring now.
    h.job_ends["pool1"] += 1800
    h.heartbeat("n2", tier="sharedfs")  # the replacement is ready, but the pool serves on
    for _ in range(3):
        assert h.tick(1).kinds() == []
    assert h.registry.get_node("pool1").state == "up"
    assert next(n for n in h.controller.status().nodes if n.node_id == "pool1").phase is None
    assert h.tick(1800 - 3 - 1).kinds() == []  # a second before the new retirement time

    report = h.tick(1)  # the (still ready) instance on n2 takes over
    assert report.kinds() == [("retire_pool", "pool1")], report
    assert len(h.agents.started) == 1


def test_a_controller_restarted_while_a_pool_retires_waits_for_the_same_replacement(make_harness):
    h, pooled = ending_pool(make_harness)
    assert h.tick(700).kinds() == [("start_replacement", "m")]
    h.restart_controller()
    assert h.registry.get_node("pool1").job_end == h.job_ends["pool1"]
    assert h.tick(5).kinds() == []  # no second replacement, no drain
    h.heartbeat("n2", tier="sharedfs")
    assert h.tick(1).kinds() == [("retire_pool", "pool1")]
    assert len(h.agents.started) == 1


def pool_node(h, node: str, job: str, group: str, model: str = "m", shared: bool = False) -> IssuedPoolToken:
    """A group's pool of `model` on node, its Slurm job running and its agent registered with a pool token (as
    slurm/model-pool.sbatch does); the token issued."""
    issued = h.controller.issue_pool_token(PoolTokenRequest(model=model, group=group, shared=shared))
    h.backend.run_job(job, node)
    h.controller.register(NodeRegistration(node_id=node, agent_url=f"http://{node}:9000", slurm_job_id=job,
                                           pool_model=model), h.controller.authenticate_token(issued.token))
    return issued


def group_pool(h, node: str, job: str, group: str, shared: bool = False) -> dict:
    """A group's pool of m on node (pool_node); its headers."""
    return {TOKEN_HEADER: pool_node(h, node, job, group, shared=shared).token}


@pytest.mark.parametrize("leaving_group, other_group", [("physics", "chemistry"), (None, "physics")])
def test_a_pool_hands_over_only_where_its_requests_may_go(make_harness, leaving_group, other_group):
    """A group's pool's requests may go to service nodes and its own group's pools, a shared pool's to service
    nodes only: another group's ready pool of the model is no replacement, and never their migration target."""
    h = make_harness(retire_lead_seconds=300)
    h.deploy("m", keep_alive_seconds=3600, max_instances=1)
    leaving = group_pool(h, "pool1", "71", leaving_group or "physics", shared=leaving_group is None)
    h.job_ends["pool1"] = h.clock.now + JOB_END
    pooled = pool_instance(h, "pool1", "m", "pool-m-1", running=2)
    group_pool(h, "pool2", "72", other_group)
    pool_instance(h, "pool2", "m", "pool-m-2")
    h.register("n3")

    report = h.tick(700)
    assert report.kinds() == [("start_replacement", "m")], report
    assert [(url, model) for url, model, _ in h.agents.started] == [("http://n3:9000", "m")]
    assert h.registry.get_node("pool1").state == "up"
    h.heartbeat("n3", tier="sharedfs")
    assert h.tick(1).kinds() == [("retire_pool", "pool1")]
    [public] = [i.instance_id for i in h.registry.instances(model="m") if i.node_id == "n3"]
    resp = ask_target(h, "pool1", pooled, headers=leaving)
    assert resp.status_code == 200 and resp.get_json()["instance_id"] == public, resp.get_json()


def test_a_groups_pool_may_hand_over_to_its_own_groups_other_pool(make_harness):
    h = make_harness(retire_lead_seconds=300)
    h.deploy("m", keep_alive_seconds=3600, max_instances=1)
    group_pool(h, "pool1", "71", "physics")
    h.job_ends["pool1"] = h.clock.now + JOB_END
    pool_instance(h, "pool1", "m", "pool-m-1", running=2)
    group_pool(h, "pool2", "72", "physics")  # the group's second pool, with more time left
    h.job_ends["pool2"] = h.clock.now + 10 * JOB_END
    pool_instance(h, "pool2", "m", "pool-m-2")
    h.register("n3")
    assert h.tick(700).kinds() == [("retire_pool", "pool1")]  # at once: nothing to start
    assert h.agents.started == []
