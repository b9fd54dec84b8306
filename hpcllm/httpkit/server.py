"""The production HTTP server of the internal services (controller, node agents, workers): cheroot, in-process.

Why cheroot: the services hold in-process state every request thread must reach (the worker's engine and model,
the controller's autoscaler and registry, the agent's workers), so they need one process with a bounded pool of
threads that can run inside a thread of a bigger program (the node agent) and report the port it bound (port 0).
cheroot, CherryPy's server, is that: a fixed number of threads, idle keep-alive connections wait in a selector
without holding one, TLS built in, streaming responses written as they are produced.

What it adds (InternalServer):
- A read deadline. cheroot reads a request in a thread with a timeout per read only, so a client sending a header
  line every few seconds would hold that thread forever ("slowloris"). Here a connection must deliver its whole
  request, headers and body, within internal_http.request_read_timeout_seconds of its first byte, or a watchdog
  closes it. The body is read whole before the app runs (bounded by internal_http.max_request_bytes), so apps
  never wait on a slow sender either.
- The TLS handshake runs in the request thread under that deadline too (cheroot does it in its accept loop, where
  one silent client would stall every new connection).
- Its own refusals (a malformed or oversized head or body, before the app runs) in the one error body, as JSON.
- Its log goes to `logging`; a client that vanished mid-request is not an error of ours.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import ssl
import threading
import time

from cheroot import errors as cheroot_errors
from cheroot import server as cheroot_server
from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter
from cheroot.workers import threadpool

from hpcllm.config import InternalHttpConfig
from hpcllm.httpkit.errors import (InvalidRequest, RequestTooLarge, ServiceError, ServiceUnavailable, code_of_reason,
                                   service_error)
from hpcllm.errors import ConfigError

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.25
QUEUED_GRACE_S = 0.5
# The most a request line plus headers may take (cheroot's default: no bound, so a client sending header lines
# until the read deadline had them all held in memory, before any credential check). The services' heads are a few
# hundred bytes (a secret, a grant, a token); a longer request line is a 414, longer headers a 413.
MAX_HEAD_BYTES = 64 * 1024


class ReadDeadlines:
    """Connections that must finish sending their request by a deadline; a watchdog thread closes late ones."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._deadlines: dict[object, float] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.closed = 0  # connections closed for missing their deadline (tests, logs)
        threading.Thread(target=self._watch, name="hpcllm-http-deadlines", daemon=True).start()

    def arm(self, conn, started: float) -> None:
        """The connection, whose request began at `started` (monotonic), has until started + seconds to send it
        all - and at least QUEUED_GRACE_S from now: a request that waited in the queue behind busy threads is
        already in the socket's buffer if its client is not a slow one."""
        with self._lock:
            self._deadlines[conn] = max(started + self.seconds, time.monotonic() + min(QUEUED_GRACE_S, self.seconds))

    def disarm(self, conn) -> None:
        with self._lock:
            self._deadlines.pop(conn, None)

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(WATCH_INTERVAL_S):
            now = time.monotonic()
            with self._lock:
                late = [conn for conn, deadline in self._deadlines.items() if deadline <= now]
                for conn in late:
                    del self._deadlines[conn]
            for conn in late:
                if conn.socket.fileno() == -1:
                    continue  # already closed (an idle connection the server let go)
                self.closed += 1
                log.info("closing a connection from %s: no complete request within %.0f s",
                         getattr(conn, "remote_addr", "?"), self.seconds)
                try:  # the plain socket's shutdown (also under TLS): the blocked read in the request thread returns
                    socket.socket.shutdown(conn.socket, socket.SHUT_RDWR)
                except OSError:
                    pass


# cheroot's own answers by status, as the ServiceErrors the apps answer with (others: service_error's, the reason
# phrase as their code).
_REFUSALS: dict[int, type[ServiceError]] = {400: InvalidRequest, 413: RequestTooLarge, 500: ServiceError,
                                            503: ServiceUnavailable}


def refusal(status: str, message: str) -> ServiceError:
    """cheroot's answer `status` ('414 Request-URI Too Long') with its message, as a ServiceError."""
    number, _, reason = status.partition(" ")
    error_class = _REFUSALS.get(int(number))
    if error_class is not None:
        return error_class(message or reason)
    return service_error(int(number), message or reason, code_of_reason(reason))


