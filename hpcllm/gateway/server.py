"""Running the gateway under gunicorn, configured from the hpcllm config (no gunicorn.conf.py to keep in sync).

Settings and why:
  worker class           gateway.worker_class: "gthread" (default) each request holds one OS thread; a stream holds
                         it until its last token. "gevent": one OS thread per process, an event loop, a greenlet per
                         connection (gunicorn monkey-patches the process right after fork, before the app loads).
                         Either way the heartbeat comes from the worker's main loop, not the request threads, so
                         long streams and long cold-start waits never trip gunicorn's `timeout`.
  workers x threads      concurrent requests per gateway = workers * threads (gateway.workers, gateway.threads);
                         under gevent gateway.threads is gunicorn's worker_connections (greenlets per process; a
                         kept-alive idle connection holds one too).
  graceful_timeout       = gateway.drain_timeout_seconds. On SIGTERM to the master (shutdown) every worker sets
                         the app's draining flag and KEEPS ACCEPTING: new requests get a 503 with Retry-After
                         (instead of waiting unanswered in the listen backlog), running streams finish; a worker
                         stops once it has no running request, or just before the drain timeout. A worker that
                         gunicorn retires alone (TTOU, reload) stops accepting at once instead, since its siblings
                         still serve the shared socket.
  worker_class           DrainingThreadWorker / DrainingGeventWorker (gunicorn's worker with the drain behaviour
                         above, DrainingMixin), master GatewayArbiter (tells workers, through shared memory, that
                         the whole gateway is stopping).
  preload_app False      the app (HTTP pools, SQLite connections, metric files) is built after fork, per worker.
  logger_class           GatewayLogger: gunicorn's own lines in the services' one format (hpcllm.logs.FORMAT), the
                         format of the gateway's lines too (`hpcllm gateway` sets up the root logger in the master;
                         the forked workers inherit its handler).
  access_log_format      gunicorn's line with `request_id=` the X-Request-Id of the answer, so a user's quoted id
                         finds its request (a 401 or 429 logs nothing else).
  control_socket_disable gunicorn's control socket (gunicornc) is off: its one path per user would be shared by
                         every gateway (and test) on the host; signals stop and resize the gateway.
  PROMETHEUS_MULTIPROC_DIR  a fresh per-master directory, set before prometheus_client is imported anywhere, so
                         /metrics sums every worker; child_exit drops a dead worker's live gauges.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import multiprocessing
import os
import shutil
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import gevent
import gevent.monkey
from gunicorn import glogging
from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.config import AccessLogFormat
from gunicorn.workers.ggevent import GeventWorker
from gunicorn.workers.gthread import ThreadWorker

from hpcllm.config import Config, check_service_credentials, private_state_dir
from hpcllm.errors import ConfigError
from hpcllm.gateway.routing import make_router
from hpcllm.httpkit.errors import code_of_reason, service_error
from hpcllm.logs import FORMAT
from hpcllm.procs import freeze_startup_heap, pid_alive

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def metrics_base_dir(config: Config) -> Path:
    return Path(config.gateway.metrics_dir or Path(config.paths.state_dir) / "gateway" / "prometheus")


def prepare_metrics_dir(config: Config) -> Path:
    """A fresh directory for this master's metric files; leftovers of gateways that are gone are removed."""
    base = metrics_base_dir(config)
    base.mkdir(parents=True, exist_ok=True)
    for old in base.glob("master-*"):
        pid = old.name.removeprefix("master-")
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = base / f"master-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


class GatewayLogger(glogging.Logger):
    """gunicorn's error log (workers booting and exiting, signals, timeouts) in the format of every hpcllm service's
    log, instead of gunicorn's own beside the gateway's lines."""

    error_fmt = FORMAT
    datefmt = None  # logging's default, as the root logger's handler (logging.basicConfig) has it


WORKER_CLASSES = {
    "gthread": "hpcllm.gateway.server.DrainingThreadWorker",
    "gevent": "hpcllm.gateway.server.DrainingGeventWorker",
}


# gunicorn's default line plus the request id the answer carries (X-Request-Id): the one thing a user can quote.
ACCESS_LOG_FORMAT = AccessLogFormat.default + " request_id=%({x-request-id}o)s"


