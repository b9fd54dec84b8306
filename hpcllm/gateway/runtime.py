"""What one gateway process holds: config, its Router, the shared limiter, metrics, tokenizers, an HTTP pool.

Nothing here decides placement: the Router is asked for every request. State that must agree across gunicorn
worker processes (rate-limit buckets, stream slots, which instances were counted as cold starts, stored responses)
lives in SharedState's database (SQLite, or PostgreSQL shared by every gateway host); metrics go through
prometheus_client's multiprocess files.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from flask import current_app

from hpcllm.config import ApiKey, Config
from hpcllm.controller.registry.databases import is_postgres_url
from hpcllm.gateway.errors import ServiceUnavailable
from hpcllm.gateway.metrics import GatewayMetrics
from hpcllm.gateway.ratelimit import RateLimiter
from hpcllm.gateway.response_store import ResponseStore
from hpcllm.gateway.routing import Router, make_router
from hpcllm.gateway.shared_state import SharedState
from hpcllm.gateway.tokenization import TokenizerCache
from hpcllm.gateway.usage import CLOSE_TIMEOUT_S as USAGE_CLOSE_TIMEOUT_S
from hpcllm.gateway.usage import UsageLog
from hpcllm.httpkit.client import internal_client

log = logging.getLogger(__name__)

EXTENSION_KEY = "hpcllm_gateway"
# What a gateway's close waits at most unless told less: the batch runs' hand-back, then the usage writer.
CLOSE_TIMEOUT_S = 10.0 + USAGE_CLOSE_TIMEOUT_S


def gateway_state_dir(config: Config) -> Path:
    return Path(config.paths.state_dir) / "gateway"


def limits_db_url(config: Config) -> str:
    """gateway.limits_db; else the controller's database when it is PostgreSQL (every gateway host shares the
    limits); else the local SQLite file <state_dir>/gateway/limits.db (this host's processes share them)."""
    if config.gateway.limits_db:
        return config.gateway.limits_db
    if is_postgres_url(config.controller.database_url):
        return config.controller.database_url
    return str(gateway_state_dir(config) / "limits.db")


def open_shared_state(config: Config) -> SharedState:
    setting = "gateway.limits_db" if config.gateway.limits_db or not is_postgres_url(
        config.controller.database_url) else "controller.database_url"
    return SharedState(limits_db_url(config), lease_s=config.gateway.stream_lease_seconds, setting=setting)


class Gateway:
    def __init__(self, config: Config, router: Router | None = None):
        self.config = config
        gw = config.gateway
        self.router = router or make_router(config)
        self.metrics = GatewayMetrics()
        self.tokenizers = TokenizerCache()
        self.shared = open_shared_state(config)
        self.limiter = RateLimiter(self.shared)
        self.responses = ResponseStore.of(config, self.shared)
        self.usage = UsageLog.of(config, self.shared, self.metrics)
        self.api_keys: dict[str, ApiKey] = {k.key: k for k in gw.api_keys}
        if not self.api_keys:
            log.warning("gateway.api_keys is empty: /v1 endpoints are %s", "open to anyone who can reach the gateway"
                        if config.cluster.dev else "closed (every call gets 401)")
        threads = gw.threads
        # No default credential: each worker call carries its worker's own key, or a migration grant for a
        # destination another worker named (the cluster secret must never reach a URL a node agent chose).
        self.http = internal_client(
            config.internal_http,
            timeout=httpx.Timeout(gw.upstream_connect_timeout_seconds, read=gw.upstream_read_timeout_seconds),
            limits=httpx.Limits(max_connections=4 * threads, max_keepalive_connections=threads),
        )
        self._draining = threading.Event()
        self._stopping: str | None = None  # why every request stops now (the drain timeout ran out), once it does
        self._batches_stopping: str | None = None  # why batch requests stop now (the process closes), once they do
        self._generations: set = set()  # serving.Generation objects between start() and close(), and a batch's
        # pooling calls in flight (pooling.BatchPoolingCall)
        self._generations_lock = threading.Lock()
        self._in_flight = 0
        self._idle = threading.Condition()
        self.started_at = time.time()
        self._closers: list[Callable[[], None]] = []  # what close() stops first (the batch runner)

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def start_draining(self) -> None:
        """From now on new requests get 503; requests already running finish (gunicorn waits graceful_timeout)."""
        if not self._draining.is_set():
            log.info("gateway draining: refusing new requests, letting running ones finish")
        self.router.start_draining()  # a request waiting for a route hears of the drain timeout's stop in time
        self._draining.set()

    def raise_if_stopping(self, batch: bool = False) -> None:
        """The shutdown's 503 once the drain timeout ran out (stop_generations), or for a batch's request once the
        process's close stops them (stop_batch_generations): asked by a request waiting for a route, tracked as a
        generation or not (a pooling request)."""
        reason = self._stopping or (self._batches_stopping if batch else None)
        if reason is not None:
            raise gateway_shutdown(reason)

    def request_started(self) -> None:
        with self._idle:
            self._in_flight += 1

    def request_finished(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if self._in_flight <= 0:
                self._idle.notify_all()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no admitted request is running (streams included); False when timeout_s passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight <= 0, timeout=max(0.0, timeout_s))

    def track(self, generation) -> None:
        with self._generations_lock:
            self._generations.add(generation)

    def untrack(self, generation) -> None:
        with self._generations_lock:
            self._generations.discard(generation)

    def stop_generations(self, grace_s: float) -> int:
        """The drain timeout ran out: every running generation ends at its next token with a 503 (a stream: an error
        event, then [DONE]) and settles its token reservation, as does every request still waiting for a route
        (raise_if_stopping); after grace_s, those still blocked (a silent worker) are settled from here. Returns how
        many generations were stopped."""
        self._stopping = "the gateway is shutting down (drain timeout); retry the request"
        with self._generations_lock:
            running = list(self._generations)
        for generation in running:
            generation.abort(self._stopping)
        self.wait_idle(grace_s)
        with self._generations_lock:
            stuck = list(self._generations)
        for generation in stuck:
            generation.close()
        return len(running)

    def stop_batch_generations(self, reason: str) -> int:
        """End the running generations of batch requests now with the 503 gateway_shutdown (reason), their worker
        streams cancelled at once rather than at their next token: the worker stops generating, and the batch runner,
        answered with a shutdown, does not record the request (the process that takes its batch over runs it again).
        A batch request waiting for a route (a generation or a pooling request) ends so when the router's poll in
        flight returns, polls made short now (else it waits on, and fails when close() closes the router); the batch
        runner hands back the batches of runs still busy then (BatchRunner.close). A batch's pooling call in flight is
        tracked too (pooling.BatchPoolingCall): it is cancelled on its worker. Returns how many generations and
        pooling calls were stopped."""
        self._batches_stopping = reason
        self.router.start_draining()
        with self._generations_lock:
            running = [generation for generation in self._generations if generation.ctx.batch]
        for generation in running:
            generation.abort(reason)
            generation.close()
        return len(running)

    def on_close(self, closer: Callable[[float], None]) -> None:
        """closer(timeout_s) runs at close(), waiting at most timeout_s."""
        self._closers.append(closer)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """End this process's background work (batch runs hand their batches back, queued usage records are
        written, the lease heartbeat stops), waiting at most timeout_s in all: a quick stop gives it ~1 s, a stalled
        limits database must not hold the stop up."""
        deadline = time.monotonic() + timeout_s

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        for closer in self._closers:
            closer(left())
        self.http.close()
        self.router.close()
        self.usage.close(left())
        self.shared.close(left())


def gateway_shutdown(reason: str) -> ServiceUnavailable:
    """The 503 a request the gateway's shutdown stopped answers with."""
    return ServiceUnavailable(reason, code="gateway_shutdown", retry_after=5)


def current_gateway() -> Gateway:
    return current_app.extensions[EXTENSION_KEY]