class _Request(cheroot_server.HTTPRequest):
    def parse_request(self):
        conn = self.conn
        # A new connection's first request is due from its accept; a kept-alive one's from now.
        self.server.read_deadlines.arm(conn, time.monotonic() if conn.served_one else conn.accepted_at)
        super().parse_request()

    _reading_headers = False

    def read_request_headers(self):
        # cheroot refuses a Content-Length over the limit here, in its own words (its one 413 here: headers over
        # theirs are refused in parse_request); simple_response words it as a chunked body over the limit is.
        self._reading_headers = True
        try:
            return super().read_request_headers()
        finally:
            self._reading_headers = False

    def simple_response(self, status, msg=""):
        """cheroot's answers before the app runs (a malformed or oversized head or body, a read timeout) in the one
        error body, not cheroot's plain text. Each ends its connection (what is left of the request would read as
        the next one), which the head says."""
        if self._reading_headers and str(status).startswith("413 "):
            msg = RequestTooLarge.over(self.server.max_request_body_size).message
        error = refusal(str(status), msg.decode("latin-1") if isinstance(msg, bytes) else msg)
        body = json.dumps(error.body()).encode()
        head = [f"{self.server.protocol} {status}", f"Content-Length: {len(body)}", "Content-Type: application/json",
                "Connection: close", *(f"{name}: {value}" for name, value in error.headers().items())]
        self.close_connection = True
        try:
            self.conn.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        except OSError as exc:
            if exc.args[0] not in cheroot_errors.socket_errors_to_ignore:
                raise


class _Connection(cheroot_server.HTTPConnection):
    RequestHandlerClass = _Request

    def __init__(self, server, sock, makefile):
        super().__init__(server, sock, makefile)
        self.accepted_at = time.monotonic()
        self.has_spoken = False  # sent its first bytes: only then does it get a thread
        self.served_one = False

    def communicate(self):
        try:
            return super().communicate()
        finally:
            self.served_one = True
            self.server.read_deadlines.disarm(self)


# WSGI environ key of the request's RawConnection (this server's own; an app run elsewhere does not get it).
RAW_CONNECTION_KEY = "hpcllm.raw_connection"


class RawConnection:
    """The socket under a response being served, for an app that writes its body from another thread (the worker's
    stream writer). Valid while the app's body iterator runs; `chunked`: the head sent says chunked transfer
    encoding, so the body goes on as HTTP chunks."""

    def __init__(self, request) -> None:
        self._request = request
        self.socket = request.conn.socket

    @property
    def chunked(self) -> bool:
        return bool(self._request.sent_headers and self._request.chunked_write)


# How cheroot's chunked reader says a body grew past the limit: a plain OSError (no errno) with these words.
# Checked against cheroot 11.1.2 (ChunkedRFile._fetch); pyproject pins cheroot below 12 for this and the other
# internals this module subclasses. Changed wording fails test_a_body_over_the_limit_is_a_413_chunked_or_not.
CHUNKED_TOO_LARGE = "Request Entity Too Large"


class _BoundedLines:
    """The connection as cheroot's chunked reader reads it, its lines (chunk sizes, trailers) bounded at
    MAX_HEAD_BYTES. cheroot reads a chunk-size line with an unbounded readline() and counts it against the body's
    limit only once it is whole: a "size" line without its line break was held in memory however long it grew."""

    def __init__(self, rfile):
        self._rfile = rfile

    def readline(self, size: int = -1) -> bytes:
        limit = MAX_HEAD_BYTES + 1 if size is None or size < 0 else min(size, MAX_HEAD_BYTES + 1)
        line = self._rfile.readline(limit)
        if len(line) > MAX_HEAD_BYTES:
            raise ValueError(f"a chunk-size or trailer line longer than {MAX_HEAD_BYTES} bytes")
        return line

    def read(self, size: int = -1) -> bytes:
        return self._rfile.read(size)

    def close(self) -> None:
        self._rfile.close()


class _Gateway(wsgi.Gateway_10):
    """Reads the whole body (still under the read deadline) before the app runs: over the limit a 413, malformed
    (bad chunk framing, a negative Content-Length) a 400 - the caller's mistakes, not a 500 and an ERROR traceback
    in the log."""

    def respond(self):
        req = self.req
        if req.chunked_read:  # nothing of the body read yet
            req.rfile = cheroot_server.ChunkedRFile(_BoundedLines(req.conn.rfile), req.server.max_request_body_size)
        try:
            body = req.rfile.read()
        except cheroot_errors.MaxSizeExceeded:
            return self._refuse("413 Request Entity Too Large", self._too_large())
        except OSError as exc:
            if str(exc) != CHUNKED_TOO_LARGE:
                raise  # the connection's own (a reset, a timeout): cheroot's to handle
            return self._refuse("413 Request Entity Too Large", self._too_large())
        except ValueError as exc:
            return self._refuse("400 Bad Request", f"malformed request body: {exc}")
        finally:
            req.server.read_deadlines.disarm(req.conn)
        self.env[RAW_CONNECTION_KEY] = RawConnection(req)
        self.env["wsgi.input"] = io.BytesIO(body)
        self.env["CONTENT_LENGTH"] = str(len(body))
        self.env.pop("HTTP_TRANSFER_ENCODING", None)
        return super().respond()

    def _too_large(self) -> str:
        return RequestTooLarge.over(self.req.server.max_request_body_size).message

    def _refuse(self, status: str, message: str) -> None:
        self.req.simple_response(status, message)  # and closes the connection: the rest of the body is unread
        self.req.ready = False  # answered: cheroot must not send a (status-less) head after it


