"""No capacity now is waited out like a job queued in Slurm, within the route call's wait (the gateway's cold-start
budget), instead of a 503 at once; a refused allocation is still answered at once."""

from __future__ import annotations

import threading
import time

import pytest

from hpcllm.controller.errors import AllocationRefused, NoCapacity, NoCapacityPossible


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
    assert time.monotonic() - started < 5  # not the 10 s wait
    assert raised.value.code == "allocation_failed"
    assert sum(1 for call, _ in h.backend.calls if call == "submit") == 1


# ------------------------------------------------------------------ no capacity possible: answered at once

def test_a_model_no_node_can_ever_hold_is_answered_at_once_with_what_to_change(make_harness):
    """4 GPUs per instance, the only node has 2, and no allocation may be made: certain at the first call, so the
    route answers at once (not after its wait), without Retry-After, saying why and what to change."""
    h = make_harness(allocate_on_demand=False)
    h.deploy("big", gpus=4)
    h.register("n1", gpus=2)
    started = time.monotonic()
    with pytest.raises(NoCapacityPossible) as raised:
        h.controller.route("big", wait_seconds=10)
    assert time.monotonic() - started < 5  # before: the whole 10 s wait, then the same NoCapacity
    message = str(raised.value)
    assert "needs 4 GPUs on one node" in message and "largest node registered has 2 GPUs (n1)" in message, message
    assert "allocate_on_demand is off" in message and "Fix:" in message, message
    assert raised.value.retry_after is None
    assert h.registry.demand() == {}  # nothing will ever start it: no demand left for the autoscaler

    resp = h.app_client().get("/v1/internal/route?model=big&wait=10", headers={"X-Hpcllm-Secret": "test-secret"})
    assert resp.status_code == 503 and "Retry-After" not in resp.headers
    assert resp.get_json()["error"]["code"] == "no_capacity_possible"
    assert resp.get_json()["error"]["message"] == message


def test_cpu_ranks_beyond_a_node_s_slots_are_answered_at_once_even_with_allocations(tmp_path, tiny_llama_dir):
    """Deployed with 2 CPU slots per node, the controller restarted with 1: a new allocation's node offers 1 slot
    for 2 ranks on one node, so neither a node nor an allocation can ever hold it; no sbatch is tried."""
    from hpcllm.controller.protocol import ModelSpec
    from hpcllm.controller.tests.conftest import Harness

    before = Harness(tmp_path, cpu_slots_per_node=2)
    model, _ = before.controller.deploy(ModelSpec(name="tp", source=str(tiny_llama_dir), size_bytes=1000,
                                                  tensor_parallel=2))
    assert model.nodes == 1
    before.registry.close()
    h = Harness(tmp_path, cpu_slots_per_node=1)
    try:
        h.register("n1", gpus=0)
        started = time.monotonic()
        with pytest.raises(NoCapacityPossible, match=r"needs 2 CPU slots .* a node offers 1 "
                                                     r"\(controller.cpu_slots_per_node\)") as raised:
            h.controller.route("tp", wait_seconds=10)
        assert time.monotonic() - started < 1.0
        assert "raise controller.cpu_slots_per_node to 2" in str(raised.value)
        assert h.backend.submitted() == [] and h.agents.started == []
    finally:
        h.registry.close()


def test_a_spanning_model_without_allocations_is_answered_at_once(make_harness, tiny_llama_dir):
    from hpcllm.controller.protocol import ModelSpec

    h = make_harness(cpu_slots_per_node=1, max_allocations=0)
    h.controller.deploy(ModelSpec(name="tp", source=str(tiny_llama_dir), size_bytes=1000, tensor_parallel=2))
    h.register("n1", gpus=0)
    h.register("n2", gpus=0)
    started = time.monotonic()
    with pytest.raises(NoCapacityPossible, match=r"\(2 ranks over 2 nodes, an allocation of its own\) runs only in "
                                                 r"a Slurm allocation .*controller.max_allocations = 0"):
        h.controller.route("tp", wait_seconds=10)
    assert time.monotonic() - started < 1.0


