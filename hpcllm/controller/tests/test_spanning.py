"""A tensor-parallel instance whose ranks span nodes (docs/tensor-parallel.md, "Ranks across nodes"): deploy resolves
how many nodes it needs, it gets one allocation of its own shaped nodes x ranks per node x GPUs per node, the agent
of that allocation's first node starts it, nothing else is placed there, and a failed start gives the allocation
back."""

from __future__ import annotations

import pytest

from hpcllm.controller.protocol import ModelSpec, RouteWaiting

INTERNAL = {"X-Hpcllm-Secret": "test-secret"}


def deploy(h, source, name: str = "tp", **fields):
    return h.controller.deploy(ModelSpec(name=name, source=str(source), size_bytes=1000, **fields))[0]


def start_job(h, job: str, nodes: tuple[str, ...]) -> None:
    """Slurm starts the allocation on these nodes; the controller's next tick sees it running."""
    h.backend.start(job, nodes[0], h.clock.now)
    h.backend.jobs[job].nodes = nodes
    h.tick(1)


def test_deploy_resolves_the_nodes_an_instance_needs(make_harness, tiny_llama_dir):
    h = make_harness(cpu_slots_per_node=2)  # slurm.gpus_per_node = 2
    assert deploy(h, tiny_llama_dir, "fits", gpus=2, tensor_parallel=2).nodes == 1
    assert deploy(h, tiny_llama_dir, "asked", gpus=2, tensor_parallel=2, nodes=2).nodes == 2
    assert deploy(h, tiny_llama_dir, "one-rank", gpus=4, tensor_parallel=1).nodes == 1  # one rank never spans
    small = make_harness(cpu_slots_per_node=1)
    assert deploy(small, tiny_llama_dir, "cpu", tensor_parallel=2).ranks_per_node == 1
    with pytest.raises(ValueError, match="tensor_parallel = 2 runs on hpcllm's engine only, not engine = 'vllm'"):
        deploy(h, tiny_llama_dir, "vllm", gpus=2, tensor_parallel=2, nodes=2, engine="vllm")
    with pytest.raises(ValueError, match=r"tensor_parallel \(2\) must be a multiple of nodes \(4\)"):
        ModelSpec(name="x", source="/x", tensor_parallel=2, nodes=4)


def test_a_spanning_instance_gets_an_allocation_of_its_own_shape_and_its_first_node_starts_it(
        make_harness, tiny_llama_dir):
    h = make_harness(allocate_on_demand=True)
    model = deploy(h, tiny_llama_dir, gpus=2, tensor_parallel=2, nodes=2)
    deploy(h, tiny_llama_dir, "one", gpus=1)
    h.register("n3", gpus=2)  # an ordinary agent with room: not where a 2-node instance can run

    answers = [h.controller.route_once("tp") for _ in range(3)]
    assert all(isinstance(a, RouteWaiting) and a.status == "allocating" for a in answers)
    [spec] = h.backend.submitted()  # one allocation, however often the route is polled
    assert (spec.nodes, spec.ntasks_per_node, spec.gpus_per_node) == (2, 1, 1)
    assert spec.template_vars["agents_per_node"] is False
    assert spec.nodelist == ("n1", "n2")  # two distinct idle nodes by name, never n3 where an agent of ours runs
    job = answers[0].job_id

    start_job(h, job, ("n1", "n2"))
    h.register("n1", gpus=2, job=job)  # its agent, on the job's first node (given more GPUs than the job asked)
    started = h.controller.route_once("tp")
    assert started.status == "starting" and started.node_id == "n1"
    assert (h.agents.started[-1], h.agents.tensor_parallel[-1], h.agents.nodes[-1]) == (
        ("http://n1:9000", "tp", [0]), 2, 2)
    [inst] = h.controller.status().instances
    assert inst.placement.tier == "sharedfs" and f"allocation {job} of 2 nodes" in inst.placement.queue_wait_source

    h.heartbeat("n1", tier="sharedfs")
    ready = h.controller.route_once("tp")
    assert ready.status == "ready" and ready.node_id == "n1"
    # Another model never lands on the spanning allocation's node, although n1 has a free GPU and sorts first.
    assert h.controller.route_once("one").node_id == "n3"
    assert model.spans_nodes and [s[0] for s in h.agents.started] == ["http://n1:9000", "http://n3:9000"]