class _LazyHandshakeSSLAdapter(BuiltinSSLAdapter):
    """TLS whose handshake happens at the first read, in the request thread (under the read deadline)."""

    def wrap(self, sock):
        try:
            wrapped = self.context.wrap_socket(sock, do_handshake_on_connect=False, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            raise cheroot_errors.FatalSSLAlert(*exc.args) from exc
        return wrapped, {"wsgi.url_scheme": "https", "HTTPS": "on"}


class _Server(wsgi.Server):
    ConnectionClass = _Connection

    def process_conn(self, conn):
        # cheroot hands a new connection to a thread at once; a client that connects and stays silent would hold
        # it. Here it waits in the selector, like an idle kept-alive one, until it sends something (or expires).
        if not conn.has_spoken:
            conn.has_spoken = True
            self.put_conn(conn)
            return
        super().process_conn(conn)

    def error_log(self, msg="", level=logging.INFO, traceback=False):
        # cheroot reports a client that went away (reset, TLS EOF, our own deadline) as an error; it is not ours.
        level = logging.DEBUG if level < logging.ERROR else level
        log.log(level, "%s", msg, exc_info=traceback and level >= logging.ERROR)


class _DaemonThreadPool(threadpool.ThreadPool):
    """cheroot's pool with daemon worker threads. The server's owner stops it explicitly (serve() on a signal, a
    test's teardown); one left unstopped (a failed start, a forgotten test server) must not keep the interpreter
    from exiting: cheroot's own workers would, as its pool starts them as soon as the server binds."""

    def _spawn_worker(self):
        worker = threadpool.WorkerThread(self.server)
        worker.name = f"CP Server {worker.name!s}"
        worker.daemon = True
        worker.start()
        return worker


class InternalServer:
    """One internal service's HTTP(S) server: bound at construction (port 0 picks one), then serve_forever() in
    this thread or start() in a background one; stop() from anywhere. max_request_bytes: a service whose messages
    are small reads no more than that of a body (else internal_http.max_request_bytes)."""

    def __init__(self, app, host: str, port: int, *, http: InternalHttpConfig, threads: int, name: str,
                 max_request_bytes: int | None = None):
        self.name = name
        self.http = http
        self._server = _Server((host, port), app, numthreads=threads, max=threads,
                               timeout=http.socket_timeout_seconds, shutdown_timeout=5,
                               server_name=f"hpcllm-{name}")
        self._server.gateway = _Gateway
        self._server.requests = _DaemonThreadPool(self._server, min=threads, max=threads)
        self._server.max_request_body_size = min(http.max_request_bytes, max_request_bytes or http.max_request_bytes)
        self._server.max_request_header_size = MAX_HEAD_BYTES
        # cheroot listens with a backlog of 5: a burst of new connections (a gateway opening streams for 32 clients
        # at once) overflows it, and the kernel resets some of them (SYN cookies that fail). The system's maximum.
        self._server.request_queue_size = socket.SOMAXCONN
        self._server.read_deadlines = ReadDeadlines(http.request_read_timeout_seconds)
        if http.tls:
            self._server.ssl_adapter = _ssl_adapter(http)
        try:
            self._server.prepare()
        except OSError as exc:
            self._server.read_deadlines.stop()
            raise ConfigError(f"the {name} cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.host = host
        self.port = self._server.bind_addr[1]
        self._stopped = threading.Event()

    @property
    def scheme(self) -> str:
        return self.http.scheme

    @property
    def deadline_closes(self) -> int:
        return self._server.read_deadlines.closed

    def serve_forever(self) -> None:
        """Serve until stop()."""
        try:
            self._server.serve()
        finally:
            self._stopped.set()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name=f"hpcllm-{self.name}-http", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Stop accepting, let running requests finish (up to 5 s), close."""
        self._server.stop()
        self._server.read_deadlines.stop()


def _ssl_adapter(http: InternalHttpConfig) -> _LazyHandshakeSSLAdapter:
    try:
        return _LazyHandshakeSSLAdapter(str(http.tls_cert_file), str(http.tls_key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"internal_http.tls_cert_file {http.tls_cert_file} / tls_key_file {http.tls_key_file}: "
                          f"cannot load the certificate and its key ({exc})") from None
