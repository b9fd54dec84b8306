"""Node-level keep-alive: an allocation's idle clock starts once its agent could serve, not when Slurm starts the
job (the agent needs seconds to start and register; a short keep-alive must not cancel it before that)."""

from __future__ import annotations


def test_allocation_whose_agent_is_still_starting_is_not_idle(make_harness):
    h = make_harness(allocation_keep_alive_seconds=3, node_timeout_seconds=30)
    h.deploy("m")
    job = h.controller.route("m").job_id
    h.backend.start(job, "n2", h.clock.now)
    for _ in range(5):  # 10 s running in Slurm, agent not registered yet
        assert ("cancel_idle_allocation", job) not in h.tick(2).kinds()
    assert h.registry.get_allocation(job).state == "running"
    h.register("n2", job=job)
    h.tick()
    assert h.registry.instances(node_id="n2"), "the waiting demand starts the model on the new node"


def test_allocation_whose_agent_never_registers_is_released(make_harness):
    h = make_harness(allocation_keep_alive_seconds=3, node_timeout_seconds=30)
    h.deploy("m")
    job = h.controller.route("m").job_id
    h.backend.start(job, "n2", h.clock.now)
    h.tick()
    kinds = [k for _ in range(20) for k in h.tick(2).kinds()]  # 40 s: past node_timeout + keep-alive
    assert ("cancel_idle_allocation", job) in kinds


def idle_allocation(make_harness):
    """An allocation for m running on n2 with its agent registered and nothing placed there, keep-alive 3 s."""
    h = make_harness(allocation_keep_alive_seconds=3)
    model = h.deploy("m")
    job = h.allocator.submit(model, [], h.clock.now)
    h.backend.start(job, "n2", h.clock.now)
    h.register("n2", job=job)
    h.tick()
    return h, job


def test_an_agent_registering_again_into_a_cancelled_allocation_gets_no_instance(make_harness):
    """The idle allocation is being cancelled (its node draining) when its agent restarts and registers again before
    Slurm ends the job: the node stays draining, so no instance is placed on a node about to go away."""
    h, job = idle_allocation(make_harness)
    assert ("cancel_idle_allocation", job) in h.tick(4).kinds()
    h.register("n2", job=job)  # the agent restarted; Slurm has not ended the job yet
    assert h.registry.get_node("n2").state == "draining"
    assert h.controller.route("m").status == "allocating"
    assert h.agents.started == []


def test_an_idle_allocation_slurm_cannot_cancel_during_an_outage_keeps_serving(make_harness):
    """Past its keep-alive the idle allocation is to be cancelled, but Slurm does not answer: its node was left
    draining (no placement there) until Slurm came back, while it could serve - and with Slurm down no other
    allocation can be made, so a request for a model found no capacity. The node serves on; the cancel is tried
    again once Slurm answers and the node is still idle."""
    h, job = idle_allocation(make_harness)
    h.backend.down = True
    report = h.tick(4)
    assert ("cancel_idle_allocation", job) not in report.kinds()
    assert any(f"cannot cancel allocation {job}" in e for e in report.errors), report
    assert h.registry.get_node("n2").state == "up"
    answer = h.controller.route("m")
    assert (answer.status, answer.node_id) == ("starting", "n2"), answer
    h.backend.down = False
    h.heartbeat("n2", tier="sharedfs")
    assert ("cancel_idle_allocation", job) not in h.tick(4).kinds()  # it serves now: not idle


def test_an_idle_allocation_slurm_could_not_cancel_is_cancelled_once_slurm_answers(make_harness):
    """The cancel that failed during the outage is tried again: Slurm back, the node still idle, the next tick
    cancels the allocation (it does not hold the node for ever)."""
    h, job = idle_allocation(make_harness)
    h.backend.down = True
    assert ("cancel_idle_allocation", job) not in h.tick(4).kinds()
    h.backend.down = False

    assert ("cancel_idle_allocation", job) in h.tick(1).kinds()
    assert h.registry.get_node("n2").state == "draining"
