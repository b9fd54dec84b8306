"""No capacity now is waited out like a job queued in Slurm, within the route call's wait (the gateway's cold-start
budget), instead of a 503 at once; a refused allocation is still answered at once."""

from __future__ import annotations

import threading
import time

import pytest

from hpcllm.controller.errors import AllocationRefused, NoCapacity


def route_in_thread(h, model: str, wait_seconds: float) -> dict:
    """controller.route(model, wait) in a thread; the dict gets its outcome or error and how long it took."""
    result: dict = {}

    def run():
        started = time.monotonic()
        try:
            result["outcome"] = h.controller.route(model, wait_seconds)
        except NoCapacity as exc:
            result["error"] = exc
        result["seconds"] = time.monotonic() - started

    result["thread"] = threading.Thread(target=run)
    result["thread"].start()
    return result


def test_a_request_waits_for_an_allocation_slot_instead_of_503(make_harness):
    """max_allocations = 1, held by model a's allocation whose agent has not registered yet: model b's request
    waits; once that agent registers (a node with room for both), b starts there."""
    h = make_harness(max_allocations=1, cpu_slots_per_node=2)
    h.deploy("a", gpus=0)
    h.deploy("b", gpus=0)
    job = h.controller.route("a").job_id
    with pytest.raises(NoCapacity, match="max_allocations"):  # wait 0: answered now, as before
        h.controller.route("b")
    waiting = route_in_thread(h, "b", wait_seconds=10)
    time.sleep(1.0)
    assert waiting["thread"].is_alive(), waiting  # before: a 503 no_capacity at once
    h.backend.start(job, "n1", h.clock.now)
    h.tick(1)
    h.register("n1", gpus=0, job=job)
    deadline = time.monotonic() + 5
    while not h.registry.instances(model="b") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [i.node_id for i in h.registry.instances(model="b")] == ["n1"]  # started by the waiting request
    h.heartbeat("n1", tier="sharedfs")  # loaded: the long-poll answers ready
    waiting["thread"].join(10)
    assert "error" not in waiting, waiting
    outcome = waiting["outcome"]
    assert (outcome.status, outcome.node_id) == ("ready", "n1"), outcome
    assert 1.0 <= waiting["seconds"] < 6
    assert len(h.backend.submitted()) == 1  # b waited for room; it submitted nothing


def test_no_capacity_once_the_wait_is_over(make_harness):
    h = make_harness(max_allocations=1)
    h.deploy("a", gpus=0)
    h.deploy("b", gpus=0)
    h.controller.route("a")
    started = time.monotonic()
    with pytest.raises(NoCapacity, match="max_allocations") as raised:
        h.controller.route("b", wait_seconds=1.2)
    assert time.monotonic() - started >= 1.2
    assert raised.value.code == "no_capacity" and raised.value.retry_after
    assert len(h.backend.submitted()) == 1


def test_a_refused_allocation_is_answered_at_once(make_harness):
    """Waiting would only sbatch again and again: Slurm's refusal is the answer."""
    h = make_harness()
    h.deploy("a", gpus=0)
    h.backend.refuse_submit = "Invalid account or account/partition combination specified"
    started = time.monotonic()
    with pytest.raises(AllocationRefused, match="Invalid account") as raised:
        h.controller.route("a", wait_seconds=10)
    assert time.monotonic() - started < 2
    assert raised.value.code == "allocation_failed"
    assert sum(1 for call, _ in h.backend.calls if call == "submit") == 1