def test_an_agent_registering_before_the_next_slurm_poll_gets_the_instance_not_a_second_allocation(
        make_harness, tiny_llama_dir):
    """The agent of a 2-node allocation (on its first node only) registers before the controller has polled Slurm
    since the job started: the registration records the job's nodes from Slurm, and the instance starts there."""
    h = make_harness(allocate_on_demand=True, cpu_slots_per_node=1)
    deploy(h, tiny_llama_dir, tensor_parallel=2)
    job = h.controller.route_once("tp").job_id
    h.backend.start(job, "n1", h.clock.now)
    h.backend.jobs[job].nodes = ("n1", "n2")
    h.register("n1", gpus=0, job=job)  # no tick in between
    assert h.registry.get_allocation(job).nodes == ["n1", "n2"]
    started = h.controller.route_once("tp")
    assert started.status == "starting" and started.node_id == "n1"
    assert len(h.backend.submitted()) == 1


def test_an_allocation_whose_nodes_slurm_has_not_said_yet_is_waited_for_not_doubled(make_harness, tiny_llama_dir):
    h = make_harness(allocate_on_demand=True, cpu_slots_per_node=1)
    deploy(h, tiny_llama_dir, tensor_parallel=2)
    job = h.controller.route_once("tp").job_id
    h.backend.start(job, "n1", h.clock.now)
    h.backend.jobs[job].nodes = ()  # running, its node list not out yet
    h.register("n1", gpus=0, job=job)
    assert h.registry.get_allocation(job).nodes == ["n1"]  # what its agent said: one of its 2 nodes
    waiting = [h.controller.route_once("tp") for _ in range(3)]
    assert all(w.status == "allocating" and w.job_id == job for w in waiting), waiting
    h.tick(1)  # the autoscaler neither submits another
    assert len(h.backend.submitted()) == 1 and h.agents.started == []
    h.backend.jobs[job].nodes = ("n1", "n2")
    h.tick(1)  # the poll brings the nodes
    started = h.controller.route_once("tp")
    assert started.status == "starting" and started.node_id == "n1" and len(h.backend.submitted()) == 1


def test_an_allocation_with_fewer_nodes_than_a_redeployed_model_needs_is_not_waited_for(make_harness, tiny_llama_dir):
    """Its 1-node allocation runs when the model is redeployed over 2 nodes: Slurm lists 1 node, so it is not one
    still being located; a 2-node allocation goes in."""
    h = make_harness(allocate_on_demand=True, cpu_slots_per_node=2)
    assert deploy(h, tiny_llama_dir, tensor_parallel=2).nodes == 1
    job = h.controller.route_once("tp").job_id
    start_job(h, job, ("n1",))
    h.register("n1", gpus=0, job=job)
    assert deploy(h, tiny_llama_dir, tensor_parallel=2, nodes=2).nodes == 2  # before any instance started
    again = h.controller.route_once("tp")
    assert again.status == "allocating" and again.job_id != job, again
    assert [spec.nodes for spec in h.backend.submitted()] == [1, 2] and h.agents.started == []


def test_a_failed_spanning_instance_gives_its_allocation_back(make_harness, tiny_llama_dir):
    h = make_harness(allocate_on_demand=True, cpu_slots_per_node=1)
    deploy(h, tiny_llama_dir, tensor_parallel=2)  # CPU ranks, one slot per node: 2 nodes
    job = h.controller.route_once("tp").job_id
    start_job(h, job, ("n1", "n2"))
    h.register("n1", gpus=0, job=job)
    iid = h.controller.route_once("tp").instance_id
    agent = h.agents.agents["http://n1:9000"]
    agent.instances[iid] = agent.instances[iid].model_copy(update={
        "state": "failed", "error": "worker exited with status 1: error: loading the 2-rank shards failed: rank 1: "
                                    "... strip 50/64 along dim 1 is corrupt"})
    h.heartbeat("n1")
    assert ("cancel", job) in h.backend.calls
    assert h.registry.get_allocation(job).state == "cancelling"
    # Demand is still there: the next start waits for a new allocation, never on the one being cancelled.
    h.agents.started.clear()
    again = h.controller.route_once("tp")
    assert again.status == "allocating" and again.job_id != job and h.agents.started == []


