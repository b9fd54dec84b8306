"""A controller restarted between revoking a pool token and marking its node lost (revoke_credential does both, in
two steps): the restarted controller finishes the revoke, so no prompt goes to that node's instances."""

from __future__ import annotations

import pytest

from hpcllm.controller.errors import NoCapacity
from hpcllm.controller.tests.test_pools import pool_instance, pool_node


@pytest.mark.parametrize("agent_answers", [True, False])
def test_a_restart_routes_nothing_to_the_instances_of_a_node_whose_token_was_revoked(make_harness, agent_answers):
    h = make_harness(allocate_on_demand=False)
    h.deploy("m")
    issued = pool_node(h, "pool1", "71", "physics")
    pool_instance(h, "pool1", "m", "pool-m-1")  # known to the registry, routed to
    assert h.controller.route_once("m", group="physics").instance_id == "pool-m-1"
    h.registry.revoke_credential(issued.credential_id, h.clock())  # the controller stops before node_left
    if not agent_answers:
        h.agents.unreachable.add("http://pool1:9000")

    h.restart_controller()

    assert h.registry.get_node("pool1").state == "lost"
    with pytest.raises(NoCapacity):
        h.controller.route_once("m", group="physics")
