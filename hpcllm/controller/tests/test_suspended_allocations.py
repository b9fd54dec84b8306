"""An allocation whose running job Slurm suspends (PreemptMode=SUSPEND, `scontrol suspend`): not serving while
suspended, and said so."""

from __future__ import annotations

from hpcllm.slurm.base import JobState, JobStatus


def test_a_suspended_allocation_is_shown_as_suspended_not_requeued(harness, monkeypatch):
    harness.deploy("m")
    job = harness.controller.route("m").job_id
    harness.backend.start(job, "n1", harness.clock.now)
    harness.tick()
    harness.register("n1", job=job)
    statuses = harness.backend.statuses

    def suspended(job_ids):  # squeue: ST=S, JobState SUSPENDED (the adapter's PENDING: not serving)
        return {j: JobStatus(job_id=j, state=JobState.PENDING, raw_state="SUSPENDED", nodes=("n1",))
                if j == job else s for j, s in statuses(job_ids).items()}

    monkeypatch.setattr(harness.backend, "statuses", suspended)
    harness.tick(1)
    alloc = harness.registry.get_allocation(job)
    assert alloc.state == "pending" and alloc.reason == "suspended"


def test_a_resumed_allocation_is_no_longer_shown_as_suspended(harness, monkeypatch):
    harness.deploy("m")
    job = harness.controller.route("m").job_id
    harness.backend.start(job, "n1", harness.clock.now)
    harness.tick()
    statuses = harness.backend.statuses
    suspended = [True]

    def as_squeue_says(job_ids):
        return {j: JobStatus(job_id=j, state=JobState.PENDING, raw_state="SUSPENDED", nodes=("n1",))
                if j == job and suspended[0] else s for j, s in statuses(job_ids).items()}

    monkeypatch.setattr(harness.backend, "statuses", as_squeue_says)
    harness.tick(1)
    assert harness.registry.get_allocation(job).reason == "suspended"
    suspended[0] = False  # scontrol resume
    harness.tick(1)
    alloc = harness.registry.get_allocation(job)
    assert alloc.state == "running" and alloc.reason is None
    harness.backend.finish(job)
    harness.tick(1)
    assert harness.registry.get_allocation(job).reason == "completed"  # not "suspended" as its end
