"""A controller restarted while model pools run: what it takes from their agents (reconcile)."""

from __future__ import annotations

import pytest

from hpcllm.controller.errors import NoCapacity
from hpcllm.controller.protocol import InstanceInfo
from hpcllm.controller.tests.test_pools import pool_instance, pool_node


@pytest.mark.parametrize("shared", [False, True])
def test_a_restart_takes_no_instance_of_another_model_from_a_pool_tokens_agent(make_harness, shared):
    """A pool token serves its one model: a heartbeat announcing another model's instance is refused, and so is the
    same instance list when the restarted controller asks the pool's agent (its prompts must never go there)."""
    h = make_harness(allocate_on_demand=False)
    h.deploy("m")
    h.deploy("secret")
    pool_node(h, "pool1", "71", "physics", shared=shared)
    pool_instance(h, "pool1", "m", "pool-m-1")
    # The pool's agent now lists an instance of a model its token does not serve.
    h.agents._agent("http://pool1:9000").add(InstanceInfo(
        instance_id="pool-secret-1", model="secret", state="ready", worker_url="http://pool1:9000/workers/x",
        gpu_ids=[], load_tier="sharedfs", load_seconds=1.0))

    h.restart_controller()

    assert [i.instance_id for i in h.registry.instances(model="secret")] == []
    with pytest.raises(NoCapacity):
        h.controller.route("secret", group="physics")


def test_a_restart_takes_nothing_from_an_agent_whose_token_the_controller_no_longer_holds(make_harness):
    """A node registered with a token whose record is gone (its heartbeats would get 401): a restarted controller
    does not take that agent's instance list as the cluster secret's, which may announce any model."""
    h = make_harness(allocate_on_demand=False)
    h.deploy("m")
    h.deploy("secret")
    issued = pool_node(h, "pool1", "71", "physics")
    pool_instance(h, "pool1", "m", "pool-m-1")
    h.agents._agent("http://pool1:9000").add(InstanceInfo(
        instance_id="pool-secret-1", model="secret", state="ready", worker_url="http://pool1:9000/workers/x",
        gpu_ids=[], load_tier="sharedfs", load_seconds=1.0))
    with h.registry._tx() as db:  # the token's record is lost (a database restored from before it was issued)
        db.execute("DELETE FROM credentials WHERE credential_id = ?", (issued.credential_id,))

    h.restart_controller()

    assert [i.instance_id for i in h.registry.instances(model="secret")] == []
    with pytest.raises(NoCapacity):
        h.controller.route("secret")


def test_a_restart_takes_nothing_from_an_agent_whose_token_was_revoked(make_harness):
    """A node still up with a revoked token (the controller stopped between the revoke and marking the node lost;
    its heartbeats get 401 and its agent drains): a restarted controller takes no new instance from its list."""
    h = make_harness(allocate_on_demand=False)
    h.deploy("m")
    issued = pool_node(h, "pool1", "71", "physics")
    h.agents._agent("http://pool1:9000").add(InstanceInfo(
        instance_id="pool-m-2", model="m", state="ready", worker_url="http://pool1:9000/workers/x",
        gpu_ids=[], load_tier="sharedfs", load_seconds=1.0))
    h.registry.revoke_credential(issued.credential_id, h.clock())

    h.restart_controller()

    assert [i.instance_id for i in h.registry.instances(model="m")] == []
    with pytest.raises(NoCapacity):
        h.controller.route("m", group="physics")