def test_a_failed_spanning_instance_whose_allocation_cannot_be_cancelled_is_not_restarted_there(
        make_harness, tiny_llama_dir):
    """Slurm does not answer the cancel (or the autoscaler asks between the failure and the cancel): the allocation
    still looks running, and still no new instance starts on it."""
    h = make_harness(allocate_on_demand=True, cpu_slots_per_node=1)
    deploy(h, tiny_llama_dir, tensor_parallel=2)
    job = h.controller.route_once("tp").job_id
    start_job(h, job, ("n1", "n2"))
    h.register("n1", gpus=0, job=job)
    iid = h.controller.route_once("tp").instance_id
    agent = h.agents.agents["http://n1:9000"]
    agent.update(iid, state="failed", error="rank 1: corrupt")
    h.backend.down = True
    h.heartbeat("n1")
    assert h.registry.get_allocation(job).state == "cancelling"  # given up, although scancel did not get through
    h.agents.started.clear()
    h.backend.down = False
    again = h.controller.route_once("tp")
    assert again.status == "allocating" and h.agents.started == [], (again, h.agents.started)


def test_a_late_failed_report_of_the_agent_process_before_a_restart_keeps_the_allocation(
        make_harness, tiny_llama_dir):
    """The agent of a spanning allocation restarts (Slurm's job lives on) and registers again; a heartbeat its old
    process sent before it died, listing the instance failed (its ranks ended with it), arrives after that. It is
    not the node's report: the allocation, the new agent's, must not be cancelled (scancel of the whole job)."""
    from hpcllm.controller.errors import AgentReplaced
    from hpcllm.controller.protocol import Heartbeat
    from hpcllm.controller.tests.doubles import FakeNodeAgent

    old_process, new_process = "a" * 32, "b" * 32
    h = make_harness(allocate_on_demand=True, cpu_slots_per_node=1)
    deploy(h, tiny_llama_dir, tensor_parallel=2)
    job = h.controller.route_once("tp").job_id
    start_job(h, job, ("n1", "n2"))
    h.register("n1", gpus=0, job=job, agent_process=old_process)
    iid = h.controller.route_once("tp").instance_id
    agent = h.agents.agents["http://n1:9000"]
    agent.update(iid, state="failed", error="the node agent that started this worker is gone; stopping")
    late_report = Heartbeat(instances=list(agent.instances.values()), agent_process=old_process)
    h.agents.agents["http://n1:9000"] = FakeNodeAgent("http://n1:9000")  # the new process, without workers
    h.register("n1", gpus=0, job=job, agent_process=new_process)
    with pytest.raises(AgentReplaced):
        h.controller.heartbeat("n1", late_report)
    assert ("cancel", job) not in h.backend.calls
    assert h.registry.get_allocation(job).state == "running"


# ---------------------------------------------------------------------------------- where a spanning instance goes


def slices_left_on(h, node: str, *ranks: int, degree: int = 2) -> None:
    """An agent on `node` kept the model's slice copies of `ranks` (hpcllm cache warm --tensor-parallel) on its
    persistent NVMe (4 GB/s; shared FS 1 GB/s), then its job ended: the node is idle, its copies stay known."""
    h.register(node, gpus=0, cached=tuple(("tp", "nvme", degree, r) for r in ranks))
    h.registry.node_left(node, "gone")


def slurm_says(h, waits: dict[tuple[str, ...], float], default: float = 0.0) -> None:
    """sbatch --test-only: a job of the asked shape starts after waits[its nodelist] seconds (default otherwise)."""
    from hpcllm.slurm.base import StartEstimate

    h.backend.start_estimate_for = lambda spec: StartEstimate(
        start_time=h.clock.now + waits.get(tuple(spec.nodelist or ()), default), source="test-only")


def asked_shapes(h) -> list[tuple]:
    return [(spec.nodes, spec.ntasks_per_node, tuple(spec.nodelist or ())) for call, spec in h.backend.calls
            if call == "estimate_start"]


def test_a_spanning_allocation_asks_for_the_nodes_holding_its_ranks_slices(make_harness, tiny_llama_dir):
    h = make_harness(allocate_on_demand=True, cpu_slots_per_node=1)
    deploy(h, tiny_llama_dir, tensor_parallel=2)  # CPU ranks, one slot per node: 2 nodes x 1 rank
    slices_left_on(h, "n3", 0)
    slices_left_on(h, "n4", 1)
    slurm_says(h, {})  # every shape starts now

    answer = h.controller.route_once("tp")
    [spec] = h.backend.submitted()
    assert answer.status == "allocating" and tuple(spec.nodelist) == ("n3", "n4")  # rank 0 on n3, rank 1 on n4
    assert (spec.nodes, spec.ntasks_per_node) == (2, 1)
    # Slurm was asked about the whole shape: anywhere, and on the node sets holding slices.
    shapes = asked_shapes(h)
    assert (2, 1, ()) in shapes and (2, 1, ("n3", "n4")) in shapes, shapes

    # The allocation comes up there: the instance's estimate is its slowest rank's, each from its node's copy.
    start_job(h, answer.job_id, ("n3", "n4"))
    h.register("n3", gpus=0, job=answer.job_id, cached=(("tp", "nvme", 2, 0),))  # its agent reports its copy
    assert h.controller.route_once("tp").status == "starting"
    [inst] = h.controller.status().instances
    p = inst.placement
    assert (p.tier, p.bandwidth_gbps, p.slowest_rank) == ("nvme", 4.0, 0), p
    assert p.load_seconds == pytest.approx(1000 / 4e9)
    assert f"allocation {answer.job_id} of 2 nodes" in p.queue_wait_source


