"""Keep-alive across a controller restart."""

from __future__ import annotations

from hpcllm.controller.tests.test_pool_restart import restart


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

    restart(harness)

    assert harness.tick(5).kinds() == []
    assert harness.registry.get_instance(outcome.instance_id).state == "ready"
    assert ("stop_idle", outcome.instance_id) in harness.tick(300).kinds()  # idle for a keep-alive since
