"""The baseline policies the benches compare hpcllm against, chosen by configuration (docs/placement.md, "Baseline
policies"): placement_policy no-locality / random / serverlessllm, keep_alive_policy per-model. hpcllm's own
policy stays the default; each baseline must differ from it exactly where its definition says."""

from __future__ import annotations

import random

import pytest

from hpcllm.config import parse_config
from hpcllm.controller.placement import MovableInstance, NodeCandidate, place
from hpcllm.controller.tests.conftest import GB
from hpcllm.errors import ConfigError
from hpcllm.slurm.base import JobState

BW = {"dram": 20.0, "nvme": 4.0, "sharedfs": 1.0}  # GB/s


def node(name, free=1, wait=0.0, kind="running", movable=()):
    return NodeCandidate(name, kind, wait, free, BW, tuple(movable))


# ------------------------------------------------------------------------------------------ pure placement


def test_no_locality_ignores_the_node_that_caches_the_checkpoint():
    # 10 GB. hpcllm: b from NVMe 2.5 s beats a from the shared FS 10 s. no-locality: both 10 s, the tie goes to a.
    nodes, holding = [node("a"), node("b")], {"b": {"nvme"}}
    assert place(10 * GB, 1, nodes, holding).chosen.node == "b"
    chosen = place(10 * GB, 1, nodes, holding, policy="no-locality").chosen
    assert (chosen.node, chosen.tier, chosen.total_seconds) == ("a", "sharedfs", pytest.approx(10.0))


def test_serverlessllm_prefers_free_nodes_by_locality_and_never_migrates():
    # b is full but moving its idle instance costs 0.5 s and it holds the checkpoint in DRAM: hpcllm 0.5 + 0.5 = 1 s.
    # serverlessllm only looks at nodes with free slots: c (NVMe, 2.5 s) over a (shared FS, 10 s).
    nodes = [node("a"), node("b", free=0, movable=[MovableInstance("x", 1, 0.5)]), node("c")]
    holding = {"b": {"dram"}, "c": {"nvme"}}
    assert place(10 * GB, 1, nodes, holding).chosen.node == "b"
    chosen = place(10 * GB, 1, nodes, holding, policy="serverlessllm").chosen
    assert (chosen.node, chosen.migrate) == ("c", ())


def test_serverlessllm_is_blind_to_slurm_queue_waits():
    # No running node has room. hpcllm: moving b's instance (5 s) + shared FS 10 s = 15 s beats the idle node d
    # that caches it in NVMe but starts in 120 s (122.5 s). serverlessllm: no migration, queue waits taken as 0:
    # d (2.5 s) over * (10 s).
    nodes = [node("b", free=0, movable=[MovableInstance("x", 1, 5.0)]), node("*", kind="idle", wait=120.0),
             node("d", kind="idle", wait=120.0)]
    holding = {"d": {"nvme"}}
    assert place(10 * GB, 1, nodes, holding).chosen.node == "b"
    chosen = place(10 * GB, 1, nodes, holding, policy="serverlessllm").chosen
    assert (chosen.node, chosen.kind, chosen.queue_wait_seconds) == ("d", "idle", 0.0)


def test_random_draws_among_nodes_free_now_and_repeats_with_the_seed():
    nodes = [node("a"), node("b"), node("c", free=0, movable=[MovableInstance("x", 1, 0.1)]),
             node("*", kind="idle", wait=1.0)]
    draws = [place(GB, 1, nodes, {}, policy="random", rng=rng).chosen.node for rng in [random.Random(1)] for _ in range(40)]
    assert set(draws) == {"a", "b"}  # never the full node nor a new allocation while a and b have room
    again = [place(GB, 1, nodes, {}, policy="random", rng=rng).chosen.node for rng in [random.Random(1)] for _ in range(40)]
    assert draws == again


def test_random_falls_back_to_any_feasible_candidate_and_to_none():
    nodes = [node("c", free=0, movable=[MovableInstance("x", 1, 0.1)]), node("*", kind="idle", wait=1.0)]
    draws = {place(GB, 1, nodes, {}, policy="random", rng=random.Random(seed)).chosen.node for seed in range(20)}
    assert draws == {"c", "*"}
    assert place(GB, 4, nodes, {}, policy="random", rng=random.Random(0)).chosen is None  # nothing offers 4 slots


def test_unknown_policy_is_refused_by_the_config_naming_the_choices():
    with pytest.raises(ConfigError, match="placement_policy"):
        parse_config({"controller": {"placement_policy": "nearest"}})
    with pytest.raises(ConfigError, match="on_preempt"):
        parse_config({"node": {"on_preempt": "kill"}})
    with pytest.raises(ValueError, match="unknown placement policy"):
        place(GB, 1, [node("a")], {}, policy="nearest")


# ------------------------------------------------------------------------------- through the controller


def test_the_controller_places_by_the_configured_policy(make_harness):
    placed = {}
    for policy in ("hpcllm", "no-locality"):
        h = make_harness(placement_policy=policy)
        h.deploy("m", gpus=1, size_bytes=10 * GB)
        h.register("n1")
        h.register("n2", cached=(("m", "dram"),))
        placed[policy] = h.controller.route("m").node_id
    assert placed == {"hpcllm": "n2", "no-locality": "n1"}


def test_per_model_never_shares_a_node_and_keeps_instances_and_allocations_alive(make_harness):
    shared = make_harness(keep_alive_seconds=60, allocation_keep_alive_seconds=60)
    per_model = make_harness(keep_alive_seconds=60, allocation_keep_alive_seconds=60, keep_alive_policy="per-model")
    for h in (shared, per_model):
        h.deploy("a", gpus=1)
        h.deploy("b", gpus=1)
        job = h.controller.route("a").job_id  # no node yet: an allocation for a
        h.backend.start(job, "n1", h.clock.now, walltime=7200)
        h.tick()
        h.register("n1", gpus=2, job=job)
        h.tick()
        h.heartbeat("n1", tier="sharedfs")
        h.route_b = h.controller.route("b")
    # Shared: b takes n1's second GPU. Per-model: n1 is a's allocation, so b gets an allocation of its own.
    assert (shared.route_b.status, shared.route_b.node_id) == ("starting", "n1")
    assert per_model.route_b.status == "allocating" and per_model.route_b.job_id != job
    # An hour idle: the shared controller stops a's instance and then releases the allocation; per-model keeps both.
    for h in (shared, per_model):
        h.heartbeat("n1", tier="sharedfs")
        for _ in range(4):
            h.tick(61)  # live agents heartbeat first
    assert shared.registry.instances() == []
    assert shared.backend.jobs[job].state == JobState.CANCELLED
    assert [i.model for i in per_model.registry.instances()] == ["a"]
    assert per_model.backend.jobs[job].state == JobState.RUNNING