def test_deploy_refuses_more_cpu_ranks_on_one_node_than_it_has_slots(make_harness, tiny_llama_dir):
    from hpcllm.controller.errors import InvalidModelConfig
    from hpcllm.controller.protocol import ModelSpec

    h = make_harness(cpu_slots_per_node=1)
    with pytest.raises(InvalidModelConfig, match=r"2 CPU ranks on one node needs 2 CPU slots, but a node offers 1 "
                                                 r"\(controller.cpu_slots_per_node\)") as raised:
        h.controller.deploy(ModelSpec(name="tp", source=str(tiny_llama_dir), size_bytes=1000, tensor_parallel=2,
                                      nodes=1))
    assert raised.value.param == "nodes"
    assert h.registry.models() == []


def _no_node_yet(h):
    pass  # an agent may still register (started by hand, a freed node)


def _a_lost_node_big_enough(h):
    h.register("n2", gpus=2)
    h.register("n1", gpus=4)
    h.registry.node_left("n1", "lost")  # its agent may come back


def _a_pool_token_for_the_model(h):
    from hpcllm.controller.protocol import PoolTokenRequest

    h.register("n2", gpus=2)
    # Its pool job may still start, and serve every API key (--shared; another group's own pool never would:
    # test_pool_groups_capacity.py).
    h.controller.issue_pool_token(PoolTokenRequest(model="big", group="physics", shared=True))


def _an_allocation_on_its_way(h):
    h.register("n2", gpus=2)
    # A submission not settled yet (left by a crash, before allocate_on_demand was turned off): its node, of a size
    # nobody knows yet, may register.
    h.registry.add_allocation_intent("hpcllm-alloc-left", "other", [], "debug", 3600, h.clock.now)


def _a_big_node_busy(h):
    h.deploy("other", gpus=4)
    h.register("n1", gpus=4)
    assert h.controller.route("other").status == "starting"  # loading on n1: full until it is released


@pytest.mark.parametrize("situation", [_no_node_yet, _a_lost_node_big_enough, _a_pool_token_for_the_model,
                                       _an_allocation_on_its_way, _a_big_node_busy],
                         ids=lambda f: f.__name__.strip("_"))
def test_no_capacity_that_may_still_come_is_waited_out(make_harness, situation):
    """Without allocations, a 4-GPU model fits none of the nodes up (if any); but a node may still come or free up:
    the route waits its whole wait, then answers the temporary NoCapacity, as before."""
    h = make_harness(allocate_on_demand=False)
    h.deploy("big", gpus=4)
    situation(h)
    started = time.monotonic()
    with pytest.raises(NoCapacity) as raised:
        h.controller.route("big", wait_seconds=1.2)
    assert time.monotonic() - started >= 1.2
    assert not isinstance(raised.value, NoCapacityPossible), raised.value
    assert raised.value.code == "no_capacity" and raised.value.retry_after


def test_an_agent_registering_while_capacity_is_judged_is_no_capacity_never_possible(make_harness):
    """An allocation (made before allocate_on_demand was turned off) is starting: its node, of a size nobody knows
    yet, may host the 4-GPU model. Its agent registers (4 GPUs) while the route judges whether capacity can ever
    come, after that judgement read the registered nodes (only n2's 2 GPUs) and before it asked whether an
    allocation is on its way (its agent has registered: none). The route answered 'can never start here: the largest
    node registered has 2 GPUs' (permanent, no retry) while a 4-GPU node had just registered."""
    h = make_harness(allocate_on_demand=False)
    h.deploy("big", gpus=4)
    h.register("n2", gpus=2)
    h.registry.add_allocation("77", "other", [], "debug", 3600, h.clock.now)
    h.registry.update_allocation("77", state="running", started_at=h.clock.now)
    judge, nodes = h.controller.why_never_capacity, h.registry.nodes

    def registering_after_the_first_read(*args, **kwargs):
        h.registry.nodes = nodes
        read = nodes(*args, **kwargs)
        h.register("n1", gpus=4, job="77")
        return read

    def judging(*args, **kwargs):
        h.controller.why_never_capacity = judge
        h.registry.nodes = registering_after_the_first_read
        return judge(*args, **kwargs)

    h.controller.why_never_capacity = judging
    with pytest.raises(NoCapacity) as raised:
        h.controller.route_once("big")
    assert h.registry.get_node("n1").state == "up"  # the agent did register mid-judgement
    assert not isinstance(raised.value, NoCapacityPossible), raised.value
    assert raised.value.retry_after
    started = h.controller.route_once("big")
    assert (started.status, started.node_id) == ("starting", "n1")
