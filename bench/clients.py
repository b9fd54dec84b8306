"""Concurrent client threads for the benches: started together, all waited for."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def run_clients(client: Callable[[int], None], count: int) -> float:
    """Run client(0) ... client(count - 1), each on its own thread, at once; the wall seconds until the last one
    returned (a client reports its own errors: an exception ends only its thread)."""
    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began
