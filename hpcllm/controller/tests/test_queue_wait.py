"""Queue wait from Slurm: placement asks `sbatch --test-only` (new allocations) and `squeue --start` (our queued
ones) when a new or queued allocation would start, per candidate node set, with a short cache and a back-off; the
constant allocation_start_estimate_seconds only when Slurm gives no estimate."""

from __future__ import annotations

import threading

from hpcllm.controller.tests.conftest import GB
from hpcllm.slurm.base import StartEstimate
from hpcllm.slurm.cli_backend import parse_squeue_start, parse_test_only
from hpcllm.slurm.errors import SlurmUnavailable

AGENT_START = 10.0


def slurm_says(h, starts: dict[tuple[str, ...], float]):
    """--test-only answers: nodelist (() = any node) -> seconds from now."""
    h.backend.start_estimate_for = lambda spec: StartEstimate(
        h.clock.now + starts[tuple(spec.nodelist or ())], "test-only", partition="debug")


def test_parse_sbatch_test_only_and_squeue_start():
    text = "sbatch: Job 1234 to start at 1796290893 using 4 processors on nodes n[1-2] in partition batch\n"
    assert parse_test_only(text) == StartEstimate(1796290893.0, "test-only", ("n1", "n2"), "batch")
    assert parse_test_only("allocation failure: Requested node configuration is not available") is None
    out = "17|1796290900|n3|batch\n18|N/A|(null)|high\n"
    assert parse_squeue_start(out) == {"17": StartEstimate(1796290900.0, "squeue-start", ("n3",), "batch")}


def _free_n1_and_cached_n2(make_harness, slurm_wait: float, **settings):
    """Model m (8 GB): n1 has an agent with room and nothing cached; n2, idle in sinfo, holds m on NVMe; Slurm
    says a job (anywhere, or on n2) starts in slurm_wait seconds."""
    h = make_harness(**settings)
    h.deploy("m", gpus=1, size_bytes=8 * GB)
    h.register("n1", gpus=2, sharedfs_gbps=1.0)
    h.registry.register_node(_registration("n2", "m"), h.clock.now - 100)
    h.registry.node_left("n2", "gone")
    slurm_says(h, {(): slurm_wait, ("n2",): slurm_wait})
    return h


def test_a_free_slot_now_beats_a_cached_node_slurm_says_starts_later(make_harness):
    # n1 runs an agent with room but nothing cached; n2 (idle in sinfo) holds the checkpoint on NVMe. The constant
    # (0 s here) would send the model to n2; Slurm says a job there starts in 5 minutes.
    h = _free_n1_and_cached_n2(make_harness, slurm_wait=300.0, allocation_start_estimate_seconds=0.0,
                               agent_start_seconds=AGENT_START)
    outcome = h.controller.route_once("m")
    assert (outcome.status, outcome.node_id) == ("starting", "n1")
    [inst] = h.registry.instances(model="m")
    assert inst.placement["queue_wait_source"] == "agent up"
    # When Slurm says n2 starts at once, the cached node wins: 0 + 10 s agent start + 8 GB / 4 GB/s < 8 s.
    h2 = _free_n1_and_cached_n2(make_harness, slurm_wait=0.0, allocation_start_estimate_seconds=60.0,
                                agent_start_seconds=1.0)
    outcome = h2.controller.route_once("m")
    assert outcome.status == "allocating"
    [spec] = h2.backend.submitted()
    assert spec.nodelist == ("n2",)
    [alloc] = h2.registry.allocations()
    assert alloc.preferred_nodes == ["n2"]


def test_estimates_are_cached_and_slurm_failures_back_off_to_the_constant(make_harness):
    h = make_harness(allocation_start_estimate_seconds=30.0, queue_estimate_ttl_seconds=3600.0)
    h.deploy("m", gpus=1)
    slurm_says(h, {(): 120.0})
    for _ in range(5):
        wait = h.allocator.new_allocation_wait(h.registry.get_model("m"), [], h.clock.now)
        assert (wait.seconds, wait.source) == (120.0 + 10.0, "slurm test-only")  # default agent_start_seconds
    assert h.backend.estimates_asked() == 1

    h2 = make_harness(allocation_start_estimate_seconds=30.0, queue_estimate_backoff_seconds=3600.0)
    h2.deploy("m", gpus=1)
    h2.backend.refuse_estimate = "Requested node configuration is not available"
    for _ in range(5):
        wait = h2.allocator.new_allocation_wait(h2.registry.get_model("m"), ["n3"], h2.clock.now)
        assert (wait.seconds, wait.source) == (30.0, "constant")
    assert h2.backend.estimates_asked() == 1  # then quiet for the back-off


