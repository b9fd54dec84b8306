"""Demand (a route that found no capacity) remembers whose request it was: a group's own pool that comes up answers
its group's demand, so the autoscaler starts no public instance for it; another group's demand it does not answer."""

from __future__ import annotations

import pytest

from hpcllm.controller.errors import NoCapacity
from hpcllm.controller.tests.test_pools import group_pool, pool_instance


def no_capacity_for(h, group: str | None) -> None:
    with pytest.raises(NoCapacity):
        h.controller.route_once("m", group=group)  # no node may host it now: demand is noted


@pytest.fixture
def physics_pool_loading(make_harness):
    """m deployed; physics' own pool of m registered, its instance not ready yet; no other node."""
    h = make_harness(allocate_on_demand=False)
    h.deploy("m", keep_alive_seconds=3600, max_instances=2)
    group_pool(h, "pool1", "71", "physics")
    return h


def test_a_groups_demand_its_own_pool_serves_starts_no_public_instance(physics_pool_loading):
    h = physics_pool_loading
    no_capacity_for(h, "physics")

    pool_instance(h, "pool1", "m", "pool-m-1")  # physics' pool's load is done: it serves physics' requests
    h.register("n2")  # room comes
    assert h.tick(1).kinds() == []
    assert h.agents.started == []
    assert h.registry.demand() == {}  # answered
    assert h.controller.route_once("m", group="physics").instance_id == "pool-m-1"


def test_the_demand_of_a_group_its_pool_cannot_serve_still_starts_the_model(physics_pool_loading):
    h = physics_pool_loading
    no_capacity_for(h, "physics")
    no_capacity_for(h, None)  # an API key without a group: physics' pool is not for it

    pool_instance(h, "pool1", "m", "pool-m-1")
    h.register("n2")
    assert h.tick(1).kinds() == [("start_for_demand", "m")]
    assert [(url, model) for url, model, _ in h.agents.started] == [("http://n2:9000", "m")]
    assert set(h.registry.demand()["m"].groups) == {None}  # physics' part is answered; the rest until n2 is ready
    h.heartbeat("n2", tier="sharedfs")
    assert h.tick(1).kinds() == [] and h.registry.demand() == {}


def test_demand_noted_before_groups_were_recorded_is_everyones(physics_pool_loading):
    """A row of an older controller (no groups): as before, only what serves everyone answers it."""
    h = physics_pool_loading
    with h.registry._tx() as db:
        db.execute("INSERT INTO demand (model, since, last) VALUES ('m', ?, ?)", (h.clock.now, h.clock.now))
    pool_instance(h, "pool1", "m", "pool-m-1")
    h.register("n2")
    assert h.tick(1).kinds() == [("start_for_demand", "m")]
