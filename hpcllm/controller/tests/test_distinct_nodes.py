"""Allocations placement leaves to Slurm ask for distinct idle nodes by name (Allocator.distinct_nodes).

An agent is known by its node's name, so two agent jobs of ours on one node waste the second (it never registers).
Slurm packs small jobs (a CPU model's, asking for no GPU) onto one node, and allocations submitted close together
(one autoscaler tick, or before the earlier ones started) have no agent to exclude yet: each one is asked for an
idle node by name that no agent, queued allocation or unsettled submission of ours has taken.
"""

from __future__ import annotations

import threading
import time

from hpcllm.controller.allocations import Allocator
from hpcllm.controller.registry import Registry
from hpcllm.slurm.base import JobState, NodeInfo, StartEstimate
from hpcllm.slurm.errors import SlurmError


def named(h) -> list[tuple[str, ...]]:
    """The nodes each submitted allocation asked for by name, in submission order."""
    return [spec.nodelist for spec in h.backend.submitted()]


def agent_up(h, job: str, node: str) -> None:
    """Slurm starts the allocation on `node`, the controller's poll sees it, and its agent registers."""
    h.backend.start(job, node, h.clock.now)
    h.tick()
    h.register(node, gpus=0, job=job)


def test_two_cpu_models_started_in_one_tick_get_two_distinct_nodes(make_harness):
    h = make_harness(cpu_slots_per_node=1)
    h.deploy("a", gpus=0, min_instances=1)
    h.deploy("b", gpus=0, min_instances=1)
    report = h.tick()
    assert sorted(s for k, s in report.kinds() if k == "start_min") == ["a", "b"]
    assert named(h) == [("n1",), ("n2",)]
    assert sorted(tuple(a.preferred_nodes) for a in h.registry.allocations()) == [("n1",), ("n2",)]
    # Their agents register on those nodes and each model starts on its own.
    for alloc, node in zip(h.registry.allocations(), ("n1", "n2")):
        h.backend.start(alloc.job_id, node, h.clock.now)
    h.tick()
    for alloc, node in zip(h.registry.allocations(), ("n1", "n2")):
        h.register(node, gpus=0, job=alloc.job_id)
    h.tick()
    assert sorted((i.model, i.node_id) for i in h.registry.instances()) == [("a", "n1"), ("b", "n2")]
    assert len(h.backend.submitted()) == 2


def test_a_queued_allocation_keeps_its_node_taken_for_later_cold_starts(make_harness):
    h = make_harness(cpu_slots_per_node=1)
    for name in ("a", "b", "c"):
        h.deploy(name, gpus=0)
    for name in ("a", "b", "c"):  # route calls, each before the earlier allocations started
        assert h.controller.route(name).status == "allocating"
    assert named(h) == [("n1",), ("n2",), ("n3",)]


def test_a_restarted_controller_sees_the_nodes_its_queued_allocations_asked_for(make_harness):
    h = make_harness(cpu_slots_per_node=1)
    h.deploy("a", gpus=0)
    h.deploy("b", gpus=0)
    h.controller.route("a")
    h.registry.close()
    h.registry = Registry(h.config.controller.database_url)  # a new process on the same database
    allocator = Allocator(h.config, h.registry, h.backend, "http://controller:8700", clock=h.clock)
    allocator.submit(h.registry.get_model("b"), [], h.clock.now)
    assert named(h) == [("n1",), ("n2",)]


def test_a_requeued_allocation_keeps_its_node_taken(make_harness):
    """Preempted and requeued, the job asks for its node again (its --nodelist stays): no other allocation of ours
    may go there meanwhile."""
    h = make_harness(cpu_slots_per_node=1)
    h.deploy("a", gpus=0)
    h.deploy("b", gpus=0)
    job = h.controller.route("a").job_id
    agent_up(h, job, "n1")
    h.backend.jobs[job].state = JobState.PENDING  # requeued
    h.tick()
    alloc = h.registry.get_allocation(job)
    assert (alloc.state, alloc.nodes, alloc.preferred_nodes) == ("pending", [], ["n1"])
    assert h.registry.get_node("n1").state == "gone"
    h.controller.route("b")
    assert named(h) == [("n1",), ("n2",)]


