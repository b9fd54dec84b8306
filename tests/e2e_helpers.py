"""Small helpers shared by the end-to-end tests in tests/ (real processes on the dev Slurm cluster)."""

from __future__ import annotations

import socket
import time


def wait_for(predicate, timeout: float, what: str):
    """Polls predicate every 0.5 s until it returns something truthy (returned), or fails naming `what`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
