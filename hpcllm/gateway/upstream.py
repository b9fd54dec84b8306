"""The gateway's side of the worker generate API, on top of hpcllm.worker.client.WorkerClient.

A generation is opened (and its HTTP status checked) before the gateway answers its client, so a worker that
refuses a request turns into a proper HTTP error; after that, lines are read one at a time while the client is
streamed to. Worker failures are classified: WorkerUnavailable before any token (route again and retry),
WorkerLost once the stream has started (resume elsewhere from the tokens already received). A stream that ends
with finish_reason "migrated" is continued by attaching to the worker it names (open_attach).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx

from hpcllm.config import InternalHttpConfig
from hpcllm.gateway.errors import ApiError, InvalidRequest, ServiceUnavailable
from hpcllm.httpkit.streaming import ReadWait
from hpcllm.worker.client import GenerationStream, KeepAlive, WorkerClient, WorkerError
from hpcllm.worker.protocol import EmbedResult, FinalLine, GenerateRequest, TokenLine, engine_unavailable

log = logging.getLogger(__name__)


class WorkerUnavailable(ServiceUnavailable):
    code = "worker_unavailable"


class WorkerBusy(WorkerUnavailable):
    """The worker answered, refusing for now (full): it is there, unlike one that cannot be reached or whose engine
    is not running."""


class WorkerLost(Exception):
    """The worker stream broke after it had started (connection dropped, no final line)."""


def _where(worker_url: str, request_id: str) -> str:
    """A worker and its id of a generation, as the gateway's log lines name them."""
    return f"worker {worker_url} (its request {request_id})"


class WorkerStream:
    """One open generation: iterate for TokenLine objects (and KEEPALIVE_PIECE while the worker holds the request
    without a token: its client may have left meanwhile), then exactly one FinalLine."""

    def __init__(self, worker_url: str, stream: GenerationStream, request_id: str):
        self.worker_url = worker_url
        self.request_id = request_id  # what the worker's own log calls this generation
        self._stream = stream
        stream.yield_keepalives()

    @property
    def where(self) -> str:
        """The worker and its id of the generation, for the gateway's log lines (the worker's log has the rest)."""
        return _where(self.worker_url, self.request_id)

    @property
    def finished(self) -> bool:
        return self._stream.final is not None

    @property
    def tokens_buffered(self) -> int:
        """Token lines that arrived with the one just read, behind it (they queued up on the worker or in the
        socket while this thread waited)."""
        return self._stream.tokens_buffered

    def yield_when_idle(self) -> None:
        """Iterating yields a ReadWait instead of blocking for the worker (hpcllm.httpkit.streaming)."""
        self._stream.yield_when_idle()

    def __iter__(self) -> Iterator[TokenLine | FinalLine | ReadWait | KeepAlive]:
        try:
            for item in self._stream:
                if isinstance(item, FinalLine):
                    self._stream.close()  # release the connection now: readers stop at the final line
                yield item
        except WorkerError as exc:
            self._stream.close()
            raise WorkerLost(f"lost the stream from {self.where}: {exc}") from None

    def cancel(self) -> None:
        """Close the connection: the worker notices at its next write and frees the request's slot."""
        self._stream.close()


def open_generation(http: httpx.Client, worker_url: str, secret: str, request: GenerateRequest,
                    tls: InternalHttpConfig | None = None, *, for_request: str) -> WorkerStream:
    """tls: the [internal_http] section (the stream verifies an https worker against its site CA). for_request: the
    gateway's id of the client's request (X-Request-Id), for the log line of a refusal."""
    # The process's client: its timeouts for the stream, its pool for other calls; never closed here.
    client = WorkerClient(worker_url, secret, client=http, http=tls)
    try:
        return WorkerStream(worker_url, client.generate(request), request.request_id)
    except WorkerError as exc:
        raise _classify(exc, for_request, _where(worker_url, request.request_id)) from None


def open_attach(http: httpx.Client, worker_url: str, request_id: str, from_index: int, grant: str,
                tls: InternalHttpConfig | None = None) -> WorkerStream:
    """Continue a live-migrated generation on its destination from output index from_index (docs/migration.md),
    with the migration's grant and no other credential. Raises WorkerError when the destination refuses or cannot be
    reached; the caller then resumes from tokens."""
    client = WorkerClient(worker_url, "", client=http, grant=grant, http=tls)
    return WorkerStream(worker_url, client.attach(request_id, from_index), request_id)


