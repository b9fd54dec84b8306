"""Slurm's node list while Slurm cannot be asked: a failed sinfo is not repeated on every placement."""

from __future__ import annotations


def test_a_failed_node_list_is_not_asked_again_on_every_placement(make_harness):
    # A hung slurmctld makes each sinfo wait for [slurm] command_timeout_seconds (60 s), and placement asks for the
    # node list under its lock on every cold route: each route would wait that long again, one after another.
    h = make_harness(slurm_nodes_ttl_seconds=30)
    model = h.deploy("m")
    h.backend.down = True
    for _ in range(3):
        assert h.allocator.idle_nodes(model) == []
    h.allocator.distinct_nodes(model, [])  # a submission's fresh look too
    assert sum(1 for call, _ in h.backend.calls if call == "nodes") == 1


def test_without_a_reuse_time_slurm_is_asked_each_time(make_harness):
    h = make_harness(slurm_nodes_ttl_seconds=0)
    model = h.deploy("m")
    h.backend.down = True
    for _ in range(3):
        assert h.allocator.idle_nodes(model) == []
    assert sum(1 for call, _ in h.backend.calls if call == "nodes") == 3
    h.backend.down = False
    assert h.allocator.idle_nodes(model) == ["n1", "n2", "n3", "n4"]
