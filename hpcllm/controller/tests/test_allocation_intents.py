"""The crash window between sbatch and the allocation record: every allocation is an intent (committed first, its
tag on the job as --comment) that becomes the allocation row once Slurm answers; a restarted controller adopts
the tagged job, or drops the intent when Slurm has no live job for it."""

from __future__ import annotations

import pytest

from hpcllm.controller.allocations import TAG_PREFIX, Allocator
from hpcllm.controller.errors import AllocationFailed
from hpcllm.controller.registry import Registry
from hpcllm.slurm.base import JobState
from hpcllm.slurm.errors import SlurmUnavailable


class ControllerKilled(BaseException):
    """Stands for kill -9: nothing after it runs (BaseException, so no `except Exception` handles it)."""


def crash_after_sbatch(backend):
    """Make the next submit reach Slurm, then 'kill' the controller before it can record the job."""
    real_submit = backend.submit

    def submit(spec):
        real_submit(spec)
        backend.submit = real_submit
        raise ControllerKilled()

    backend.submit = submit


def restarted(h) -> Allocator:
    """A new controller process on the same database and the same Slurm."""
    h.registry.close()
    h.registry = Registry(h.config.controller.database_url)
    return Allocator(h.config, h.registry, h.backend, "http://controller:8700", clock=h.clock)


def test_every_allocation_job_carries_a_unique_tag_and_leaves_no_intent(harness):
    model = harness.deploy("m", gpus=1)
    first = harness.allocator.submit(model, ["n3"], harness.clock.now)
    second = harness.allocator.submit(model, [], harness.clock.now)
    tags = [job.spec.comment for job in harness.backend.jobs.values()]
    assert all(tag.startswith(TAG_PREFIX) for tag in tags) and len(set(tags)) == 2
    assert harness.backend.jobs[first].spec.nodelist == ("n3",)
    assert [a.job_id for a in harness.registry.allocations()] == [first, second]
    assert harness.registry.allocation_intents() == []


def test_job_submitted_just_before_a_crash_is_adopted_on_restart(harness):
    model = harness.deploy("m", gpus=1)
    crash_after_sbatch(harness.backend)
    with pytest.raises(ControllerKilled):
        harness.allocator.submit(model, ["n2"], harness.clock.now)
    [job_id] = harness.backend.jobs
    assert harness.registry.allocations() == []  # the old code's crash window: Slurm has a job we never recorded

    allocator = restarted(harness)
    harness.clock.advance(5)
    assert allocator.sync(harness.clock.now) == {job_id: "adopted"}
    [alloc] = harness.registry.allocations()
    assert (alloc.job_id, alloc.model, alloc.preferred_nodes, alloc.state) == (job_id, "m", ["n2"], "pending")
    assert alloc.submitted_at == harness.clock.now - 5  # when the intent was made, not when it was found
    assert harness.registry.allocation_intents() == []
    # From now on it is an ordinary allocation: it starts, and it can be released.
    harness.backend.start(job_id, "n2", harness.clock.now)
    assert allocator.sync(harness.clock.now) == {job_id: "running"}
    allocator.cancel(job_id, "idle", harness.clock.now)
    assert harness.backend.jobs[job_id].state is JobState.CANCELLED


def test_intent_whose_job_never_reached_slurm_or_already_ended_is_dropped(harness):
    model = harness.deploy("m", gpus=1)
    crash_after_sbatch(harness.backend)
    with pytest.raises(ControllerKilled):
        harness.allocator.submit(model, [], harness.clock.now)
    # Another process died after writing its intent but before sbatch ran.
    harness.registry.add_allocation_intent("hpcllm-alloc-never", "m", [], "debug", 3600, harness.clock.now)
    [job_id] = harness.backend.jobs
    harness.backend.finish(job_id, JobState.FAILED)

    allocator = restarted(harness)
    assert allocator.sync(harness.clock.now) == {}
    assert harness.registry.allocations() == [] and harness.registry.allocation_intents() == []
    assert allocator.why_not_submit(model) is None