def test_a_rank_without_its_slices_on_its_node_decides_the_estimate(make_harness, tiny_llama_dir):
    h = make_harness(allocate_on_demand=True, cpu_slots_per_node=1)
    deploy(h, tiny_llama_dir, tensor_parallel=2)
    slices_left_on(h, "n2", 0)  # only rank 0's slices, on n2
    job = h.controller.route_once("tp").job_id
    # Rank 0 runs on n2 (its first node) and reads its copy there; rank 1, on n3, reads the shared FS.
    start_job(h, job, ("n2", "n3"))
    h.register("n2", gpus=0, job=job, cached=(("tp", "nvme", 2, 0),))
    h.controller.route_once("tp")
    [inst] = h.controller.status().instances
    assert (inst.placement.tier, inst.placement.slowest_rank) == ("sharedfs", 1)
    # Slurm ordered the other way round (n3 first, numbers by value: n10 after n3), rank 0 would be on n3.
    from hpcllm.controller.placement import slurm_order

    assert slurm_order(["n10", "n3"]) == ["n3", "n10"]


def test_slurm_queue_wait_for_the_whole_shape_outweighs_the_slice_copies(make_harness, tiny_llama_dir):
    h = make_harness(allocate_on_demand=True, cpu_slots_per_node=1)
    deploy(h, tiny_llama_dir, tensor_parallel=2)
    slices_left_on(h, "n3", 0)
    slices_left_on(h, "n4", 1)
    slurm_says(h, {("n3", "n4"): 300.0})  # those two nodes are busy for 5 minutes; any others start now

    assert h.controller.route_once("tp").status == "allocating"
    [spec] = h.backend.submitted()
    # Not the busy nodes holding the slices: two other idle ones, by name (no two agents of ours on one node).
    assert spec.nodelist == ("n1", "n2") and (spec.nodes, spec.ntasks_per_node) == (2, 1)


def test_without_a_slurm_estimate_the_constant_stands_in_and_the_slices_decide(make_harness, tiny_llama_dir):
    h = make_harness(allocate_on_demand=True, cpu_slots_per_node=1)  # the backend gives no estimate
    deploy(h, tiny_llama_dir, tensor_parallel=2)
    slices_left_on(h, "n1", 0, 1)  # both ranks' slices on n1: one of the two nodes of a set
    slices_left_on(h, "n2", 1)

    h.controller.route_once("tp")
    [spec] = h.backend.submitted()
    # n1 runs rank 0 (held) and n2 rank 1 (held): better than n1 + any other node, where rank 1 reads the shared FS.
    assert tuple(spec.nodelist) == ("n1", "n2")


def test_a_whole_nvme_copy_serves_a_spanning_rank_on_its_node_but_not_a_dram_copy(make_harness, tiny_llama_dir):
    """Each rank finds its own node's whole NVMe copy (hpcllm worker --tensor-parallel); a DRAM copy is an agent's."""
    from hpcllm.controller.placement import NodeSetCandidate, spanning_estimate

    h = make_harness(allocate_on_demand=True, cpu_slots_per_node=1)
    deploy(h, tiny_llama_dir, tensor_parallel=2)
    h.register("n3", gpus=0, cached=(("tp", "nvme"),))
    h.registry.node_left("n3", "gone")
    slices_left_on(h, "n4", 1)
    h.controller.route_once("tp")
    [spec] = h.backend.submitted()
    assert tuple(spec.nodelist) == ("n3", "n4")

    bw = {"dram": 20.0, "nvme": 4.0, "sharedfs": 1.0}
    on = NodeSetCandidate("a,b", ("a", "b"), "idle", 0.0, (bw, bw))
    dram_on_a = spanning_estimate(on, 1000, 2, None, {"a": {"dram"}, "b": {"nvme"}})
    assert (dram_on_a.tier, dram_on_a.bandwidth_gbps, dram_on_a.slowest_rank) == ("sharedfs", 1.0, 0)
    assert spanning_estimate(on, 1000, 2, None, {"a": {"nvme"}, "b": {"nvme"}}).tier == "nvme"


