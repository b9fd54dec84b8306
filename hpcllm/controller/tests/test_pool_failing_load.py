"""A model pool whose model fails to load: its agent loads it again by itself (hpcllm node --model)."""

from __future__ import annotations

from hpcllm.controller.protocol import InstanceInfo
from hpcllm.controller.service import RECENT_FAILURES


def test_a_pool_whose_model_keeps_failing_to_load_does_not_hold_back_a_start_elsewhere(harness):
    """A pool's agent restarts its model after each failed load (hpcllm node --model): a load that fails late (too
    little GPU memory at its end) is loading nearly all the time. One cold start at a time per model made every
    request wait for that load ('starting' on the pool) for ever; once the pool has failed to load the model, its
    next load is no reason to wait: the model starts elsewhere."""
    harness.deploy("m", max_instances=2)
    harness.register("pool1", pool_model="m")
    agent = harness.agents._agent("http://pool1:9000")
    loading = dict(model="m", state="loading", worker_url=None, gpu_ids=[], load_tier="sharedfs")
    agent.add(InstanceInfo(instance_id="pool-m-1", **loading))
    harness.heartbeat("pool1")
    harness.register("n2")
    assert harness.controller.route("m").node_id == "pool1"  # a pool coming up: its load is waited for
    agent.update("pool-m-1", state="failed", error="CUDA out of memory")
    harness.heartbeat("pool1")
    agent.remove("pool-m-1")
    agent.add(InstanceInfo(instance_id="pool-m-2", **loading))  # its agent tries again
    harness.heartbeat("pool1")

    answer = harness.controller.route("m")
    assert (answer.status, answer.node_id) == ("starting", "n2"), answer
    assert [(url, model) for url, model, _ in harness.agents.started] == [("http://n2:9000", "m")]


def test_min_instances_are_kept_beside_a_pool_whose_model_keeps_failing_to_load(harness):
    harness.deploy("m", min_instances=1, max_instances=2, keep_alive_seconds=60)
    harness.register("pool1", pool_model="m")
    agent = harness.agents._agent("http://pool1:9000")
    loading = dict(model="m", state="loading", worker_url=None, gpu_ids=[], load_tier="sharedfs")
    agent.add(InstanceInfo(instance_id="pool-m-1", **loading))
    harness.register("n2")
    assert harness.tick(1).kinds() == []  # a pool coming up counts for min_instances
    agent.update("pool-m-1", state="failed", error="CUDA out of memory")
    harness.heartbeat("pool1")
    agent.remove("pool-m-1")
    agent.add(InstanceInfo(instance_id="pool-m-2", **loading))  # its agent tries again

    report = harness.tick(1)
    assert report.kinds() == [("start_min", "m")], report
    assert [(url, model) for url, model, _ in harness.agents.started] == [("http://n2:9000", "m")]
    harness.heartbeat("n2", tier="sharedfs")
    for _ in range(3):  # idle long past keep-alive, it is the model's minimum: not stopped (and started again)
        assert harness.tick(600).kinds() == []
    assert [i.node_id for i in harness.registry.instances(model="m") if i.state == "ready"] == ["n2"]


def test_a_pool_that_failed_to_load_is_not_waited_for_again_after_many_other_failures(harness):
    """`hpcllm status` lists only the latest instance failures: other nodes' failures since do not make the pool's
    next load one to wait for again."""
    harness.deploy("m", max_instances=2)
    harness.deploy("x")
    harness.register("pool1", pool_model="m")
    agent = harness.agents._agent("http://pool1:9000")
    loading = dict(model="m", state="loading", worker_url=None, gpu_ids=[], load_tier="sharedfs")
    agent.add(InstanceInfo(instance_id="pool-m-1", **loading))
    harness.heartbeat("pool1")
    agent.update("pool-m-1", state="failed", error="CUDA out of memory")
    harness.heartbeat("pool1")
    agent.remove("pool-m-1")
    agent.add(InstanceInfo(instance_id="pool-m-2", **loading))  # its agent tries again
    harness.heartbeat("pool1")
    harness.register("n3")
    other = harness.agents._agent("http://n3:9000")
    for k in range(RECENT_FAILURES):  # another model fails to load on another node, again and again
        other.add(InstanceInfo(instance_id=f"x-{k}", model="x", state="failed", error="bad checkpoint", gpu_ids=[]))
        harness.heartbeat("n3")
        other.remove(f"x-{k}")
    assert all(f.node_id == "n3" for f in harness.controller.status().failed_instances)
    harness.register("n2")

    answer = harness.controller.route("m")
    assert answer.status == "starting" and answer.node_id != "pool1", answer