def test_lost_sbatch_answer_blocks_new_submissions_until_slurm_answers(harness):
    """sbatch timed out: Slurm may or may not have the job. A second sbatch could double the allocation, so none is
    made until a poll settles the first."""
    model = harness.deploy("m", gpus=1)
    real_submit = harness.backend.submit

    def accepted_then_timed_out(spec):
        real_submit(spec)
        raise SlurmUnavailable("sbatch did not answer within 30 s; is slurmctld up?")

    harness.backend.submit = accepted_then_timed_out
    with pytest.raises(AllocationFailed, match="did not answer"):
        harness.allocator.submit(model, [], harness.clock.now)
    harness.backend.submit = real_submit
    with pytest.raises(AllocationFailed, match="has not told yet whether an earlier submission"):
        harness.allocator.submit(model, [], harness.clock.now)
    assert len(harness.backend.jobs) == 1

    harness.backend.down = True  # still no answer: the intent stays
    with pytest.raises(AllocationFailed, match="unsettled submission"):
        harness.allocator.sync(harness.clock.now)
    assert len(harness.registry.allocation_intents()) == 1
    harness.backend.down = False
    [job_id] = harness.backend.jobs
    assert harness.allocator.sync(harness.clock.now) == {job_id: "adopted"}
    assert harness.allocator.why_not_submit(model) is None


def test_refused_submission_leaves_nothing(harness):
    model = harness.deploy("m", gpus=1)
    harness.backend.refuse_submit = "Invalid account or account/partition combination specified"
    with pytest.raises(AllocationFailed, match="Invalid account"):
        harness.allocator.submit(model, [], harness.clock.now)
    assert harness.registry.allocations() == [] and harness.registry.allocation_intents() == []
    assert harness.allocator.why_not_submit(model) is None


def test_poll_during_a_submission_does_not_settle_it(harness):
    """The autoscaler's sync may run while a route's sbatch is in progress: the in-flight intent is not touched
    (Slurm does not list that job yet, so settling it would drop it)."""
    model = harness.deploy("m", gpus=1)
    real_submit = harness.backend.submit
    seen = {}

    def slow_submit(spec):
        seen["sync"] = harness.allocator.sync(harness.clock.now)  # before Slurm has the job
        seen["intents"] = len(harness.registry.allocation_intents())
        return real_submit(spec)

    harness.backend.submit = slow_submit
    job_id = harness.allocator.submit(model, [], harness.clock.now)
    assert seen == {"sync": {}, "intents": 1}
    assert [a.job_id for a in harness.registry.allocations()] == [job_id]
    assert ("list_jobs", None) not in harness.backend.calls  # nothing to settle: Slurm is not asked


def test_intents_survive_reopening_the_database(harness):
    harness.registry.add_allocation_intent("hpcllm-alloc-x", "m", ["n1"], "debug", 60.0, 123.0)
    restarted(harness)
    [intent] = harness.registry.allocation_intents()
    assert (intent.tag, intent.preferred_nodes, intent.time_limit_seconds, intent.created_at) == (
        "hpcllm-alloc-x", ["n1"], 60.0, 123.0)
    assert harness.registry.settle_allocation_intent("hpcllm-alloc-x", "77")
    assert not harness.registry.settle_allocation_intent("hpcllm-alloc-x", "77")  # settled once
    assert [a.job_id for a in harness.registry.allocations()] == ["77"]


def test_the_token_of_a_job_submitted_just_before_a_crash_is_bound_to_it_on_adoption(harness):
    """The allocation's token is minted with its intent (before sbatch): adoption binds it to the job, so the job's
    agent can register; a submission Slurm refused leaves no token behind."""
    from hpcllm.credentials import TOKEN_ENV, parse_token

    model = harness.deploy("m", gpus=1)
    crash_after_sbatch(harness.backend)
    with pytest.raises(ControllerKilled):
        harness.allocator.submit(model, ["n2"], harness.clock.now)
    [(job_id, job)] = harness.backend.jobs.items()
    credential_id, _ = parse_token(job.spec.env[TOKEN_ENV])
    assert harness.registry.get_credential(credential_id).job_id is None  # not known yet

    allocator = restarted(harness)
    assert allocator.sync(harness.clock.now) == {job_id: "adopted"}
    assert harness.registry.get_credential(credential_id).job_id == job_id

    harness.backend.refuse_submit = "Invalid partition"
    with pytest.raises(AllocationFailed):
        allocator.submit(model, [], harness.clock.now)
    assert [c.credential_id for c in harness.registry.credentials()] == [credential_id]
