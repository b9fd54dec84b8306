"""An allocation whose Slurm job is held: it starts only when someone releases it, so it serves no demand."""

from __future__ import annotations

import logging

import pytest

from hpcllm.slurm.base import LAUNCH_FAILED_HELD, JobState


def asked_allocation(harness, reason: str) -> str:
    """The job of the allocation a route to m (deployed) asks for, Slurm's reason for it now `reason`."""
    harness.deploy("m")
    job = harness.controller.route("m").job_id
    harness.backend.jobs[job].reason = reason
    return job


def assert_left_pending(harness, job: str) -> None:
    """The allocation was left alone: its job still queued in Slurm, the registry's allocation still pending."""
    assert harness.backend.jobs[job].state is JobState.PENDING
    assert harness.registry.get_allocation(job).state == "pending"


def test_an_allocation_slurm_held_after_its_launch_failed_is_cancelled_and_its_demand_gets_another(harness):
    # A node's prolog failed (or the node died as the job started): Slurm requeues the job (node-agent jobs are
    # --requeue) held, reason "launch failed requeued held", and drains the node.
    first = asked_allocation(harness, LAUNCH_FAILED_HELD)
    harness.tick(5)
    assert harness.backend.jobs[first].state is JobState.CANCELLED
    alloc = harness.registry.get_allocation(first)
    assert alloc.state in ("cancelling", "ended") and LAUNCH_FAILED_HELD in alloc.reason
    harness.tick(5)
    harness.controller.route("m")  # the model is still wanted
    report = harness.tick(5)
    others = [job for job in harness.backend.jobs if job != first]
    assert len(others) == 1, report.kinds()
    assert harness.backend.jobs[others[0]].state is JobState.PENDING


@pytest.mark.parametrize("reason", ["JobHeldAdmin", "JobHeldUser"])
def test_an_allocation_someone_holds_is_left_to_them_and_logged_once(harness, caplog, reason):
    # `scontrol hold` (recorded on the 22.05 dev cluster: PENDING, reason JobHeldUser, priority 0), or a site's
    # job_submit plugin holding new jobs: a replacement would be held too, so it stays, and the log says why.
    job = asked_allocation(harness, reason)
    with caplog.at_level(logging.WARNING, logger="hpcllm.controller.allocations"):
        harness.tick(5)
        harness.tick(5)
    assert_left_pending(harness, job)
    told = [r.getMessage() for r in caplog.records if "held by Slurm" in r.getMessage()]
    assert len(told) == 1 and reason in told[0] and f"scontrol release {job}" in told[0]


def test_a_queued_allocation_waiting_for_resources_is_left_alone(harness):
    job = asked_allocation(harness, "Resources")
    harness.tick(5)
    assert_left_pending(harness, job)


def test_a_second_failed_launch_within_the_window_is_left_held_not_replaced(harness, caplog):
    # A launch failure the job causes (its prolog, its environment) fails on every node: replacing each held job
    # would drain node after node, what Slurm's hold prevents. One replacement; the next failure stays held.
    first = asked_allocation(harness, LAUNCH_FAILED_HELD)
    harness.backend.jobs[first].nodes = ("n1",)
    harness.tick(5)
    assert harness.backend.jobs[first].state is JobState.CANCELLED
    harness.controller.route("m")
    harness.tick(5)
    [second] = [job for job in harness.backend.jobs if job != first]
    harness.backend.jobs[second].nodes = ("n2",)
    harness.backend.jobs[second].reason = LAUNCH_FAILED_HELD
    with caplog.at_level(logging.WARNING, logger="hpcllm.controller"):
        for _ in range(4):  # well past preferred_node_wait_seconds: step 1 does not replace it either
            harness.controller.route("m")
            harness.tick(60)
    assert_left_pending(harness, second)
    assert set(harness.backend.jobs) == {first, second}
    told = [r for r in caplog.records if second in r.getMessage()]
    assert len(told) == 1 and told[0].levelno == logging.ERROR, [r.getMessage() for r in told]
    assert "n1, n2" in told[0].getMessage() and f"scontrol release {second}" in told[0].getMessage()


def test_an_allocation_held_again_after_its_release_is_told_again(harness, caplog):
    job = asked_allocation(harness, "JobHeldUser")
    with caplog.at_level(logging.WARNING, logger="hpcllm.controller.allocations"):
        harness.tick(5)
        harness.backend.jobs[job].reason = "Resources"  # scontrol release
        harness.tick(5)
        harness.backend.jobs[job].reason = "JobHeldAdmin"  # scontrol hold again, by an admin this time
        harness.tick(5)
    told = [r.getMessage() for r in caplog.records if "held by Slurm" in r.getMessage()]
    assert len(told) == 2 and "JobHeldAdmin" in told[1], told
