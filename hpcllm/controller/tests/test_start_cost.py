"""The start cost: what a start costs beyond reading bytes, learned from the controller's own cold-start records and
added to every placement estimate (docs/placement.md "Start cost")."""

from __future__ import annotations

import pytest

from hpcllm.controller.placement import (
    ANY_NODES,
    NodeCandidate,
    NodeSetCandidate,
    StartOverhead,
    learn_start_costs,
    place,
    place_spanning,
)
from hpcllm.controller.protocol import Heartbeat, InstanceInfo, NodeRegistration, PlacementBreakdown, TierInfo, Tiers
from hpcllm.controller.registry import Registry

GB = 10**9
BW = {"dram": 20.0, "nvme": 4.0, "sharedfs": 1.0}
DEFAULTS = {"one-rank": 5.0, "tensor-parallel": 10.0}
NOW = 1_000_000.0


def starts(model: str, tensor_parallel: int, *seconds: float) -> list[StartOverhead]:
    return [StartOverhead(model, tensor_parallel, s) for s in seconds]


# ------------------------------------------------------------------------------------------ learning the cost


def test_before_any_record_the_configured_defaults_stand():
    costs = learn_start_costs([], DEFAULTS)
    assert (costs.seconds("m", 1), costs.seconds("m", 2), costs.seconds("m", 8)) == (5.0, 10.0, 10.0)


def test_the_cost_is_the_median_of_each_kind_apart():
    # One-rank starts of several models (too few each for their own median): 0.2, 0.3, 9.0 -> 0.3 (an outlier, a
    # fresh worker, does not drag it). Tensor-parallel: 12, 14 -> 13. A model never started gets its kind's.
    costs = learn_start_costs(starts("a", 1, 0.2) + starts("b", 1, 9.0) + starts("c", 1, 0.3)
                              + starts("tp", 2, 12.0, 14.0), DEFAULTS)
    assert costs.seconds("new", 1) == pytest.approx(0.3)
    assert costs.seconds("new", 4) == pytest.approx(13.0)
    assert costs.seconds("a", 1) == pytest.approx(0.3)  # one start of its own is not enough: its kind's


def test_a_model_with_enough_starts_of_its_own_gets_its_own_median():
    overheads = starts("slow", 1, 6.0, 7.0, 8.0) + starts("fast", 1, 0.1, 0.2, 0.3, 0.2)
    costs = learn_start_costs(overheads, DEFAULTS)
    assert costs.seconds("slow", 1) == pytest.approx(7.0)
    assert costs.seconds("fast", 1) == pytest.approx(0.2)
    assert costs.seconds("slow", 2) == 10.0  # another degree of it: no tensor-parallel start recorded yet


def test_only_the_last_starts_count_and_a_negative_median_is_zero():
    # Newest first: the last 3 (window) are 1, 2, 3 -> 2; the 100 s starts before them are forgotten.
    costs = learn_start_costs(starts("m", 1, 1.0, 2.0, 3.0, 100.0, 100.0, 100.0), DEFAULTS, window=3)
    assert costs.seconds("m", 1) == pytest.approx(2.0)
    assert learn_start_costs(starts("m", 1, -0.5, -0.2, -0.1), DEFAULTS).seconds("m", 1) == 0.0


# ---------------------------------------------------------------------------------- in every estimate, alike


def test_the_start_cost_is_in_every_total_and_the_breakdown_but_does_not_change_the_winner():
    nodes = [NodeCandidate("a", "running", 0.0, 1, BW), NodeCandidate("b", "idle", 30.0, 1, BW)]
    # 10 GB: a from the shared FS 10 s, b from NVMe 2.5 s after a 30 s queue wait; plus 4 s start each.
    decision = place(10 * GB, 1, nodes, {"b": {"nvme"}}, start_seconds=4.0)
    assert decision.chosen.node == "a"
    breakdown = decision.breakdown()
    assert (breakdown.total_seconds, breakdown.load_seconds, breakdown.start_seconds) == (14.0, 10.0, 4.0)
    for policy in ("no-locality", "random", "serverlessllm"):
        assert place(10 * GB, 1, nodes, {}, policy=policy, start_seconds=4.0).chosen.start_seconds == 4.0


def test_a_spanning_estimate_carries_the_start_cost_too():
    candidate = NodeSetCandidate(ANY_NODES, (), "idle", 20.0, (BW, BW))
    chosen = place_spanning(8 * GB, 2, [4 * GB, 4 * GB], [candidate], {}, start_seconds=13.0).chosen
    # 20 s queue + 4 GB per rank from the shared FS (4 s) + 13 s start
    assert (chosen.total_seconds, chosen.start_seconds) == (pytest.approx(37.0), 13.0)


# ---------------------------------------------------------------------------------- recorded, then learned


@pytest.fixture
def registry(database_url):
    reg = Registry(database_url)
    yield reg
    reg.close()


def _registration(node_id: str) -> NodeRegistration:
    return NodeRegistration(node_id=node_id, agent_url=f"http://{node_id}:9000", slurm_job_id="7", job_scoped=True,
                            gpus=2, tiers=Tiers(sharedfs=TierInfo(read_gbps=1)))


