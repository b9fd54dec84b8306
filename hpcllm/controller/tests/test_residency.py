"""Minimum residency (controller.min_residency_seconds): an instance younger than that is not evicted to make room
for another model, so two models alternating on one full node stop reloading each other; the other model waits
for the node (202 "waiting") or goes elsewhere when that is sooner."""

from __future__ import annotations

from hpcllm.controller.tests.conftest import GB, SECRET
from hpcllm.httpkit.auth import SECRET_HEADER

RESIDENCY = 60.0


def one_full_node(make_harness, **settings):
    """n1 with 2 GPUs, two 2-GPU models a and b (each fills the node), both cached in n1's DRAM."""
    h = make_harness(min_residency_seconds=RESIDENCY, **settings)
    h.deploy("a", gpus=2, size_bytes=4 * GB)
    h.deploy("b", gpus=2, size_bytes=4 * GB)
    h.register("n1", gpus=2, cached=(("a", "dram"), ("b", "dram")))
    return h


def serve(h, model: str) -> str:
    """Route to `model` until an instance of it is ready on n1 (agents finish loading at each heartbeat)."""
    outcome = h.controller.route_once(model)
    if outcome.status == "ready":
        return outcome.instance_id
    h.heartbeat("n1", tier="dram", load_seconds=0.2)
    ready = h.controller.route_once(model)
    assert ready.status == "ready", ready
    return ready.instance_id


def resident(h) -> list[str]:
    return sorted(i.model for i in h.registry.instances(node_id="n1"))


def test_two_models_alternating_on_one_full_node_each_stay_for_the_minimum_residency(make_harness):
    h = one_full_node(make_harness, allocate_on_demand=False)
    serve(h, "a")
    placed_at = {"a": h.clock.now}
    evictions = []
    # Requests alternate every 5 s for 3 minutes: without residency each one would evict the other model.
    for step in range(1, 37):
        h.clock.advance(5)
        wanted = "b" if step % 2 else "a"
        other = "a" if wanted == "b" else "b"
        outcome = h.controller.route_once(wanted)
        if outcome.status == "waiting":
            assert outcome.node_id == "n1"
            assert resident(h) == [other]  # nothing stopped
            assert h.clock.now - placed_at[other] < RESIDENCY
            continue
        if outcome.status == "starting":
            evictions.append((other, h.clock.now - placed_at[other]))
            placed_at[wanted] = h.clock.now
            h.heartbeat("n1", tier="dram", load_seconds=0.2)
            assert resident(h) == [wanted]
    # b waits until a has served 60 s (its first request at 5 s; a is evicted at the first b request after 60 s,
    # at 65 s), then a waits for b the same way: two model changes in 180 s, each after the residency.
    assert evictions == [("a", 65.0), ("b", 65.0)]


def test_a_waiting_model_starts_by_itself_once_the_residency_is_served(make_harness):
    h = one_full_node(make_harness, allocate_on_demand=False)
    a = serve(h, "a")
    h.clock.advance(10)
    waiting = h.controller.route_once("b")
    assert (waiting.status, waiting.node_id) == ("waiting", "n1")
    assert h.agents.stopped == []
    # The autoscaler's demand step retries; nobody has to ask again.
    report = h.tick(RESIDENCY - 10 - 1)
    assert h.agents.stopped == [] and ("start_for_demand", "b") in report.kinds()
    h.tick(2)
    assert h.agents.stopped == [("http://n1:9000", a)]
    h.heartbeat("n1")
    assert resident(h) == ["b"]


def _a_serving_for_10_seconds(make_harness, min_residency_seconds: float, idle: bool = True):
    """Models a and b (2 GPUs each), both cached on n1 (2 GPUs), where a has served for 10 s (idle now: its
    agent's heartbeat reports no request running, unless idle is False)."""
    h = make_harness(min_residency_seconds=min_residency_seconds)
    h.deploy("a", gpus=2, size_bytes=4 * GB)
    h.deploy("b", gpus=2, size_bytes=4 * GB)
    h.register("n1", gpus=2, cached=(("a", "dram"), ("b", "dram")))
    serve(h, "a")
    h.clock.advance(10)
    if idle:
        h.heartbeat("n1")
    return h


def test_with_allocations_allowed_the_other_model_goes_elsewhere_when_that_is_sooner(make_harness):
    # A new allocation is estimated at 30 s; a waits 110 s more on n1: b is given a new allocation.
    h = _a_serving_for_10_seconds(make_harness, min_residency_seconds=120.0)
    outcome = h.controller.route_once("b")
    assert outcome.status == "allocating"
    assert h.agents.stopped == [] and resident(h) == ["a"]
    # Close to the end of a's residency, waiting is sooner than an allocation: b would wait instead.
    h2 = _a_serving_for_10_seconds(make_harness, min_residency_seconds=20.0)
    assert h2.controller.route_once("b").status == "waiting"
    assert h2.backend.submitted() == []
    # Unless a is busy with no other instance to take its requests: they would wait for a's own cold start.
    h3 = _a_serving_for_10_seconds(make_harness, min_residency_seconds=20.0, idle=False)
    assert h3.controller.route_once("b").status == "allocating"


def test_an_instance_past_its_residency_is_evicted_at_once(make_harness):
    h = one_full_node(make_harness, allocate_on_demand=False)
    a = serve(h, "a")
    h.clock.advance(RESIDENCY)
    outcome = h.controller.route_once("b")
    assert (outcome.status, outcome.node_id) == ("starting", "n1")
    assert h.agents.stopped == [("http://n1:9000", a)]


def test_the_route_api_answers_202_waiting_with_the_node(make_harness):
    h = one_full_node(make_harness, allocate_on_demand=False)
    serve(h, "a")
    h.clock.advance(10)
    resp = h.app_client().get("/v1/internal/route?model=b", headers={SECRET_HEADER: SECRET})
    assert resp.status_code == 202
    body = resp.get_json()
    assert (body["status"], body["model"], body["node_id"]) == ("waiting", "b", "n1")
    assert resp.headers.get("Retry-After")