def gunicorn_settings(config: Config) -> dict:
    gw = config.gateway
    concurrency = {"threads": gw.threads} if gw.worker_class == "gthread" else {"worker_connections": gw.threads}
    return {
        "bind": [f"{gw.host}:{gw.port}"],
        "workers": gw.workers,
        "worker_class": WORKER_CLASSES[gw.worker_class],
        **concurrency,
        # gunicorn takes whole seconds; round up so a drain never gets less time than configured.
        "timeout": math.ceil(gw.worker_timeout_seconds),
        "graceful_timeout": math.ceil(gw.drain_timeout_seconds),
        "keepalive": math.ceil(gw.keepalive_seconds),
        "preload_app": False,
        "proc_name": "hpcllm-gateway",
        "accesslog": "-",
        "access_log_format": ACCESS_LOG_FORMAT,
        "errorlog": "-",
        "loglevel": "info",
        "logger_class": "hpcllm.gateway.server.GatewayLogger",
        "child_exit": _child_exit,
        "worker_exit": _worker_exit,
        "on_exit": _on_exit,
        # gunicorn 27's control socket (gunicornc) has one path per user ($XDG_RUNTIME_DIR/gunicorn.ctl): a second
        # gateway on the host took it over, and either one's stop removed it. hpcllm does not use it.
        "control_socket_disable": True,
    }


# Set by the master right before it sends SIGTERM to all workers for a shutdown; shared with the forked workers.
_GATEWAY_STOPPING = multiprocessing.RawValue(ctypes.c_bool, False)
# Time a worker keeps within graceful_timeout for ending the requests still running (ABORT_GRACE_S: their streams
# get an error event, their token reservations are settled) and for gunicorn's own stop (kept-alive connections
# linger up to 2 s).
ABORT_GRACE_S = 2.0
STOP_MARGIN_S = ABORT_GRACE_S + 3.0
# A worker's closing of its gateway as it exits (batches handed back, queued usage written) ends this long before
# the master's SIGKILL at graceful_timeout, so it can say what it could not finish.
KILL_MARGIN_S = 1.0
# A quick stop (SIGINT, SIGQUIT) closes the gateway within this, however stalled the limits database.
QUICK_CLOSE_S = 1.0


class GatewayArbiter(Arbiter):
    def stop(self, graceful: bool = True) -> None:
        if graceful:
            _GATEWAY_STOPPING.value = True
        super().stop(graceful)