def test_the_record_names_the_node_copies_the_ranks_read_where_the_shared_fs_measured_faster(
        make_harness, tiny_llama_dir):
    """Issue 14's e2e failure: on the dev cluster the "NVMe" and the shared FS are one disk, and an agent's probes
    measure either faster (seen: nvme 0.83 GB/s, sharedfs 1.16 GB/s). A rank takes its node's slice copy whatever
    the probes said (hpcllm worker --tensor-parallel), so the instance's record must say nvme, at the NVMe's
    bandwidth, not the shared FS that only measured faster."""
    h = make_harness(allocate_on_demand=True, cpu_slots_per_node=1)
    deploy(h, tiny_llama_dir, tensor_parallel=2)
    slices_left_on(h, "n3", 0)
    slices_left_on(h, "n4", 1)
    job = h.controller.route_once("tp").job_id
    assert tuple(h.backend.submitted()[0].nodelist) == ("n3", "n4")

    start_job(h, job, ("n3", "n4"))
    # The allocation's agent on n3 measured its tiers afresh: the shared FS faster than the NVMe.
    h.register("n3", gpus=0, job=job, cached=(("tp", "nvme", 2, 0),), nvme_gbps=0.83, sharedfs_gbps=1.16)
    assert h.controller.route_once("tp").status == "starting"
    [inst] = h.controller.status().instances
    p = inst.placement
    assert (p.tier, p.bandwidth_gbps, p.slowest_rank) == ("nvme", 0.83, 0), p
    assert p.load_seconds == pytest.approx(1000 / 0.83e9)


def test_a_spanning_rank_reads_its_node_copy_at_the_nvme_bandwidth_measured_or_not():
    """The estimate follows what a rank reads: its node's copy when there is one (at the NVMe's measured bandwidth;
    the shared FS's where the node measured none), else the origin."""
    from hpcllm.controller.placement import NodeSetCandidate, spanning_estimate, spanning_rank_loads

    fast_origin = {"nvme": 0.5, "sharedfs": 2.0}
    unmeasured = {"sharedfs": 1.5}
    on = NodeSetCandidate("a,b", ("a", "b"), "idle", 0.0, (fast_origin, unmeasured))
    holding = {"a": {"nvme:r0"}, "b": {"nvme"}}
    loads = spanning_rank_loads(on, 1000, 2, None, holding)
    assert loads == [("nvme", pytest.approx(1000 / 0.5e9), 0.5), ("nvme", pytest.approx(1000 / 1.5e9), 1.5)]
    slowest = spanning_estimate(on, 1000, 2, None, holding)
    assert (slowest.tier, slowest.bandwidth_gbps, slowest.slowest_rank) == ("nvme", 0.5, 0)
    # Without a copy on its node a rank reads the origin, however fast the node's NVMe.
    assert spanning_rank_loads(on, 1000, 2, None, {"b": {"nvme"}})[0] == ("sharedfs", pytest.approx(1000 / 2e9), 2.0)


def test_an_agent_registering_during_a_placement_gets_the_instance_not_a_second_allocation(
        make_harness, tiny_llama_dir):
    """The agent of the model's running allocation registers while a route is placing the model (after placement
    looked for its allocation's agents, before it asked which allocations are still pending): neither found nor
    pending, placement submitted a second allocation for the one instance."""
    h = make_harness(allocate_on_demand=True, cpu_slots_per_node=1)
    deploy(h, tiny_llama_dir, tensor_parallel=2)
    job = h.controller.route_once("tp").job_id
    start_job(h, job, ("n1", "n2"))
    note_demand = h.registry.note_demand

    def registering(*args, **kwargs):  # placement notes the demand in between: the agent registers then, once
        h.registry.note_demand = note_demand
        h.register("n1", gpus=0, job=job)
        return note_demand(*args, **kwargs)

    h.registry.note_demand = registering
    waiting = h.controller.route_once("tp")
    assert h.registry.get_node("n1").state == "up"  # the agent did register mid-placement
    assert len(h.backend.submitted()) == 1, [s.nodelist for s in h.backend.submitted()]
    assert (waiting.status, waiting.job_id) == ("allocating", job)
    started = h.controller.route_once("tp")
    assert started.status == "starting" and started.node_id == "n1" and len(h.backend.submitted()) == 1
