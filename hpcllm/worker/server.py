"""The worker's HTTP server: a Flask app around one Engine, served in one process by hpcllm.httpkit.server.

Why one process (not gunicorn): the engine (model + KV caches + its thread) must exist once per process and every
request thread must reach it, so gunicorn could only run workers=1 with gthread - which adds an arbiter process,
forks after torch is imported, and kills a worker that does not heartbeat within `timeout` while it loads a large
model. httpkit's InternalServer (cheroot) keeps everything in the one process the node agent starts, binds port 0
and reports the real port, runs a fixed number of threads (a streaming response occupies one each, so there are
enough for max_running_requests + max_waiting_requests streams and the migration and control calls besides), and
closes connections that do not deliver their request in time. It is never exposed to clients (127.0.0.1 by
default, its key - the shared secret or its node's key - on /v1/internal/*, or a migration grant on the destination
side of a migration; TLS with [internal_http]); the gateway in front is the public server. See docs/worker.md and
docs/security.md.

The model loads in a background thread after the port is bound: /health answers at once (liveness), /ready says
503 until the engine runs.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flask import Blueprint, Flask, Response, g, request

from hpcllm.config import InternalHttpConfig
from hpcllm.credentials import TICKET_SECONDS, CredentialError, Grant, GrantCovers, KeyOrGrant, check_ticket
from hpcllm.errors import ConfigError, HpcllmError
from hpcllm.httpkit.app import service_app
from hpcllm.httpkit.auth import SharedSecret, guard, requires
from hpcllm.httpkit.body import parse_body
from hpcllm.procs import freeze_startup_heap
from hpcllm.httpkit.server import RAW_CONNECTION_KEY, InternalServer
from hpcllm.worker.engine import (Engine, EngineError, EngineUnavailable, InvalidRequest, RequestConflict,
                                  UnknownRequest)
from hpcllm.worker.lora_config import AdapterError
from hpcllm.worker.model_process import ModelProcess
from hpcllm.worker.metrics import WorkerMetrics
from hpcllm.worker.migration import migrate_all, migrate_request
from hpcllm.worker.requests import max_requests
from hpcllm.worker.stream_writer import StreamWriter
from hpcllm.worker.protocol import (
    ATTACH_MIGRATION_PATH,
    CANCEL_PATH,
    EMBED_PATH,
    EXTEND_MIGRATION_PATH,
    GENERATE_PATH,
    HELD_MIGRATION_PATH,
    LOAD_LORA_PATH,
    MIGRATE_ALL_PATH,
    MIGRATE_REQUEST_PATH,
    NDJSON_MEDIA_TYPE,
    PREPARE_MIGRATION_PATH,
    TOKENS_PATH,
    UNLOAD_LORA_PATH,
    stream_line_bytes,
    AttachMigration,
    EmbedRequest,
    EmbedResult,
    ExtendMigration,
    ExtendResult,
    GenerateRequest,
    LoadLoraAdapter,
    LoraAdapterResult,
    MigrateRequest,
    PrepareMigration,
    PrepareResult,
    UnloadLoraAdapter,
)

log = logging.getLogger(__name__)

# HTTP threads beyond one per possible stream (running + waiting requests): migration, control and health calls.
CONTROL_THREADS = 16


class WorkerLoadError(HpcllmError):
    """The worker could not load its model for a reason that is not a known user error."""


class EngineDied(HpcllmError):
    """The worker's engine died while serving (its model process was killed, a step hung): the process exits."""


@dataclass
class ModelForServing:
    """What a loader hands the worker: the model, its tokenizer, and how the load went (for metrics)."""

    model: object
    tokenizer: object
    tier: str = "unknown"
    load_seconds: float = 0.0
    owner: object = None  # keeps the loader's result (owner of the weights' memory) alive with the engine
    engine: object = None  # a loader that brings its own engine (vLLM: hpcllm.worker.vllm_engine) sets it
    # Builds the engine (model, tokenizer, **engine options); None: Engine. A tensor-parallel lead passes one whose
    # forwards run on every rank (hpcllm.tp.serve).
    engine_factory: Callable[..., Engine] | None = None
    # A tensor-parallel lead: how each rank loaded ({rank, node, slice_copy, bytes_read, cache_bytes, seconds}).
    rank_loads: list[dict] | None = None


