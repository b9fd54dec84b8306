"""Slurm's node list while Slurm cannot be asked: a failed sinfo is not repeated on every placement."""

from __future__ import annotations

import threading

from hpcllm.slurm.errors import SlurmUnavailable


def placed_three_times_while_slurm_is_down(make_harness, ttl_seconds: float):
    """A controller reusing Slurm's node list for ttl_seconds ([controller] slurm_nodes_ttl_seconds), m deployed,
    whose placement asked three times for idle nodes while Slurm could not be asked: none each time. (harness, m)"""
    h = make_harness(slurm_nodes_ttl_seconds=ttl_seconds)
    model = h.deploy("m")
    h.backend.down = True
    for _ in range(3):
        assert h.allocator.idle_nodes(model) == []
    return h, model


def node_lists_asked(h) -> int:
    """How many times Slurm was asked for its node list (sinfo)."""
    return sum(1 for call, _ in h.backend.calls if call == "nodes")


def test_a_failed_node_list_is_not_asked_again_on_every_placement(make_harness):
    # A hung slurmctld makes each sinfo wait for [slurm] command_timeout_seconds (60 s), and placement asks for the
    # node list under its lock on every cold route: each route would wait that long again, one after another.
    h, model = placed_three_times_while_slurm_is_down(make_harness, ttl_seconds=30)
    h.allocator.distinct_nodes(model, [])  # a submission's fresh look too
    assert node_lists_asked(h) == 1


def test_without_a_reuse_time_slurm_is_asked_each_time(make_harness):
    h, model = placed_three_times_while_slurm_is_down(make_harness, ttl_seconds=0)
    assert node_lists_asked(h) == 3
    h.backend.down = False
    assert h.allocator.idle_nodes(model) == ["n1", "n2", "n3", "n4"]


def test_a_node_list_that_failed_after_a_command_timeout_is_not_asked_again_at_once(make_harness, monkeypatch):
    # The hung slurmctld: sinfo fails only after command_timeout_seconds (60 s), longer than the reuse time (30 s).
    # The pause counts from when it failed, or it would be over as the failed call returns.
    h = make_harness(slurm_nodes_ttl_seconds=30)
    model = h.deploy("m")
    monotonic = [1000.0]
    monkeypatch.setattr("hpcllm.controller.allocations.time.monotonic", lambda: monotonic[0])
    calls = []

    def hung_sinfo():
        calls.append(monotonic[0])
        monotonic[0] += 60
        raise SlurmUnavailable("sinfo timed out after 60 s")

    monkeypatch.setattr(h.backend, "nodes", hung_sinfo)
    for _ in range(3):
        assert h.allocator.idle_nodes(model) == []
    assert len(calls) == 1
    monotonic[0] += 31  # the pause is over: Slurm is asked again
    assert h.allocator.idle_nodes(model) == []
    assert len(calls) == 2


def test_placements_at_once_while_sinfo_hangs_run_it_once(make_harness, monkeypatch):
    # Route polls place outside the placement lock: each would start its own sinfo against a hung slurmctld.
    h = make_harness(slurm_nodes_ttl_seconds=30)
    model = h.deploy("m")
    entered, second_call = threading.Event(), threading.Event()
    calls = []

    def hung_sinfo():
        calls.append(threading.current_thread().name)
        if len(calls) > 1:
            second_call.set()
        else:
            entered.set()
            second_call.wait(timeout=5)  # a second sinfo started beside it (before the fix); else it times out
        raise SlurmUnavailable("sinfo timed out")

    monkeypatch.setattr(h.backend, "nodes", hung_sinfo)
    results = {}
    first = threading.Thread(target=lambda: results.__setitem__("first", h.allocator.idle_nodes(model)), name="a")
    first.start()
    assert entered.wait(timeout=30)
    other = threading.Thread(target=lambda: results.__setitem__("other", h.allocator.idle_nodes(model)), name="b")
    other.start()
    first.join(timeout=60)
    other.join(timeout=60)
    assert results == {"first": [], "other": []}
    assert calls == ["a"]
