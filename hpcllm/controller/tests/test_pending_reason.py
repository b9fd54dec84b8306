"""An allocation queued on a node asked for by name (autoscaler step 1): resubmitted for any node after
preferred_node_wait_seconds, unless Slurm holds it for a limit that would hold a new job as well (QOS, association,
licenses) or its job is held (JobHeldUser, JobHeldAdmin): then it keeps its place in the queue, and the admin sees
Slurm's reason (hpcllm status, the log)."""

from __future__ import annotations

import logging

import pytest

from hpcllm.controller.cli import print_status
from hpcllm.slurm.adapter import job_status_from_json, jobs_from_squeue_text
from hpcllm.slurm.base import JobState

# Slurm's words for a named node that is down or drained (state_reason Resources, with this description).
NODES_DOWN = "Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions"


def as_squeue_text_says(reason: str) -> str | None:
    """The reason as the squeue text fallback (-O Reason) reads it: the description when Slurm has one."""
    return jobs_from_squeue_text(f"7|PENDING|{reason}|||||0|batch|hpcllm|\n")["7"].reason


def as_squeue_json_says(reason: str, description: str) -> str | None:
    return job_status_from_json({"job_id": 7, "job_state": ["PENDING"], "state_reason": reason,
                                 "state_description": description}).reason


def queued_on_its_node(h) -> str:
    """An allocation for m asking for n3 by name (n3 holds m on persistent NVMe), queued."""
    h.deploy("m")
    h.register("n3", cached=(("m", "nvme"),), job="1")
    h.registry.node_left("n3", "gone")
    job = h.controller.route("m").job_id
    assert h.backend.jobs[job].spec.nodelist == ("n3",)
    return job


@pytest.mark.parametrize("reason", ["QOSMaxJobsPerUserLimit", "AssocGrpGRES", "Licenses", "PartitionTimeLimit",
                                    # held (scontrol hold, SBATCH_HOLD, a job_submit plugin): someone's to release
                                    "JobHeldUser", "JobHeldAdmin"])
def test_an_allocation_held_by_a_limit_keeps_its_place_and_shows_slurms_reason(make_harness, caplog, capsys,
                                                                              monkeypatch, reason):
    monkeypatch.setenv("COLUMNS", "250")
    h = make_harness(preferred_node_wait_seconds=120)
    job = queued_on_its_node(h)
    h.backend.jobs[job].reason = reason

    with caplog.at_level(logging.WARNING, logger="hpcllm.controller"):
        for _ in range(3):  # long past the wait: resubmitting would only queue behind the same limit
            report = h.tick(121)
            assert [k for k in report.kinds() if k[0] in ("cancel_stuck_allocation", "resubmit_allocation")] == []
    assert h.backend.jobs[job].state == JobState.PENDING and len(h.backend.submitted()) == 1
    told = [r.getMessage() for r in caplog.records if job in r.getMessage() and reason in r.getMessage()]
    assert len(told) == 1, told  # once, not at every tick
    [alloc] = h.controller.status().allocations
    assert alloc.pending_reason == reason
    print_status(h.controller.status())
    assert f"Slurm: {reason}" in capsys.readouterr().out

    h.backend.jobs[job].reason = "Resources"  # the limit is lifted; now the named node is what it waits for
    report = h.tick(1)
    assert ("cancel_stuck_allocation", job) in report.kinds()
    [(_, second)] = [k for k in report.kinds() if k[0] == "resubmit_allocation"]
    assert h.backend.jobs[second].spec.nodelist == ("n1",)


@pytest.mark.parametrize("reason", [
    "Resources", "Priority", "ReqNodeNotAvail, UnavailableNodes:n3", "BeginTime", None,
    as_squeue_text_says(NODES_DOWN), as_squeue_json_says("Resources", NODES_DOWN),
])
def test_an_allocation_waiting_for_its_named_node_is_resubmitted_for_any_node(make_harness, reason):
    """Waiting for the node (whichever way Slurm words it), held back after a requeue (BeginTime), or Slurm gives
    no reason: a new job on any node may start sooner. (A job held after a failed launch is sync()'s:
    test_held_allocations.py.)"""
    h = make_harness(preferred_node_wait_seconds=120)
    job = queued_on_its_node(h)
    h.backend.jobs[job].reason = reason

    assert h.tick(119).kinds() == []
    report = h.tick(2)
    assert ("cancel_stuck_allocation", job) in report.kinds()
    assert [k[0] for k in report.kinds()].count("resubmit_allocation") == 1
    assert h.backend.jobs[job].state == JobState.CANCELLED
