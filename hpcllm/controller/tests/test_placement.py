"""Placement: hand-computed cases (the arithmetic is written next to each assertion) and the fast form agreeing
with the specification on random clusters."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcllm.controller.placement import (
    ClusterView,
    MovableInstance,
    NodeCandidate,
    best_tier,
    cheapest_migration,
    estimate,
    place,
)

GB = 10**9
BW = {"dram": 20.0, "nvme": 4.0, "sharedfs": 1.0}  # GB/s


def node(name, free=1, wait=0.0, kind="running", bw=None, movable=()):
    return NodeCandidate(name, kind, wait, free, bw or BW, tuple(movable))


def test_best_tier_holding_the_checkpoint_wins():
    # 8 GB: DRAM 8/20 = 0.4 s, NVMe 8/4 = 2 s, shared FS 8/1 = 8 s
    assert best_tier(8 * GB, BW, {"dram", "nvme"}) == ("dram", pytest.approx(0.4))
    assert best_tier(8 * GB, BW, {"nvme"}) == ("nvme", pytest.approx(2.0))
    assert best_tier(8 * GB, BW, set()) == ("sharedfs", pytest.approx(8.0))


def test_the_estimate_is_the_copy_the_node_reads_at_its_measured_bandwidth():
    # A node whose NVMe measured slower than its shared FS (a busy disk): the agent still reads its NVMe copy
    # (CacheManager.best_copy), so the estimate is 8/0.5 = 16 s from NVMe, not 4 s from a shared FS it won't read.
    slow_disk = {"nvme": 0.5, "sharedfs": 2.0}
    assert best_tier(8 * GB, slow_disk, {"nvme"}) == ("nvme", pytest.approx(16.0))
    # and placement weighs that: a node without the copy but a fast shared FS wins over the busy disk
    decision = place(8 * GB, 1, [node("busy", bw=slow_disk), node("free", bw={"nvme": 2.0, "sharedfs": 2.0})],
                     {"busy": {"nvme"}})
    assert (decision.chosen.node, decision.chosen.tier) == ("free", "sharedfs")
    # a held tier the node never measured counts at its shared FS's bandwidth
    assert best_tier(8 * GB, {"sharedfs": 2.0}, {"dram"}) == ("dram", pytest.approx(4.0))


def test_locality_beats_a_free_node_loading_from_shared_fs():
    # 10 GB model. a: free, nothing cached -> 0 + 10/1 = 10 s. b: free, in NVMe -> 0 + 10/4 = 2.5 s.
    decision = place(10 * GB, 1, [node("a"), node("b")], {"b": {"nvme"}})
    assert decision.chosen.node == "b"
    assert decision.chosen.tier == "nvme"
    assert decision.chosen.total_seconds == pytest.approx(2.5)
    assert decision.considered == 2


def test_queue_wait_can_outweigh_locality():
    # 10 GB. a: free now, shared FS -> 0 + 10 = 10 s. b: DRAM but pending allocation 30 s -> 30 + 0.5 = 30.5 s.
    decision = place(10 * GB, 1, [node("a"), node("b", kind="pending", wait=30.0)], {"b": {"dram"}})
    assert decision.chosen.node == "a"
    assert decision.chosen.total_seconds == pytest.approx(10.0)
    # With a 5 s wait instead: 5 + 10/20 = 5.5 s < 10 s -> b.
    decision = place(10 * GB, 1, [node("a"), node("b", kind="pending", wait=5.0)], {"b": {"dram"}})
    assert (decision.chosen.node, decision.chosen.kind) == ("b", "pending")
    assert decision.chosen.total_seconds == pytest.approx(5.5)
    assert decision.chosen.queue_wait_seconds == 5.0
    assert decision.chosen.load_seconds == pytest.approx(0.5)


def test_migration_cost_is_added_when_slots_must_be_freed():
    # 4 GB model, 1 GPU. a: full, checkpoint in DRAM (4/20 = 0.2 s); moving instance x costs 3 s -> 3.2 s.
    # b: free, shared FS: 4/1 = 4 s. a wins with 3.2 s, and the decision says what must move.
    a = node("a", free=0, movable=[MovableInstance("x", 1, 3.0)])
    decision = place(4 * GB, 1, [a, node("b")], {"a": {"dram"}})
    assert decision.chosen.node == "a"
    assert decision.chosen.total_seconds == pytest.approx(3.2)
    assert decision.chosen.migration_seconds == 3.0
    assert decision.chosen.migrate == ("x",)
    # When moving costs 5 s instead: a = 5.2 s > b = 4 s.
    a = node("a", free=0, movable=[MovableInstance("x", 1, 5.0)])
    assert place(4 * GB, 1, [a, node("b")], {"a": {"dram"}}).chosen.node == "b"


def test_cheapest_migration_is_exact_not_greedy():
    # Free 2 GPUs from: p (2 GPUs, 5 s), q (1 GPU, 2 s), r (1 GPU, 2.5 s).
    # Greedy by cost takes q then r = 4.5 s; p alone is 5 s; the optimum is q + r = 4.5 s.
    movable = [MovableInstance("p", 2, 5.0), MovableInstance("q", 1, 2.0), MovableInstance("r", 1, 2.5)]
    cost, ids = cheapest_migration(movable, 2)
    assert cost == pytest.approx(4.5) and sorted(ids) == ["q", "r"]
    # With p at 4 s, the single 2-GPU instance is cheaper than q + r (4.5 s).
    movable[0] = MovableInstance("p", 2, 4.0)
    assert cheapest_migration(movable, 2) == (4.0, ("p",))
    # Freeing 5 GPUs from 4 movable ones is impossible.
    assert cheapest_migration(movable, 5) is None


def test_node_without_room_is_not_a_candidate():
    full = node("a", free=0)
    assert estimate(full, GB, 1, set()) is None
    assert place(GB, 1, [full], {}).chosen is None
    assert place(GB, 1, [], {}).chosen is None


def test_multi_gpu_model_needs_enough_free_slots():
    # 2-GPU model: a has 1 free (+ nothing movable) -> out; b has 2 free: 2 GB / 1 = 2 s.
    decision = place(2 * GB, 2, [node("a", free=1), node("b", free=2)], {"a": {"dram"}})
    assert decision.chosen.node == "b"
    assert decision.chosen.total_seconds == pytest.approx(2.0)


def test_a_node_over_claimed_by_two_slots_is_no_host_for_the_largest_model():
    # The controller subtracts the slots other models' cold starts claim (Controller._claims), so a node's free
    # slots can be -2: moving both its 1-slot instances frees none for a 4-slot model, which only b can host.
    over = node("a", free=-2, movable=[MovableInstance("x", 1, 0.1), MovableInstance("y", 1, 0.1)])
    assert estimate(over, GB, 4, {"dram"}) is None
    decision = place(GB, 4, [over, node("b", free=4)], {"a": {"dram"}})
    assert decision.chosen.node == "b"
    assert place(GB, 1, [node("a", free=-2)], {}).chosen is None  # no room anywhere: no capacity, not a crash


def test_ties_go_to_the_node_name_that_sorts_first():
    # Three identical nodes (1 GB from shared FS = 1 s each), given in reverse order.
    decision = place(GB, 1, [node("n3"), node("n1"), node("n2")], {})
    assert decision.chosen.node == "n1"
    assert decision.chosen.total_seconds == pytest.approx(1.0)


def test_breakdown_is_a_wire_record():
    decision = place(10 * GB, 1, [node("a"), node("b")], {"b": {"nvme"}})
    breakdown = decision.breakdown()
    assert breakdown.model_dump() == {
        "node": "b", "kind": "running", "total_seconds": 2.5, "queue_wait_seconds": 0.0, "load_seconds": 2.5,
        "migration_seconds": 0.0, "tier": "nvme", "bandwidth_gbps": 4.0, "migrate": [], "considered": 2,
        "queue_wait_source": None, "slowest_rank": None, "start_seconds": 0.0}


def test_view_holds_many_models_and_answers_each():
    # m1 (4 GB) is in a's DRAM, m2 (4 GB) in b's NVMe. m1: a = 0.2 s, b = 4 s. m2: a = 4 s, b = 1 s.
    view = ClusterView([node("a"), node("b")], {"m1": 4 * GB, "m2": 4 * GB},
                       {"m1": {"a": {"dram"}}, "m2": {"b": {"nvme"}}})
    assert view.decide("m1", 1).chosen.node == "a"
    assert view.decide("m2", 1).chosen.node == "b"
    assert view.decide("m2", 3).chosen is None  # no node has 3 slots


@st.composite
def clusters(draw):
    n = draw(st.integers(1, 12))
    nodes, holding = [], {}
    for i in range(n):
        name = f"n{draw(st.integers(0, 99)):02d}-{i}"
        movable = tuple(MovableInstance(f"{name}/i{j}", draw(st.integers(1, 2)),
                                        draw(st.sampled_from([0.0, 0.5, 2.0, 7.5])))
                        for j in range(draw(st.integers(0, 3))))
        bw = {"dram": draw(st.sampled_from([10.0, 20.0])), "nvme": draw(st.sampled_from([2.0, 4.0])),
              "sharedfs": draw(st.sampled_from([0.5, 1.0]))}
        nodes.append(NodeCandidate(name, draw(st.sampled_from(["running", "pending", "idle"])),
                                   draw(st.sampled_from([0.0, 0.0, 5.0, 30.0])), draw(st.integers(-3, 4)), bw,
                                   movable))
        holding[name] = set(draw(st.lists(st.sampled_from(["dram", "nvme"]), max_size=2)))
    size = draw(st.sampled_from([GB // 2, 4 * GB, 13 * GB]))
    slots = draw(st.integers(1, 4))
    return nodes, holding, size, slots


@settings(max_examples=60, deadline=None)
@given(clusters(), st.sampled_from([0.0, 5.0]))  # the start cost (StartCosts) is in every total alike
def test_fast_view_agrees_with_the_specification(cluster, start_seconds):
    nodes, holding, size, slots = cluster
    expected = [e for e in (estimate(c, size, slots, holding[c.node], None, start_seconds) for c in nodes)
                if e is not None]
    decision = place(size, slots, nodes, holding, start_seconds=start_seconds)
    if not expected:
        assert decision.chosen is None
        return
    best = min(expected, key=lambda e: (e.total_seconds, e.node))
    assert decision.chosen == best
    assert not math.isinf(decision.chosen.total_seconds)


# ------------------------------------------------------------------------------ tensor-parallel: every rank counts


def test_the_slowest_rank_decides_a_tensor_parallel_load():
    from hpcllm.controller.placement import slice_holding, slowest_rank

    # Two ranks of 6 GB each on two nodes: rank 0's node keeps its slices on NVMe (6/4 = 1.5 s), rank 1's node has
    # only the shared FS (6/1 = 6 s): the instance is ready when rank 1 is, 6 s, from the shared FS.
    fast = (BW, {slice_holding("nvme", 0)})
    shared_only = (BW, set())
    assert slowest_rank([6 * GB, 6 * GB], [fast, shared_only]) == (1, "sharedfs", pytest.approx(6.0))
    # Rank 1's slices on its node too: 1.5 s each; ties go to rank 0.
    assert slowest_rank([6 * GB, 6 * GB], [fast, (BW, {slice_holding("nvme", 1)})]) == (0, "nvme",
                                                                                       pytest.approx(1.5))
    # A slice copy of another rank does not help: rank 1 on a node holding rank 0's slices reads the shared FS.
    assert slowest_rank([6 * GB, 6 * GB], [fast, fast])[:2] == (1, "sharedfs")
    # A whole copy serves every rank; rank 0 reads more (the replicated tensors): 7/20 = 0.35 s from DRAM.
    assert slowest_rank([7 * GB, 6 * GB], [(BW, {"dram"}), (BW, {"dram"})]) == (0, "dram", pytest.approx(0.35))


def test_a_tensor_parallel_instance_goes_where_all_its_ranks_load_soonest():
    from hpcllm.controller.placement import slice_holding

    # 12 GB model, 2 ranks of 6.5 GB (half + replicated). Node a holds both ranks' slices on NVMe: 6.5/4 = 1.625 s.
    # Node b holds only rank 0's: rank 1 reads the shared FS, 6.5/1 = 6.5 s. Node c holds nothing: 6.5 s too
    # (ranks read their share, not the whole 12 GB: 12/1 = 12 s was the one-rank estimate).
    holding = {"a": {slice_holding("nvme", 0), slice_holding("nvme", 1)}, "b": {slice_holding("nvme", 0)}}
    ranks = [int(6.5 * GB), int(6.5 * GB)]
    decision = place(12 * GB, 2, [node("a", free=2), node("b", free=2), node("c", free=2)], holding, ranks)
    assert decision.chosen.node == "a" and decision.chosen.tier == "nvme"
    assert decision.chosen.load_seconds == pytest.approx(1.625)

    alone = place(12 * GB, 2, [node("b", free=2)], holding, ranks).breakdown()
    assert (alone.tier, alone.slowest_rank, alone.bandwidth_gbps) == ("sharedfs", 1, 1.0)
    assert alone.load_seconds == pytest.approx(6.5)
    assert place(12 * GB, 2, [node("c", free=2)], holding, ranks).chosen.load_seconds == pytest.approx(6.5)
    # the one-rank rule ignores slice copies: a node holding only slices is no better than the shared FS
    assert place(12 * GB, 1, [node("a")], holding).chosen.load_seconds == pytest.approx(12.0)
