"""A group's own model pools and a model whose instance spans nodes (docs/tensor-parallel.md, "Ranks across nodes"):
a start asked for on a group's behalf counts what that group may be routed to, as for a model on one node."""

from __future__ import annotations

from hpcllm.controller.protocol import MigrationTargetRequest, ModelSpec, RouteWaiting
from hpcllm.controller.tests.test_pools import pool_instance, pool_node


def test_a_draining_pools_requests_wait_for_their_groups_other_pool_loading_a_spanning_model(
        make_harness, tiny_llama_dir):
    h = make_harness(allocate_on_demand=True, cpu_slots_per_node=1)
    h.controller.deploy(ModelSpec(name="tp", source=str(tiny_llama_dir), size_bytes=1000, tensor_parallel=2, nodes=2,
                                  keep_alive_seconds=3600))
    pool_node(h, "pool1", "71", "physics", model="tp")
    pool_instance(h, "pool1", "tp", "pool-tp-1")
    pool_node(h, "pool2", "72", "physics", model="tp")
    h.agents._agent("http://pool2:9000").add(h.agents._agent("http://pool1:9000").instances["pool-tp-1"].model_copy(
        update={"instance_id": "pool-tp-2", "state": "loading", "worker_url": None}))
    h.heartbeat("pool2")
    h.registry.set_node_state("pool1", "draining")  # its job ends: its agent asks where its requests may go

    answer = h.controller.migration_target(MigrationTargetRequest(model="tp", exclude_node="pool1",
                                                                  instance_id="pool-tp-1"))

    # They wait for the physics pool already loading the model, not for a new allocation of two nodes.
    assert isinstance(answer, RouteWaiting)
    assert (answer.status, answer.node_id, answer.instance_id) == ("starting", "pool2", "pool-tp-2")
    assert h.backend.submitted() == []
