"""free_port: the ports a test starts its servers on."""

from __future__ import annotations

from hpcllm.tests.ports import free_port


def test_free_port_never_hands_out_the_same_port_twice():
    # A test picks its controller's and gateway's ports with two calls before either binds; the same port twice
    # left the gateway unable to bind (CI: both URLs were :29414). 500 random draws from ~17,000 ports repeat one
    # with near certainty unless handed-out ports are excluded.
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)

