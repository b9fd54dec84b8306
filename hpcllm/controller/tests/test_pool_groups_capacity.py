"""No capacity possible (Controller.why_never_capacity) and model pools: a pool that may still serve the model
keeps the answer temporary only for the requests it may serve (its own group's, or everyone's for a --shared pool)."""

from __future__ import annotations

import pytest

from hpcllm.controller.errors import NoCapacity, NoCapacityPossible
from hpcllm.controller.protocol import NodeRegistration, PoolTokenRequest
from hpcllm.controller.tests.test_pools import pool_node


@pytest.fixture
def big_model(make_harness):
    """A 4-GPU model, only a 2-GPU node, no allocations: only a model pool of it could ever serve it."""
    h = make_harness(allocate_on_demand=False)
    h.deploy("big", gpus=4)
    h.register("n1", gpus=2)
    return h


def test_another_groups_pool_token_does_not_make_a_request_wait_for_capacity_that_never_comes(big_model):
    h = big_model
    h.controller.issue_pool_token(PoolTokenRequest(model="big", group="physics"))  # physics' pool job may start

    with pytest.raises(NoCapacityPossible, match=r"model 'big' can never start here: an instance needs 4 GPUs"):
        h.controller.route_once("big", group="chemistry")
    with pytest.raises(NoCapacityPossible):
        h.controller.route_once("big")  # an API key without a group
    with pytest.raises(NoCapacity) as physics:
        h.controller.route_once("big", group="physics")  # its own pool may still come: waited out
    assert not isinstance(physics.value, NoCapacityPossible)


def physics_pool_node(h):
    """A physics pool node of big, registered with its pool token, whose agent stopped answering (lost)."""
    token = pool_node(h, "pool1", "71", "physics", model="big")
    h.registry.node_left("pool1", "lost")
    return token


def test_another_groups_pool_node_does_not_make_a_request_wait_for_capacity_that_never_comes(big_model):
    h = big_model
    physics_pool_node(h)

    with pytest.raises(NoCapacityPossible):
        h.controller.route_once("big", group="chemistry")
    with pytest.raises(NoCapacity) as physics:
        h.controller.route_once("big", group="physics")  # its pool's agent may come back
    assert not isinstance(physics.value, NoCapacityPossible)


def test_a_lost_pool_node_on_the_cluster_secret_keeps_everyones_request_waiting(big_model):
    h = big_model
    h.controller.register(NodeRegistration(node_id="pool1", agent_url="http://pool1:9000", pool_model="big"))
    h.registry.node_left("pool1", "lost")  # an operator's pool for everyone: its agent may come back

    for group in ("chemistry", None):
        with pytest.raises(NoCapacity) as raised:
            h.controller.route_once("big", group=group)
        assert not isinstance(raised.value, NoCapacityPossible), raised.value


def test_a_pool_node_whose_token_is_revoked_does_not_make_its_groups_request_wait(big_model):
    """A revoked token's agent gets 401 for good: its lost node never serves again."""
    h = big_model
    token = physics_pool_node(h)
    h.controller.revoke_credential(token.credential_id)  # only the lost node is known now

    for group in ("physics", "chemistry", None):
        with pytest.raises(NoCapacityPossible, match=r"model 'big' can never start here"):
            h.controller.route_once("big", group=group)


def test_a_shared_pool_token_keeps_everyones_request_waiting(big_model):
    h = big_model
    h.controller.issue_pool_token(PoolTokenRequest(model="big", group="physics", shared=True))

    for group in ("chemistry", None):
        with pytest.raises(NoCapacity) as raised:
            h.controller.route_once("big", group=group)
        assert not isinstance(raised.value, NoCapacityPossible), raised.value
