"""A TCP port for a test's server: outside the kernel's ephemeral range, so no client connection on this busy host
takes it as its source port between the test choosing it and the server binding it (seen: a controller restarted
by test_restart found its port "already in use"), and never one it handed out before in this process (two calls in a
row once gave a migration test's controller and gateway the same port, so the gateway could not bind)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 20000  # below: well-known and registered services' ports
_handed_out: set[int] = set()  # a port chosen but not yet bound is free to the probe: remember it instead


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def free_port() -> int:
    """A port nothing listens on now and not handed out before, chosen at random outside the ephemeral range."""
    low, high = ephemeral_range()
    ports = [port for port in range(LOWEST, 65536) if not low <= port <= high and port not in _handed_out]
    for port in random.SystemRandom().sample(ports, min(200, len(ports))):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free TCP port found in {LOWEST}-65535 outside the ephemeral range {low}-{high}")