def _discard_dropped_weights(engine, owner) -> None:
    """The paged runner's CPU fast path replaced weights by fused, packed copies (worker/fastpath.py); where the
    originals are views of the loader's host buffers, hand their pages back so the model is not held twice."""
    fast_path = getattr(getattr(engine, "runner", None), "fast_path", None)
    if fast_path is None:
        return
    if fast_path.dropped_ranges and hasattr(owner, "discard"):
        released = owner.discard(fast_path.dropped_ranges)
        log.info("fast path: %s; %.1f MB of the load buffers released", fast_path, released / 1e6)
    else:
        log.info("fast path: %s", fast_path)


class WorkerService:
    """The process's one engine and its lifecycle: loading -> ready, or failed / dead."""

    def __init__(self, model_name: str, secret: str, keepalive_seconds: float = 1.0, freeze_heap: bool = False,
                 **engine_options) -> None:
        """freeze_heap: the process is the worker's own (run_worker): once the engine is built, what start-up made
        is frozen out of the garbage collector's walks (procs.freeze_startup_heap)."""
        self.model_name = model_name
        self.freeze_heap = freeze_heap
        self.secret = secret
        # Requests moved here under migration grants, by grant nonce. A grant opens only its own.
        self._granted: dict[str, _Grant] = {}
        self._granted_lock = threading.Lock()
        self.keepalive_seconds = keepalive_seconds
        self.stream_writer = StreamWriter(keepalive_seconds)
        self.engine_options = engine_options
        self.metrics = WorkerMetrics(model_name)
        self.engine: Engine | None = None
        self.loaded: ModelForServing | None = None
        self.load_error: str | None = None
        self.http: InternalHttpConfig | None = None  # how it serves and calls other workers (serve() sets it)
        self.on_engine_died: Callable[[str], None] | None = None  # the engine's on_died (serve() sets it)

    def reserve_grant(self, grant: Grant, request_id: str, engine: Engine) -> None:
        """Before a prepare under a grant: refuse an id the grant prepared before (a replayed prepare), a grant that
        prepared as many requests as its ticket covers (max_requests: the source instance's requests; attached ones
        run here, so without it one grant could fill every slot over its life), and one that holds a slot's worth of
        held requests already (max_running_requests: what one worker's drain can move here at once; more would only
        keep other requests out of the slots)."""
        with self._granted_lock:
            now = time.time()
            for old in [n for n, record in self._granted.items() if record.expires < now]:
                del self._granted[old]
            record = self._granted.setdefault(grant.nonce, _Grant(grant.expires))
            if request_id in record.prepared or request_id in record.pending:
                raise RequestConflict(f"request {request_id!r} was already prepared with this migration grant; a "
                                      "grant moves a request once", "request_id")
            if len(record.prepared) + len(record.pending) >= grant.max_requests:
                raise CredentialError(f"this migration grant covers {grant.max_requests} requests (its ticket's), "
                                      "and prepared as many; the controller issues another ticket for more")
            held = len(record.pending) + sum(_is_held(engine, r) for r in record.covers)
            if held >= engine.max_running_requests:
                raise TooManyHeld(f"this migration grant already holds {held} requests, as many as this worker runs "
                                  "at once; attach or drop some first", "request_id")
            record.pending.add(request_id)

    def grant_request(self, nonce: str, request_id: str, held: bool) -> None:
        """The prepare reserved with reserve_grant ended: if it holds the request now, the request is this grant's
        alone (another grant that prepared the same id earlier no longer opens it)."""
        with self._granted_lock:
            grant = self._granted.get(nonce)
            if grant is None:
                return
            grant.pending.discard(request_id)
            if not held:
                return
            for other in self._granted.values():
                other.covers.discard(request_id)
            grant.prepared.add(request_id)
            grant.covers.add(request_id)

    def granted(self, nonce: str, request_id: str) -> bool:
        with self._granted_lock:
            grant = self._granted.get(nonce)
            return grant is not None and request_id in grant.covers

    def attach(self, loaded: ModelForServing, model_process: ModelProcess | None = None) -> Engine:
        """Build and start the engine around a loaded model (model_process: started while it loaded)."""
        options = dict(self.engine_options)
        if model_process is not None:
            if loaded.engine is not None:  # an engine of its own (vLLM) has no use for it
                model_process.close()
            else:
                options["model_process"] = model_process
        engine = loaded.engine or (loaded.engine_factory or Engine)(
            loaded.model, loaded.tokenizer, model_name=self.model_name, metrics=self.metrics, **options
        )
        self.metrics.model_loaded(loaded.tier, loaded.load_seconds)
        self.loaded = loaded
        _discard_dropped_weights(engine, loaded.owner)
        engine.on_events_delivered = self.stream_writer.wake
        engine.on_died = self.on_engine_died
        if self.freeze_heap:
            freeze_startup_heap()  # before the engine's thread allocates per token
        self.engine = engine.start()
        return engine

    def load_in_background(
        self, loader: Callable[[], ModelForServing], on_failure: Callable[[Exception], None] | None = None
    ) -> threading.Thread:
        def load() -> None:
            # [worker] model_process: the child imports torch and transformers while the weights load (or a spare
            # worker started it while it waited).
            option = self.engine_options.get("model_process")
            ahead = option if isinstance(option, ModelProcess) else ModelProcess() if option else None
            try:
                self.attach(loader(), model_process=ahead)
            except Exception as exc:  # reported by /health and /ready, and to on_failure
                if ahead is not None:
                    ahead.close()
                if isinstance(exc, HpcllmError):  # a user error (bad checkpoint, bad option): its message suffices
                    log.error("loading the model failed: %s", exc)
                else:
                    log.exception("loading the model failed")
                self.load_error = f"{type(exc).__name__}: {exc}"
                if on_failure is not None:
                    on_failure(exc)

        # A thread that ends after the load: the OpenMP pool its torch ops started (fast path, dtype casts) ends with
        # it, so the engine thread's is the process's only one (docs/worker.md, "One OpenMP pool per process").
        thread = threading.Thread(target=load, name="hpcllm-worker-load", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    def close_unused_model_process(self) -> None:
        """Stop a model process started ahead for a load that never began (serving failed first): the child ignores
        SIGTERM and waits for its model, so left running it would hang this process's exit."""
        option = self.engine_options.get("model_process")
        if isinstance(option, ModelProcess):
            option.close()

    def stream_capacity(self) -> int:
        """Generations that may hold a stream at once (running + waiting requests, the engine's defaults when not
        set)."""
        options = self.engine_options
        return max_requests(options.get("max_running_requests", 8), options.get("max_waiting_requests", 256))


@dataclass
class _Grant:
    """What one migration grant (by its nonce) moved here; forgotten once the grant expires."""

    expires: float
    covers: set[str] = field(default_factory=set)  # the ids it opens: held with it, not re-prepared by another
    prepared: set[str] = field(default_factory=set)  # every id held with it: a grant prepares an id once
    pending: set[str] = field(default_factory=set)  # prepares under way


class TooManyHeld(EngineError):
    http_status = 429
    error_type = "rate_limit_error"
    code = "too_many_held_requests"


def _is_held(engine: Engine, request_id: str) -> bool:
    try:
        return engine.tokens(request_id).state == "held"
    except UnknownRequest:  # finished long ago
        return False


def _route(path: str) -> str:
    return path.replace("{request_id}", "<request_id>")


def create_app(service: WorkerService, max_request_bytes: int | None = None) -> Flask:
    internal = guard(Blueprint("internal", __name__), SharedSecret(service.secret))
    # The destination side of a live migration (/v1/internal/migrations/*): the key, or the grant of a ticket the
    # controller issued for a migration to this worker - then only for the requests prepared with it.
    migrations = guard(Blueprint("migrations", __name__), KeyOrGrant(service.secret))
    granted = requires(GrantCovers(service.granted))
    open_bp = Blueprint("open", __name__)  # /health, /ready, /metrics

    def ready_engine() -> Engine:
        engine = service.engine
        if engine is None:
            raise EngineUnavailable(service.load_error or "model is still loading")
        return engine

    def checked_migration(body: MigrateRequest) -> MigrateRequest:
        """Moving requests away needs the controller's ticket naming this worker's model and the destination."""
        check_ticket(body.ticket, key=service.secret, model=service.model_name, destination_url=body.destination_url)
        return body

    def ndjson_response(stream) -> Response:
        # Blank keep-alive lines while waiting let a dropped client be noticed; when the client goes away the next
        # write fails and the request is cancelled, its slot and KV cache freed (stream_writer.StreamWriter.body).
        return Response(
            service.stream_writer.body(stream, request.environ.get(RAW_CONNECTION_KEY), _render_lines),
            mimetype=NDJSON_MEDIA_TYPE,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @internal.post(GENERATE_PATH)
    def generate():
        body = parse_body(GenerateRequest)
        return ndjson_response(ready_engine().submit(body))

    @internal.post(EMBED_PATH)
    def embed():
        body = parse_body(EmbedRequest)
        engine = ready_engine()
        result = EmbedResult(embeddings=engine.embed(body.inputs, request_id=body.request_id),
                             prompt_tokens=sum(len(ids) for ids in body.inputs),
                             pooling="classify" if engine.classifies else "embed")
        return Response(result.model_dump_json(), mimetype="application/json")

    # ---- LoRA adapters at runtime (docs/worker.md, "LoRA adapters") ----------------------------------------------

    def adapter_result(name: str, engine: Engine, changed: bool, running: int = 0) -> Response:
        result = LoraAdapterResult(lora_name=name, changed=changed, running_requests=running,
                                   lora_adapters=engine.lora_adapters)
        return Response(result.model_dump_json(), mimetype="application/json")

    @internal.post(LOAD_LORA_PATH)
    def load_lora_adapter():
        body = parse_body(LoadLoraAdapter)
        engine = ready_engine()
        try:
            changed = engine.load_lora(body.lora_name, body.lora_path)
        except AdapterError as exc:  # the same checks as at start: what to fix in the folder
            raise InvalidRequest(str(exc), "lora_path") from None
        return adapter_result(body.lora_name, engine, changed)

    @internal.post(UNLOAD_LORA_PATH)
    def unload_lora_adapter():
        body = parse_body(UnloadLoraAdapter)
        engine = ready_engine()
        running = engine.unload_lora(body.lora_name)
        return adapter_result(body.lora_name, engine, True, running)

    # ---- live migration (docs/migration.md) ----------------------------------------------------------------------

    @migrations.post(PREPARE_MIGRATION_PATH)
    def prepare_migration():
        body = parse_body(PrepareMigration)
        engine = ready_engine()
        if g.grant is None:
            engine.hold(body.generate, body.hold_seconds)
        else:  # recorded for the grant only once held: an id another grant holds stays that grant's
            service.reserve_grant(g.grant, body.request_id, engine)
            held = False
            try:  # no longer than the grant's ticket lives: past it, nobody with the grant can attach
                engine.hold(body.generate, min(body.hold_seconds, TICKET_SECONDS))
                held = True
            finally:
                service.grant_request(g.grant.nonce, body.request_id, held)
        cached, _ = engine.wait_prefilled(body.request_id)
        return Response(PrepareResult(request_id=body.request_id, cached_tokens=cached).model_dump_json(),
                        status=201, mimetype="application/json")

    @migrations.post(_route(EXTEND_MIGRATION_PATH))
    @granted
    def extend_migration(request_id: str):
        body = parse_body(ExtendMigration)
        engine = ready_engine()
        cached, output = engine.extend(request_id, body.token_ids)
        if body.wait:
            cached, output = engine.wait_prefilled(request_id)
        return Response(ExtendResult(cached_tokens=cached, output_tokens=output).model_dump_json(),
                        mimetype="application/json")

    @migrations.post(_route(ATTACH_MIGRATION_PATH))
    @granted
    def attach_migration(request_id: str):
        body = parse_body(AttachMigration)
        return ndjson_response(ready_engine().attach(request_id, body.from_index))

    @migrations.delete(_route(HELD_MIGRATION_PATH))
    @granted
    def drop_migration(request_id: str):
        return Response(ready_engine().drop_held(request_id).model_dump_json(), mimetype="application/json")

    @internal.post(_route(MIGRATE_REQUEST_PATH))
    def migrate_one(request_id: str):
        body = checked_migration(parse_body(MigrateRequest))
        result = migrate_request(ready_engine(), request_id, body, service.http)
        return Response(result.model_dump_json(), mimetype="application/json")

    @internal.post(MIGRATE_ALL_PATH)
    def migrate_everything():
        body = checked_migration(parse_body(MigrateRequest))
        return Response(migrate_all(ready_engine(), body, service.http).model_dump_json(),
                        mimetype="application/json")

    @internal.get(_route(TOKENS_PATH))
    def tokens(request_id: str):
        return Response(ready_engine().tokens(request_id).model_dump_json(), mimetype="application/json")

    @internal.post(_route(CANCEL_PATH))
    def cancel(request_id: str):
        return Response(ready_engine().cancel(request_id).model_dump_json(), mimetype="application/json")

    @open_bp.get("/health")
    def health():
        engine = service.engine
        if service.load_error is not None:
            raise EngineUnavailable(f"model failed to load: {service.load_error}")
        if engine is not None and not engine.alive:
            raise EngineUnavailable(f"engine died: {engine.error or 'stopped'}")
        return {"status": "ok", "state": "ready" if engine is not None else "loading"}

    @open_bp.get("/ready")
    def ready():
        engine = service.engine
        if engine is None or not engine.alive:
            reason = service.load_error or (engine.error if engine is not None else None) or "model is loading"
            raise EngineUnavailable(f"not ready: {reason}")
        running, waiting = engine.counts()
        return (
            {
                "status": "ready",
                "model": service.model_name,
                "max_model_len": engine.max_model_len,
                "load_tier": service.loaded.tier,
                "load_seconds": service.loaded.load_seconds,
                "running_requests": running,
                "waiting_requests": waiting,
                "device": str(engine.device),
                "torch_threads": getattr(engine, "compute_threads", None) or torch.get_num_threads(),
                "model_process_pid": getattr(engine, "model_process_pid", None),
                "tokens_in_flight": engine.tokens_in_flight(),
                "prefill_tokens_per_second": engine.prefill_tokens_per_second,
                **({"rank_loads": service.loaded.rank_loads} if service.loaded.rank_loads else {}),
                **({"cuda_graphs": graphs.summary()} if (graphs := _decode_graphs(engine)) is not None else {}),
            }
        )

    @open_bp.get("/metrics")
    def metrics():
        return Response(service.metrics.render(), mimetype="text/plain; version=0.0.4")

    return service_app("hpcllm.worker", [open_bp, internal, migrations], max_request_bytes=max_request_bytes)


def _decode_graphs(engine):
    """The engine's graphs.DecodeGraphs ([worker] cuda_graphs), or None."""
    return getattr(getattr(engine, "runner", None), "decode_graphs", None)


def _render_lines(batch) -> bytes:
    """A batch of stream events as NDJSON: one JSON line each, one write for all (events that queued up while the
    stream waited go out together)."""
    return b"".join(map(stream_line_bytes, batch))


# ---- process entry point ----------------------------------------------------------------------------------------


def load_with_hpcllm(model_path: str | Path, device: str, cache_into: Path | None = None,
                     shared_memory: bool = False) -> ModelForServing:
    """Load a converted checkpoint through hpcllm's tiered loader (tier detected from where the path lives);
    cache_into: also write what is read there (the node agent's cache-on-load staging folder); shared_memory: CPU
    weights in torch shared memory, for a model process to take without a copy (load_model's)."""
    import hpcllm

    loaded = hpcllm.load_model(model_path, device=device, tee_into=cache_into, shared_memory=shared_memory)
    if loaded.tokenizer is None:
        raise ConfigError(f"checkpoint {model_path} has no tokenizer files; convert it from a folder that has them")
    return ModelForServing(loaded.model, loaded.tokenizer, loaded.stats.tier, loaded.stats.seconds, owner=loaded)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _publish_url(server: InternalServer, url_file: Path, url: str) -> None:
    try:
        write_atomically(url_file, url + "\n")
    except OSError as exc:
        server.stop()
        raise ConfigError(f"cannot write the worker's URL to {url_file}: {exc.strerror or exc}") from None


def serve(
    service: WorkerService,
    loader: Callable[[], ModelForServing],
    host: str = "127.0.0.1",
    port: int = 0,
    url_file: Path | None = None,
    on_listening: Callable[[str], None] | None = None,
    http: InternalHttpConfig | None = None,
    threads: int | None = None,
    stop_signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Bind, load in the background, serve until one of stop_signals (SIGTERM/SIGINT), then abort what is left and
    return.

    If the load fails the server stops and the error is raised (the process exits non-zero with the reason).
    threads: HTTP threads (default: one per possible stream, service.stream_capacity(), plus CONTROL_THREADS).
    """
    http = service.http = http or InternalHttpConfig()
    try:
        server = InternalServer(create_app(service, http.max_request_bytes), host, port, http=http,
                                threads=threads or service.stream_capacity() + CONTROL_THREADS, name="worker")
        url = f"{server.scheme}://{host}:{server.port}"
        if url_file is not None:
            _publish_url(server, url_file, url)
    except BaseException:
        service.close_unused_model_process()
        raise
    if on_listening is not None:
        on_listening(url)

    def stop_serving() -> None:
        def stop() -> None:
            service.shutdown()  # abort in-flight generations first: their streams end with a final "abort" line
            server.stop()  # then stop; running streams (only their final line left) get a few seconds

        threading.Thread(target=stop, name="hpcllm-worker-stop", daemon=True).start()

    load_failure: list[Exception] = []
    # A dead engine never serves again: rather than answer 503 until someone notices, the process ends (its requests
    # got their final error lines first, and the gateway resumes them), and its supervisor - the node agent, which
    # reports the instance failed, or systemd - starts another.
    engine_death: list[str] = []
    service.on_engine_died = lambda reason: (engine_death.append(reason), stop_serving())
    service.load_in_background(loader, on_failure=lambda exc: (load_failure.append(exc), stop_serving()))

    def on_signal(signum, frame) -> None:
        log.info("signal %s: shutting down", signum)
        stop_serving()

    previous_handlers = {sig: signal.signal(sig, on_signal) for sig in stop_signals}
    try:
        server.serve_forever()
    finally:
        try:  # a second signal while shutting down is logged, not fatal: the streams' final lines still go out
            service.shutdown()
            server.stop()
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
    if load_failure:
        exc = load_failure[0]
        if isinstance(exc, HpcllmError):
            raise exc
        raise WorkerLoadError(f"loading the model failed: {type(exc).__name__}: {exc}") from exc
    if engine_death:
        raise EngineDied(f"the engine died, so the worker stops: {engine_death[0]}")