def _ready(instance_id: str, model: str = "m", load_seconds: float = 1.0, **kw) -> InstanceInfo:
    return InstanceInfo(instance_id=instance_id, model=model, state="ready", worker_url="http://w", gpu_ids=[0],
                        load_tier="sharedfs", load_seconds=load_seconds, **kw)


def _cold_start(registry, instance_id, placement, requested, ready, load_seconds, tensor_parallel=1):
    reservation = registry.reserve_instance("m", "n1", [0], requested, placement, tensor_parallel)
    registry.confirm_instance(reservation, instance_id, "http://w")
    registry.heartbeat("n1", Heartbeat(instances=[_ready(instance_id, load_seconds=load_seconds,
                                                         tensor_parallel=tensor_parallel)]), ready)


def test_a_cold_start_records_what_placement_estimated_and_only_running_node_starts_count(registry):
    registry.register_node(_registration("n1"), NOW)
    running = {"kind": "running", "total_seconds": 1.0, "queue_wait_seconds": 0.0, "migration_seconds": 0.0}
    _cold_start(registry, "one", running, NOW, NOW + 3.5, 1.0)  # 3.5 s to ready, 1 s of it loading: 2.5 s
    _cold_start(registry, "tp", running, NOW + 10, NOW + 24.0, 1.0, tensor_parallel=2)  # 13 s
    _cold_start(registry, "moved", {**running, "migration_seconds": 4.0}, NOW + 30, NOW + 40, 1.0)  # a move in it
    _cold_start(registry, "queued", {**running, "kind": "pending", "queue_wait_seconds": 60.0}, NOW + 50,
                NOW + 120, 1.0)
    # Started by its agent, without a placement (a pool's): nothing known of what it waited for.
    registry.heartbeat("n1", Heartbeat(instances=[_ready("pool", started_at=NOW + 130)]), NOW + 140)

    recorded = {c.instance_id: c for c in registry.cold_starts()}
    assert (recorded["tp"].placement_kind, recorded["tp"].queue_wait_seconds, recorded["tp"].tensor_parallel) == \
        ("running", 0.0, 2)
    assert (recorded["queued"].placement_kind, recorded["queued"].queue_wait_seconds) == ("pending", 60.0)
    assert recorded["pool"].placement_kind is None and recorded["pool"].start_overhead_seconds is None
    counted = registry.running_node_cold_starts()
    assert [(c.instance_id, c.tensor_parallel, c.start_overhead_seconds) for c in counted] == \
        [("tp", 2, pytest.approx(13.0)), ("one", 1, pytest.approx(2.5))]


def test_placement_adds_the_learned_cost_to_its_estimates(make_harness, capsys, monkeypatch):
    from hpcllm.controller.cli import print_status

    h = make_harness(start_cost_seconds=5.0, tensor_parallel_start_cost_seconds=10.0)
    h.deploy("a", gpus=1)
    h.deploy("b", gpus=1)
    h.register("n1", gpus=2)
    # Before any cold start: the configured default, in the breakdown and the total (2 GB from the shared FS: 2 s).
    h.controller.route_once("a")
    [first] = h.controller.status().instances
    assert (first.placement.start_seconds, first.placement.total_seconds) == (5.0, pytest.approx(7.0))
    # It is ready 3.5 s after it was asked for, 1.5 s of it loading: the start cost 2 s.
    h.clock.advance(3.5)
    h.heartbeat("n1", tier="sharedfs", load_seconds=1.5)
    [cold] = h.controller.status().cold_starts
    assert (cold.placement_kind, cold.tensor_parallel, cold.estimate_seconds) == ("running", 1, pytest.approx(7.0))
    # The next start (another model, one rank: the kind's median) counts what was measured, not the default.
    h.controller.route_once("b")
    second = next(i for i in h.controller.status().instances if i.model == "b")
    assert (second.placement.start_seconds, second.placement.total_seconds) == \
        (pytest.approx(2.0), pytest.approx(4.0))
    monkeypatch.setenv("COLUMNS", "250")
    print_status(h.controller.status())  # `hpcllm status`: the estimate names the start cost it includes
    out = capsys.readouterr().out
    assert "sharedfs 7.00 s, start 5.0 s" in out and "sharedfs 4.00 s, start 2.0 s" in out, out


def test_hpcllm_status_shows_the_start_cost_in_the_estimate():
    from hpcllm.controller.cli import _estimate_cell

    placement = PlacementBreakdown(node="n1", kind="idle", total_seconds=135.7, queue_wait_seconds=60.0,
                                   load_seconds=62.0, migration_seconds=0.0, tier="sharedfs", bandwidth_gbps=1.0,
                                   queue_wait_source="slurm test-only", start_seconds=13.7)
    assert _estimate_cell(placement) == "sharedfs 135.70 s, queue 60 s (slurm test-only), start 13.7 s"
    assert "start" not in _estimate_cell(placement.model_copy(update={"start_seconds": 0.0}))
