"""A cold start submits exactly one allocation per instance it needs, whatever the polling, restarts or node
preferences (issue 16): allocations submitted but not registered yet count for the node set they target.

Found on the dev stack: `make down` / `make up` starts Slurm afresh (job ids from 1 again) while the controller's
registry remembers the old allocations and which node caches the model. The new job's id was an old allocation's
id, so its record was never written, and every route poll (0.5 s) submitted another allocation for that node."""

from __future__ import annotations

import itertools

from hpcllm.controller.protocol import RouteWaiting
from hpcllm.slurm.base import JobState


def earlier_life(h, model) -> None:
    """The stack ran before: an allocation (job 1001) started on n1, its agent cached the model on persistent NVMe,
    the job ended. The registry keeps the ended allocation and the cache entry; Slurm forgets the job."""
    job = h.allocator.submit(model, [], h.clock.now)
    h.backend.start(job, "n1", h.clock.now)
    h.register("n1", cached=(("m", "nvme"),), job=job)
    h.autoscaler.tick(1)
    h.backend.finish(job, JobState.CANCELLED)
    h.tick(1)
    assert h.registry.get_allocation(job).state == "ended"
    assert h.registry.get_node("n1").state == "gone"
    assert [(c.node_id, c.tier) for c in h.registry.cache(model="m")] == [("n1", "nvme")]


def slurm_restarted(h) -> None:
    """`make down` / `make up`: a fresh slurmctld numbers jobs from the start again; the controller restarts too."""
    h.backend.jobs.clear()
    h.backend.calls.clear()
    h.backend._ids = itertools.count(1001)
    h.restart_controller()


def poll_routes(h, times: int, seconds: float = 0.5) -> list:
    answers = []
    for _ in range(times):
        answers.append(h.controller.route_once("m"))
        h.clock.advance(seconds)
    return answers


def test_a_reused_slurm_job_id_still_records_the_allocation_and_polling_submits_one(harness):
    model = harness.deploy("m", gpus=1)
    earlier_life(harness, model)
    slurm_restarted(harness)

    answers = poll_routes(harness, 20)
    assert len(harness.backend.submitted()) == 1
    [spec] = harness.backend.submitted()
    assert spec.nodelist == ("n1",)  # the node caching the model is asked for by name
    [job] = harness.backend.jobs
    assert job == "1001"  # the old allocation's id again
    alloc = harness.registry.get_allocation(job)
    assert (alloc.state, alloc.preferred_nodes, alloc.ended_at) == ("pending", ["n1"], None)
    assert all(isinstance(a, RouteWaiting) and a.status == "allocating" and a.job_id == job for a in answers)

    # Autoscaler ticks in between do not add one either, nor does the job starting before its agent registers.
    harness.tick(1)
    harness.backend.start(job, "n1", harness.clock.now)
    harness.tick(1)
    poll_routes(harness, 10)
    assert len(harness.backend.submitted()) == 1
    harness.register("n1", cached=(("m", "nvme"),), job=job)
    waiting = harness.controller.route_once("m")
    assert waiting.status == "starting" and waiting.node_id == "n1"
    assert len(harness.backend.submitted()) == 1


def test_a_stale_live_node_of_a_reused_job_id_does_not_count_as_the_new_allocation_registered(harness):
    """The old agent's node row may still be `up` (it stops heartbeating only now) with the job id Slurm gives our
    new allocation: that agent registered before the allocation was submitted, so it is not the new one's."""
    model = harness.deploy("m", gpus=1)
    harness.register("n1", cached=(("m", "nvme"),), job="1001")
    harness.registry.set_node_state("n1", "draining")  # going away: no placement there
    harness.clock.advance(5)
    poll_routes(harness, 6)
    assert len(harness.backend.submitted()) == 1
    [job] = harness.backend.jobs
    assert job == "1001"
    harness.backend.start(job, "n2", harness.clock.now)
    harness.autoscaler.tick(harness.clock.advance(1))
    assert harness.registry.get_allocation(job).state == "running"
    poll_routes(harness, 6)
    assert len(harness.backend.submitted()) == 1


