"""Keep-alive across a controller restart."""

from __future__ import annotations


def test_a_restarted_controller_does_not_stop_instances_the_gateway_used_while_it_was_down(harness):
    """While the controller is down the gateway serves from the routes it remembers (docs/gateway.md, "Serving
    survives the control plane"): the controller sees none of those requests, so an instance's last use it knows
    is from before the outage. At the first tick after a restart every instance idle in that heartbeat looked idle
    since then and was stopped - the model's next request a cold start. Their idle clocks start again instead."""
    harness.deploy("m", keep_alive_seconds=300)
    harness.register("n1")
    outcome = harness.controller.start_instance(harness.registry.get_model("m"))
    harness.heartbeat("n1", tier="sharedfs")
    harness.tick(10)
    harness.clock.advance(900)  # the controller is down for 15 minutes, the gateway routes to n1 meanwhile

    harness.restart_controller()

    assert harness.tick(5).kinds() == []
    assert harness.registry.get_instance(outcome.instance_id).state == "ready"
    assert ("stop_idle", outcome.instance_id) in harness.tick(300).kinds()  # idle for a keep-alive since


def test_a_restart_keeps_each_instances_last_use_and_stops_the_least_recently_used_first(harness):
    """The restart does not rewrite when an instance was last used: `hpcllm status` still shows it, and of two
    instances idle a keep-alive after the restart the one used longer ago stops (min_instances keeps the other)."""
    harness.deploy("m", keep_alive_seconds=300, min_instances=1, max_instances=2)
    harness.register("n1")
    for _ in range(2):
        outcome = harness.controller.start_instance(harness.registry.get_model("m"))
        harness.heartbeat(outcome.node_id, tier="sharedfs")
    used_last, used_first = sorted(i.instance_id for i in harness.registry.instances() if i.state == "ready")
    harness.clock.advance(10)
    harness.registry.note_routed(used_first, harness.clock.now)
    harness.clock.advance(10)
    harness.registry.note_routed(used_last, harness.clock.now)  # by id it would be the first to stop
    used = {i.instance_id: i.last_used for i in harness.controller.status().instances}
    harness.clock.advance(900)  # the controller is down for 15 minutes

    harness.restart_controller()

    assert {i.instance_id: i.last_used for i in harness.controller.status().instances} == used
    assert harness.tick(5).kinds() == []
    assert [a for a in harness.tick(300).kinds() if a[0] == "stop_idle"] == [("stop_idle", used_first)]