def test_submissions_racing_each_other_pick_distinct_nodes(make_harness):
    """A route call and the autoscaler may submit at the same moment: the second must see the first one's node
    while that one's sbatch is still running (its intent names the node)."""
    h = make_harness(cpu_slots_per_node=1)
    a, b = h.deploy("a", gpus=0), h.deploy("b", gpus=0)
    real_submit = h.backend.submit

    def slow_submit(spec):
        time.sleep(0.3)  # sbatch takes a while: both submissions are in flight together
        return real_submit(spec)

    h.backend.submit = slow_submit
    threads = [threading.Thread(target=h.allocator.submit, args=(m, [], h.clock.now)) for m in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(named(h)) == [("n1",), ("n2",)]
    assert h.registry.allocation_intents() == []


def test_slurms_own_pick_is_taken_when_it_names_a_free_node(make_harness):
    """sbatch --test-only says where Slurm would start the job (node weights, topology): that node, by name."""
    h = make_harness(cpu_slots_per_node=1)
    h.backend.start_estimate_for = lambda spec: StartEstimate(start_time=h.clock.now, source="test-only",
                                                              nodes=("n3",))
    h.deploy("a", gpus=0)
    h.controller.route("a")
    assert named(h) == [("n3",)]
    # Slurm would put the next one on n3 too (it does not know our queued job is headed there): not taken.
    h.deploy("b", gpus=0)
    h.controller.route("b")
    assert named(h)[1] == ("n1",)


def test_a_cpu_model_takes_a_node_without_gpus_and_a_gpu_model_one_that_fits(make_harness):
    h = make_harness(cpu_slots_per_node=1)
    h.backend.node_infos = [NodeInfo(name="g1", state="IDLE", partitions=("debug",), gpus_total=4),
                            NodeInfo(name="g2", state="MIXED", partitions=("debug",), gpus_total=4, gpus_used=2),
                            NodeInfo(name="c1", state="MIXED", partitions=("debug",)),
                            NodeInfo(name="c2", state="IDLE", partitions=("debug",))]
    h.deploy("cpu", gpus=0)
    h.deploy("gpu", gpus=2)  # asks for slurm.gpus_per_node = 2
    h.controller.route("cpu")
    h.controller.route("gpu")
    # The idle CPU node before the mixed one; the GPU node whose 2 free GPUs fit exactly before the idle 4-GPU one.
    assert named(h) == [("c2",), ("g2",)]
    assert [s.gpus_per_node for s in h.backend.submitted()] == [0, 2]


def test_a_stuck_allocation_is_resubmitted_on_another_node(make_harness):
    """The node it was sent to got taken (sinfo still showed it idle): after preferred_node_wait_seconds it is
    cancelled and the model asks for another idle node by name."""
    h = make_harness(cpu_slots_per_node=1, preferred_node_wait_seconds=60)
    h.deploy("a", gpus=0)
    first = h.controller.route("a").job_id
    report = h.tick(61)
    assert ("cancel_stuck_allocation", first) in report.kinds()
    assert named(h) == [("n1",), ("n2",)]


def test_slurm_not_listing_nodes_leaves_the_job_to_slurm_minus_our_nodes(make_harness):
    h = make_harness(cpu_slots_per_node=1)
    h.deploy("a", gpus=0)
    h.deploy("other", gpus=0)
    h.register("n2", gpus=0)  # a user's own agent, its only CPU slot taken
    h.agents.start_instance("http://n2:9000", "other", "/x", [])
    h.heartbeat("n2")

    def sinfo_fails():
        raise SlurmError("sinfo: error: slurm_load_node: Unexpected message received", "Unexpected message")

    h.backend.nodes = sinfo_fails
    assert h.controller.route("a").status == "allocating"
    [spec] = h.backend.submitted()
    assert spec.nodelist == () and spec.exclude == ("n2",)


def test_an_allocation_slurm_starts_beside_one_of_ours_is_given_back_at_once(make_harness):
    """The fallback's cost: with no idle node listed, two queued allocations left to Slurm can start on the node
    that frees up first. The later one's agent could never register: it is cancelled at once (not held until
    allocation_keep_alive_seconds) and the model's demand gets a new allocation."""
    h = make_harness(cpu_slots_per_node=1)
    h.backend.node_infos = [NodeInfo(name=n, state="ALLOCATED", partitions=("debug",)) for n in ("n1", "n2")]
    h.deploy("a", gpus=0)
    h.deploy("b", gpus=0)
    first, second = (h.controller.route(m).job_id for m in ("a", "b"))
    assert named(h) == [(), ()]  # both left to Slurm
    h.backend.node_infos = [NodeInfo(name="n1", state="IDLE", partitions=("debug",)),
                            NodeInfo(name="n2", state="ALLOCATED", partitions=("debug",))]
    h.backend.start(first, "n1", h.clock.now)
    h.backend.start(second, "n1", h.clock.now)  # Slurm packed both onto the node that freed up
    report = h.tick()
    assert ("allocation_running", first) in report.kinds()
    assert ("allocation_cancelling", second) in report.kinds()
    assert h.backend.jobs[second].state == JobState.CANCELLED
    assert h.registry.get_allocation(second).reason == f"shares a node with ours: n1 (allocation {first})"
    assert h.registry.get_allocation(first).state == "running"  # the first one keeps its node


def test_an_allocation_starting_on_a_node_of_its_own_is_left_alone(make_harness):
    h = make_harness(cpu_slots_per_node=1)
    h.deploy("a", gpus=0)
    h.deploy("b", gpus=0)
    first, second = (h.controller.route(m).job_id for m in ("a", "b"))
    h.backend.start(first, "n1", h.clock.now)
    h.backend.start(second, "n2", h.clock.now)
    report = h.tick()
    assert {("allocation_running", first), ("allocation_running", second)} <= set(report.kinds())
    assert all(job.state == JobState.RUNNING for job in h.backend.jobs.values())


def test_an_allocation_requeued_after_the_preferred_node_wait_is_replaced_on_another_node(make_harness):
    """Requeued (preempted: its node is the preemptor's now) long after its submission: the next tick cancels it
    and asks for another idle node by name, not its old one."""
    h = make_harness(cpu_slots_per_node=1, preferred_node_wait_seconds=120)
    h.deploy("a", gpus=0, min_instances=1, keep_alive_seconds=3600)
    h.tick()
    [job] = [a.job_id for a in h.registry.allocations()]
    agent_up(h, job, "n1")
    h.tick(300)
    h.backend.jobs[job].state = JobState.PENDING  # requeued
    report = h.tick()
    assert ("cancel_stuck_allocation", job) in report.kinds()
    assert named(h) == [("n1",), ("n2",)]


def test_an_agent_up_for_one_models_cold_start_is_not_taken_by_another_whose_own_is_coming(make_harness):
    """Both cold starts wait; b's agent registers first. a's route must not take b's node (b would then ask for a
    third allocation while a's own comes up idle): a waits for its own allocation, b starts on its node."""
    h = make_harness(cpu_slots_per_node=1)
    h.deploy("a", gpus=0)
    h.deploy("b", gpus=0)
    job_a = h.controller.route("a").job_id
    job_b = h.controller.route("b").job_id
    agent_up(h, job_b, "n2")
    assert h.controller.route("a").status == "allocating"  # its own allocation, still coming
    assert h.registry.instances() == []
    b = h.controller.route("b")
    assert [(i.model, i.node_id) for i in h.registry.instances()] == [("b", "n2")], b
    agent_up(h, job_a, "n1")
    h.controller.route("a")
    assert sorted((i.model, i.node_id) for i in h.registry.instances()) == [("a", "n1"), ("b", "n2")]
    assert len(h.backend.submitted()) == 2


def test_an_unclaimed_node_serves_any_model_once_the_claimants_wait_is_over(make_harness):
    h = make_harness(cpu_slots_per_node=1)
    h.deploy("a", gpus=0)
    h.deploy("b", gpus=0)
    job_b = h.controller.route("b").job_id
    agent_up(h, job_b, "n2")
    assert h.controller.route("a").status == "allocating"  # n2 is kept for b's cold start: a asks for its own
    h.clock.advance(h.config.controller.route_max_wait_seconds + 1)  # b's waiting request gave up long ago
    h.heartbeat("n2")
    [job_a] = [alloc.job_id for alloc in h.registry.allocations() if alloc.model == "a"]
    h.backend.cancel(job_a)  # its allocation never came (here: cancelled); a's next request finds n2 free
    h.tick()
    answer = h.controller.route("a")
    assert [(i.model, i.node_id) for i in h.registry.instances()] == [("a", "n2")], answer