def test_controller_restart_mid_cold_start_submits_nothing_more(harness):
    model = harness.deploy("m", gpus=1)
    earlier_life(harness, model)
    slurm_restarted(harness)
    poll_routes(harness, 3)
    harness.restart_controller()
    poll_routes(harness, 10)
    harness.tick(1)
    [job] = harness.backend.jobs
    harness.backend.start(job, "n1", harness.clock.now)
    harness.restart_controller()
    poll_routes(harness, 10)
    harness.tick(1)
    assert len(harness.backend.submitted()) == 1


def test_a_node_another_models_allocation_targets_is_not_asked_for_again(harness):
    """Two models cached on the same idle node: the second must not send a second agent job to that node while the
    first one's allocation for it is queued or starting (one agent per node)."""
    a = harness.deploy("a", gpus=1)
    harness.deploy("b", gpus=1)
    earlier_life_two = harness.allocator.submit(a, [], harness.clock.now)
    harness.backend.start(earlier_life_two, "n1", harness.clock.now)
    harness.register("n1", cached=(("a", "nvme"), ("b", "nvme")), job=earlier_life_two)
    harness.autoscaler.tick(harness.clock.advance(1))
    harness.backend.finish(earlier_life_two, JobState.CANCELLED)
    harness.tick(1)

    first = harness.controller.route_once("a")
    second = harness.controller.route_once("b")
    specs = harness.backend.submitted()[1:]
    assert first.status == second.status == "allocating"
    assert [s.nodelist for s in specs][0] == ("n1",)
    assert all(s.nodelist != ("n1",) for s in specs[1:]), [s.nodelist for s in specs]
    assert len(specs) == 2


def test_an_allocation_whose_agent_was_lost_is_not_capacity_on_its_way(harness):
    """An allocation whose agent registered, served, and went silent (declared lost) while Slurm still runs its job
    is no allocation starting up: the model's requests waited 'allocating' on it until the idle keep-alive
    (allocation_keep_alive_seconds) cancelled it; a new allocation is submitted at once."""
    harness.deploy("m", gpus=1)
    first = harness.controller.route("m").job_id
    harness.backend.start(first, "n1", harness.clock.now)
    harness.tick(1)
    harness.register("n1", job=first)
    harness.controller.route("m")
    harness.heartbeat("n1", tier="nvme")
    assert harness.controller.route("m").status == "ready"
    assert ("node_lost", "n1") in harness.tick(harness.config.controller.node_timeout_seconds + 1,
                                               heartbeats=False).kinds()
    waiting = harness.controller.route("m")
    assert waiting.status == "allocating" and waiting.job_id not in (None, first)
    assert len(harness.backend.submitted()) == 2


def register_during_the_first_call(h, owner, name: str, node_id: str, job: str) -> None:
    """The agent of `job` registers on node_id while the controller is inside `owner.name` the first time: a
    registration landing in the middle of a placement (the request handlers run in parallel)."""
    read = getattr(owner, name)
    calls = itertools.count()

    def registering(*args, **kwargs):
        result = read(*args, **kwargs)
        if next(calls) == 0:
            h.register(node_id, job=job)
        return result

    setattr(owner, name, registering)


def test_an_agent_registering_during_a_placement_gets_no_second_allocation_submitted(harness):
    """Seen in the e2e: the agent of the model's pending allocation registered while a route was placing the model
    (after placement had read the nodes, before it asked which allocations were still pending). Its allocation
    counted neither as a running node (not read yet) nor as pending (its agent had registered), so placement
    submitted a second Slurm job for the one request, cancelled idle seconds later."""
    harness.deploy("m", gpus=1)
    first = harness.controller.route_once("m").job_id
    harness.backend.start(first, "n1", harness.clock.now)
    harness.tick(1)
    assert harness.registry.get_allocation(first).state == "running"
    # Placement reads which nodes our agents run on between its read of the nodes and of the pending allocations.
    register_during_the_first_call(harness, harness.controller.allocator, "nodes_in_use", "n1", first)

    waiting = harness.controller.route_once("m")
    assert harness.registry.get_node("n1").state == "up"  # the agent did register mid-placement
    assert len(harness.backend.submitted()) == 1, [s.nodelist for s in harness.backend.submitted()]
    assert (waiting.status, waiting.job_id) == ("allocating", first)
    starting = harness.controller.route_once("m")
    assert (starting.status, starting.node_id) == ("starting", "n1")
    assert len(harness.backend.submitted()) == 1