def test_an_estimate_that_failed_after_a_command_timeout_is_not_asked_again_at_once(make_harness, monkeypatch):
    # A hung slurmctld: `sbatch --test-only` fails only after command_timeout_seconds (60 s), longer than the
    # back-off (15 s). The back-off counts from when it failed, or every cold route poll would wait 60 s again.
    h = make_harness(allocation_start_estimate_seconds=30.0, queue_estimate_backoff_seconds=15.0)
    model = h.deploy("m", gpus=1)
    monotonic = [1000.0]
    monkeypatch.setattr("hpcllm.controller.allocations.time.monotonic", lambda: monotonic[0])

    def hung_test_only(spec):
        monotonic[0] += 60
        raise SlurmUnavailable("sbatch --test-only timed out after 60 s")

    h.backend.start_estimate_for = hung_test_only
    for _ in range(3):
        wait = h.allocator.new_allocation_wait(model, ["n3"], h.clock.now)
        assert (wait.seconds, wait.source) == (30.0, "constant")
    assert h.backend.estimates_asked() == 1
    monotonic[0] += 16  # the back-off is over: Slurm is asked again
    assert h.allocator.new_allocation_wait(model, ["n3"], h.clock.now).source == "constant"
    assert h.backend.estimates_asked() == 2


def test_placements_at_once_while_test_only_hangs_ask_it_once(make_harness):
    # Route polls place outside the placement lock: each would start its own `sbatch --test-only` against a hung
    # slurmctld, and wait its command timeout.
    h = make_harness(allocation_start_estimate_seconds=30.0)
    model = h.deploy("m", gpus=1)
    entered, second_call = threading.Event(), threading.Event()
    calls = []

    def hung_test_only(spec):
        calls.append(threading.current_thread().name)
        if len(calls) > 1:
            second_call.set()
        else:
            entered.set()
            second_call.wait(timeout=5)  # a second --test-only started beside it (before the fix); else it times out
        raise SlurmUnavailable("sbatch --test-only timed out")

    h.backend.start_estimate_for = hung_test_only
    results = {}

    def place(name: str) -> threading.Thread:
        wait = lambda: results.__setitem__(name, h.allocator.new_allocation_wait(model, ["n3"], h.clock.now).source)
        thread = threading.Thread(target=wait, name=name)
        thread.start()
        return thread

    first = place("a")
    assert entered.wait(timeout=30)
    other = place("b")
    first.join(timeout=60)
    other.join(timeout=60)
    assert results == {"a": "constant", "b": "constant"}
    assert calls == ["a"]


def test_a_queued_allocation_waits_as_long_as_squeue_start_says(make_harness):
    h = make_harness(allocation_start_estimate_seconds=30.0, agent_start_seconds=AGENT_START)
    h.deploy("m", gpus=1)
    slurm_says(h, {(): 200.0})
    waiting = h.controller.route_once("m")
    assert waiting.status == "allocating"
    h.backend.queued_starts[waiting.job_id] = StartEstimate(h.clock.now + 200.0, "squeue-start")
    alloc = h.registry.get_allocation(waiting.job_id)
    wait = h.allocator.pending_wait(alloc, h.clock.now)
    assert (wait.seconds, wait.source) == (200.0 + AGENT_START, "slurm squeue --start")
    # Started, agent not registered yet: what is left of agent_start_seconds.
    h.backend.start(waiting.job_id, "n2", h.clock.now)
    h.tick(4)
    wait = h.allocator.pending_wait(h.registry.get_allocation(waiting.job_id), h.clock.now)
    assert (wait.seconds, wait.source) == (AGENT_START - 4, "job started")


def _registration(node_id: str, model: str):
    from hpcllm.controller.protocol import CacheEntry, NodeRegistration, Tiers, TierInfo

    tiers = Tiers(dram=TierInfo(capacity_bytes=64 * GB, read_gbps=20.0),
                  nvme=TierInfo(capacity_bytes=1000 * GB, read_gbps=4.0, scope="persistent"),
                  sharedfs=TierInfo(read_gbps=1.0))
    return NodeRegistration(node_id=node_id, agent_url=f"http://{node_id}:9000", slurm_job_id="1", gpus=2, tiers=tiers,
                            cached=[CacheEntry(model=model, tier="nvme", bytes=1, verified=True)])


def test_hpcllm_status_shows_the_queue_wait_and_its_source(make_harness, capsys, monkeypatch):
    from hpcllm.controller.cli import print_status

    monkeypatch.setenv("COLUMNS", "250")
    h = make_harness(agent_start_seconds=AGENT_START)
    h.deploy("m", gpus=1)
    slurm_says(h, {(): 95.0})
    waiting = h.controller.route_once("m")
    h.backend.queued_starts[waiting.job_id] = StartEstimate(h.clock.now + 80.0, "squeue-start")
    status = h.controller.status()
    [alloc] = status.allocations
    assert (alloc.queue_wait_seconds, alloc.queue_wait_source) == (80.0 + AGENT_START, "slurm squeue --start")
    print_status(status)
    out = capsys.readouterr().out
    assert "90 s (slurm squeue --start)" in out, out
    # Its agent registers and takes the instance: the instance shows the estimate placement made, with its source.
    h.backend.start(waiting.job_id, "n1", h.clock.now)
    h.tick(1)
    h.register("n1", job=waiting.job_id)
    h.tick(1)
    [inst] = h.controller.status().instances
    assert inst.placement.queue_wait_source == "agent up"
    assert h.controller.status().allocations[0].queue_wait_seconds is None  # its agent is up
