"""Assemble and run the controller: registry + Slurm backend + agent client + Flask app + autoscaler timer.

One process serves everything with threads (hpcllm.httpkit.server: controller.threads of them, a read deadline,
TLS with [internal_http]): the autoscaler must tick in exactly one place, and SQLite serializes writers anyway.
On start it reconciles with Slurm and the node agents before serving.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hpcllm.config import Config
from hpcllm.controller.agents import AgentClient
from hpcllm.controller.allocations import Allocator
from hpcllm.controller.app import create_app
from hpcllm.controller.autoscaler import Autoscaler
from hpcllm.controller.errors import ControllerError
from hpcllm.controller.protocol import MAX_REQUEST_BYTES
from hpcllm.controller.registry import Registry
from hpcllm.controller.service import Controller
from hpcllm.errors import ConfigError
from hpcllm.httpkit.server import InternalServer

log = logging.getLogger(__name__)


def database_url_of(config: Config) -> str:
    return config.controller.database_url or f"sqlite:///{Path(config.paths.state_dir) / 'controller.db'}"


def controller_url_of(config: Config) -> str:
    return f"{config.internal_http.scheme}://{config.controller.host}:{config.controller.port}"


def slurm_backend_of(config: Config):
    """The configured Slurm backend, or None (with a warning) where it cannot work on this site."""
    from hpcllm.slurm import get_backend
    from hpcllm.slurm.errors import SlurmBackendUnsupported

    try:
        return get_backend(config.slurm)
    except SlurmBackendUnsupported as exc:
        log.warning("Slurm backend unavailable, allocations are disabled: %s", exc)
        return None


@dataclass
class ControllerService:
    controller: Controller
    autoscaler: Autoscaler
    app: object

    def tick_forever(self, stop: threading.Event) -> None:
        while not stop.wait(self.controller.settings.tick_seconds):
            try:
                self.autoscaler.tick(self.controller.clock())
            except Exception:  # the timer must survive anything one tick runs into
                log.exception("autoscaler tick failed")


def build_service(config: Config, backend=None, agents: AgentClient | None = None,
                  config_path: str | None = None, clock=time.time) -> ControllerService:
    registry = Registry(database_url_of(config))
    agents = agents or AgentClient(config.cluster.shared_secret, http=config.internal_http)
    allocator = Allocator(config, registry, backend, controller_url_of(config), config_path=config_path, clock=clock)
    controller = Controller(config, registry, agents, allocator, clock=clock)
    return ControllerService(controller, Autoscaler(controller), create_app(controller))


def serve(service: ControllerService, host: str, port: int, ready_file: Path | None = None) -> None:
    """Reconcile, then serve HTTP and tick the autoscaler until SIGTERM / SIGINT."""
    try:
        service.controller.reconcile()
    except ControllerError as exc:  # Slurm down at start: serve anyway, the ticks retry
        log.warning("reconcile at start incomplete: %s", exc)
    config = service.controller.config
    server = InternalServer(service.app, host, port, http=config.internal_http, threads=config.controller.threads,
                            name="controller", max_request_bytes=MAX_REQUEST_BYTES)
    url = f"{server.scheme}://{host}:{server.port}"
    # Allocations tell their agents the port actually bound (--port 0 picks a free one).
    service.controller.allocator.controller_url = f"{server.scheme}://{service.controller.settings.host}:{server.port}"
    stop = threading.Event()
    ticker = threading.Thread(target=service.tick_forever, args=(stop,), name="autoscaler", daemon=True)
    ticker.start()

    def shutdown(signum, frame):
        stop.set()
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    log.info("controller listening on %s (database %s)", url, service.controller.registry.path)
    try:
        if ready_file is not None:
            _write_ready_file(ready_file, url)
        server.serve_forever()
    finally:
        stop.set()
        server.stop()
        service.controller.registry.close()


def _write_ready_file(path: Path, url: str) -> None:
    """Write the URL atomically (a script polling the file never reads half of it); a path that cannot be written
    is the user's to fix: one error line, and the controller that just started stops."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(f"{url}\n")
        tmp.rename(path)
    except OSError as exc:
        raise ConfigError(f"cannot write the ready file {path} ({exc.strerror}); give --ready-file a path in an "
                          f"existing folder you may write to") from None