# Workers found older than embedding call ids (embed_on_worker): asked without one from then on. A worker's URL has
# a port of its own (picked at its start), so a worker upgraded in place comes back at another.
_WITHOUT_CALL_IDS: set[str] = set()


def embed_on_worker(http: httpx.Client, worker_url: str, secret: str, inputs: list[list[int]], *,
                    for_request: str, call_id: str | None = None) -> EmbedResult:
    """The pooled outputs of token id lists from the worker (embeddings, or a classifier's logits: its `pooling`
    says which; one call; refusals classified like a generation's). for_request: as open_generation's; call_id: the
    worker's id of the call, which cancel_on_worker ends. A worker older than call ids (its request model forbids
    the field: a 400 naming request_id) is asked again without one, and its later calls at once (each call sends
    the whole inputs), so a rolling upgrade that reaches the gateway first still pools; those calls cannot be
    cancelled."""
    client = WorkerClient(worker_url, secret, client=http)
    try:
        if call_id is None or worker_url in _WITHOUT_CALL_IDS:
            return client.embed(inputs)
        try:
            return client.embed(inputs, request_id=call_id)
        except WorkerError as exc:
            if exc.status != 400 or exc.info is None or exc.info.param != "request_id":
                raise
            log.info("request %s: worker %s takes no embedding call id (an older version): pooled without one, as "
                     "its later calls", for_request, worker_url)
            _WITHOUT_CALL_IDS.add(worker_url)
            return client.embed(inputs)
    except WorkerError as exc:
        raise _classify(exc, for_request, f"worker {worker_url}") from None  # the worker has no id for the call


# A cancel's connect and read timeouts: sent at a process's close (stop_batch_generations), whose budget has ~2 s left.
CANCEL_TIMEOUT_S = 1.0


def cancel_on_worker(http: InternalHttpConfig | None, worker_url: str, secret: str, call_id: str) -> None:
    """End a call on the worker (an embedding call's call_id); one that ended already, or a worker away or silent
    (CANCEL_TIMEOUT_S), is logged: the caller writes nothing of its answer either way. On a client of its own: it is
    sent from a thread of its own while the process closes, which closes the shared one."""
    try:
        with WorkerClient(worker_url, secret, connect_timeout=CANCEL_TIMEOUT_S, read_timeout=CANCEL_TIMEOUT_S,
                          http=http) as client:
            client.cancel(call_id)
    except WorkerError as exc:
        log.info("could not cancel %s on worker %s (it may have ended): %s", call_id, worker_url, exc)


def _classify(exc: WorkerError, for_request: str, where: str) -> ApiError:
    """The client's error for a worker's refusal; where and why are logged under the client's request id
    (for_request) and `where` (the worker, and its id of the request where it has one)."""
    info = exc.info
    message = info.message if info else str(exc)
    # Where and why go to the log: clients are not told internal addresses, nor the worker's own words (its engine's
    # errors, a checkpoint's path); a refusal of the request itself (400) is the client's to read.
    if exc.status == 0:
        log.warning("request %s: %s is unreachable: %s", for_request, where, message)
        return WorkerUnavailable("the model's worker cannot be reached just now; retry shortly", retry_after=2)
    if exc.status in (400, 413, 422):
        # The worker's own validation (e.g. a prompt its context cannot hold): the caller's request is at fault.
        return InvalidRequest(message, param=info.param if info else None,
                              code=(info.code if info else None) or "invalid_request")
    if exc.status == 503 and engine_unavailable(info):
        # Its model still loads, failed to load, or its engine died: not back within seconds, so not busy (a busy
        # worker is tried again soon).
        log.warning("request %s: %s has no running engine: %s", for_request, where, message)
        return WorkerUnavailable("the model's worker is not ready; retry shortly", retry_after=5)
    if exc.status in (429, 503):
        log.warning("request %s: %s is busy: %s", for_request, where, message)
        return WorkerBusy("the model's worker is busy; retry shortly", retry_after=2)
    log.error("request %s: %s answered %s: %s", for_request, where, exc.status, message)
    return WorkerUnavailable(f"the model's worker failed (HTTP {exc.status}); retry shortly", retry_after=5)
