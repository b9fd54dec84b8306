"""What a gateway process remembers of the controller's answers, so serving survives a controller outage.

The controller owns placement; the gateway asks it for every request. When it cannot be asked (killed, restarting,
its host down), requests for a model that has a ready instance must still be served: the gateway goes on routing to
the instances the controller named ready recently, after checking that the worker still answers /ready for that
model (so a port reused by another model's worker never gets this model's prompts). A model with no remembered
instance (a cold start) waits for the controller to come back. Each gunicorn process remembers what it routed;
the model list is remembered too (the last one fetched). A route is remembered with the key its worker accepts and
the API key group it was made for, and reused for that group only: a group's own pool never gets another group's
prompts from memory either (docs/security.md). A model pool's route (its group's or a shared pool) is served from
memory for a shorter time: an admin may revoke its token at any moment, and the outage hides that from the gateway,
so a pool revoked just before it stays routable only for pool_ttl_s, while the service's own instances keep serving.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownInstance:
    instance_id: str
    worker_url: str
    worker_key: str | None = None  # the key its worker accepts (None: the cluster secret)
    group: str | None = None  # the API key group the controller routed it for
    pool: bool = False  # a model pool's node, whose token may be revoked


class KnownRoutes:
    """Per model, the instances the controller routed to within the last ttl_s seconds, pools' within pool_ttl_s
    (thread-safe)."""

    def __init__(self, ttl_s: float, pool_ttl_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self._ttl_s = ttl_s
        self._pool_ttl_s = ttl_s if pool_ttl_s is None else min(pool_ttl_s, ttl_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, dict[KnownInstance, float]] = {}

    def remember(self, model: str, instance: KnownInstance) -> None:
        with self._lock:
            self._seen.setdefault(model, {})[instance] = self._clock()

    def forget(self, model: str, worker_url: str) -> None:
        """The worker refused or could not be reached: do not route there from memory again."""
        with self._lock:
            for instance in [i for i in self._seen.get(model, {}) if i.worker_url == worker_url]:
                del self._seen[model][instance]

    def candidates(self, model: str, group: str | None = None) -> list[KnownInstance]:
        """The model's remembered instances routed for `group` still within their ttl, in random order (spreads the
        load)."""
        now = self._clock()
        with self._lock:
            seen = self._seen.get(model, {})
            for instance in [i for i, at in seen.items() if now - at > self._ttl_of(i)]:
                del seen[instance]
            fresh = [i for i in seen if i.group == group]
        random.shuffle(fresh)
        return fresh

    def _ttl_of(self, instance: KnownInstance) -> float:
        return self._pool_ttl_s if instance.pool else self._ttl_s

    def __bool__(self) -> bool:
        with self._lock:
            return any(self._seen.values())