def write_error_body(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's util.write_error (the answer to a request it refuses itself, before the app runs: a request line
    or headers too large, a malformed request line or header), in the one error body instead of an HTML page."""
    code = "invalid_request" if status_int == 400 else code_of_reason(reason)
    error = service_error(status_int, mesg or reason, code)
    body = json.dumps(error.body()).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    gunicorn_util.write_nonblock(sock, head.encode("latin-1") + body)


class DrainingMixin:
    """The drain behaviour of a gateway worker, mixed in before a gunicorn worker class: on SIGTERM answer 503 while
    the gateway drains, then stop (gunicorn's graceful stop, super().handle_exit) when no request is running. Also
    gunicorn's own refusals in the one error body (write_error_body)."""

    _drain_thread: threading.Thread | None = None
    _close_by: float | None = None  # time.monotonic() by which _worker_exit's close of the gateway must end

    def handle_quit(self, sig, frame) -> None:
        """A quick stop: the gateway's close, as the worker exits, waits at most QUICK_CLOSE_S."""
        self._close_by = time.monotonic() + QUICK_CLOSE_S
        super().handle_quit(sig, frame)

    def init_process(self) -> None:
        # Worker.handle_error words gunicorn's refusals (status, reason, message: its mapping, kept) and writes
        # them with util.write_error, its one caller: that writer is replaced, in this worker process.
        gunicorn_util.write_error = write_error_body
        super().init_process()

    def handle_exit(self, sig, frame) -> None:
        if self._close_by is None:  # gunicorn's master SIGKILLs what is left at graceful_timeout after its SIGTERM
            self._close_by = time.monotonic() + max(0.0, self.cfg.graceful_timeout - KILL_MARGIN_S)
        gateway = self._gateway()
        if gateway is None:
            return super().handle_exit(sig, frame)
        gateway.start_draining()
        if not _GATEWAY_STOPPING.value:
            return super().handle_exit(sig, frame)
        if self._drain_thread is None:  # under gevent threading is monkey-patched: this is a greenlet
            self._drain_thread = threading.Thread(target=self._stop_when_idle, args=(gateway, sig),
                                                  name="hpcllm-drain", daemon=True)
            self._drain_thread.start()

    def _gateway(self):
        from hpcllm.gateway.app import gateway_of

        try:
            return gateway_of(self.wsgi)
        except (AttributeError, KeyError, TypeError):
            return None  # the app is not loaded yet: nothing to drain

    def _stop_when_idle(self, gateway, sig) -> None:
        started = time.monotonic()
        budget = max(0.0, self.cfg.graceful_timeout - STOP_MARGIN_S)
        if not gateway.wait_idle(budget):
            log.warning("drain timeout: %d requests still running after %.0f s; ending them with an error",
                        gateway.in_flight, time.monotonic() - started)
            gateway.stop_generations(grace_s=ABORT_GRACE_S)
        super().handle_exit(sig, None)  # the gunicorn worker's graceful stop: stop accepting, end the main loop


class DrainingThreadWorker(DrainingMixin, ThreadWorker):
    """gthread worker that answers 503 while the gateway drains, then stops when its requests are done."""


class DrainingGeventWorker(DrainingMixin, GeventWorker):
    """gevent worker (one OS thread, a greenlet per connection) with the same drain behaviour. The signal handler
    only spawns the drain work: a handler may run on the event loop's own greenlet, where anything that waits (a
    lock, starting a thread) cannot switch away (gunicorn's GeventWorker defers SIGQUIT the same way)."""

    def handle_exit(self, sig, frame) -> None:
        gevent.spawn(DrainingMixin.handle_exit, self, sig, frame)

    def init_process(self) -> None:
        try:
            super().init_process()  # the worker's whole life: it returns (or raises SystemExit) as it stops
        finally:
            # Monkey-patching made logging's module lock a gevent lock. The process's teardown frees module-level
            # handlers (Flask's default_handler) once gevent's own modules are gone, and their weakref callback
            # (logging._removeHandlerRef) then failed in that lock: "Exception ignored ... TypeError: 'NoneType'
            # object is not callable" in the log at every stop. No greenlet holds it here (none yields inside).
            logging._lock = gevent.monkey.get_original("_thread", "RLock")()


def _child_exit(server, worker) -> None:
    from hpcllm.gateway.metrics import mark_process_dead

    mark_process_dead(worker.pid)


def _worker_exit(server, worker) -> None:
    """In a worker process as it ends, however it was stopped (drained, quick stop, its app failing): close its
    gateway, which lets the batch runner hand its batches back and writes the usage records still queued. Both are
    daemon threads' work, cut short when the process exits."""
    if not isinstance(worker, DrainingMixin):
        return
    gateway = worker._gateway()
    if gateway is not None:
        if worker._close_by is None:  # its app failed, not a signal
            gateway.close()
        else:
            gateway.close(max(0.0, worker._close_by - time.monotonic()))


def _on_exit(server) -> None:
    path = os.environ.get(MULTIPROC_ENV)
    if path and Path(path).name == f"master-{os.getpid()}":
        shutil.rmtree(path, ignore_errors=True)


class GatewayApplication(BaseApplication):
    def __init__(self, config: Config):
        self.config = config
        super().__init__()

    def load_config(self) -> None:
        for key, value in gunicorn_settings(self.config).items():
            self.cfg.set(key, value)

    def load(self):
        from hpcllm.gateway.app import create_app

        app = create_app(self.config)
        freeze_startup_heap()  # in each gunicorn worker (the app is built after fork): before it serves
        return app

    def run(self) -> None:
        try:
            GatewayArbiter(self).run()
        except RuntimeError as exc:  # gunicorn's way of reporting e.g. a port already in use
            raise ConfigError(f"gunicorn could not start the gateway: {exc}") from None


def run_gateway(config: Config, on_starting: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM (graceful drain) or SIGINT/SIGQUIT (quick stop). on_starting: called once the checks
    passed, as gunicorn starts (a gateway refused at its checks never said it was serving)."""
    # A bad static model (max_model_len above the model's, a source without config.json) stops the start here with
    # its message, instead of failing every gunicorn worker's boot.
    make_router(config).close()
    _check_port_free(config.gateway.host, config.gateway.port)
    check_service_credentials(config, "gateway")
    private_state_dir(config)  # before fork: every worker inherits the umask
    if "prometheus_client" in sys.modules and not os.environ.get(MULTIPROC_ENV):
        raise ConfigError("prometheus_client was imported before the gateway set PROMETHEUS_MULTIPROC_DIR; "
                          "start the gateway with `hpcllm gateway`")
    os.environ.setdefault(MULTIPROC_ENV, str(prepare_metrics_dir(config)))
    _create_shared_state(config)
    # transformers (and the torch it pulls in) takes seconds to import: do it once here, before fork, so every
    # worker starts with it (copy-on-write) instead of stalling its first request. No torch op runs in the
    # gateway, so no thread pool exists yet that fork could break.
    from transformers import AutoTokenizer  # noqa: F401

    if on_starting is not None:
        on_starting()
    GatewayApplication(config).run()


def _check_port_free(host: str, port: int) -> None:
    """One clear error instead of gunicorn retrying a busy port five times and exiting."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another gateway.port or --port, "
                          f"or stop what is using it") from None


def _create_shared_state(config: Config) -> None:
    """Create the limits database (schema, WAL) once in the master, so workers never race to initialize it."""
    from hpcllm.controller.registry.databases import redact_password
    from hpcllm.gateway.errors import ServiceUnavailable
    from hpcllm.gateway.runtime import limits_db_url, open_shared_state

    try:
        open_shared_state(config).close()
    except (OSError, sqlite3.Error, ServiceUnavailable) as exc:
        raise ConfigError(f"cannot create the gateway's limits database {redact_password(limits_db_url(config))}: "
                          f"{exc}") from None
