"""One thread per gateway process relays the token streams, instead of one request thread per stream woken per token.

A streamed completion is served by a gunicorn (gthread) request thread that iterates its SSE body: read a worker's
NDJSON stream, render OpenAI chunks, write them to the client. With a thread per stream, every token of every
stream woke its own thread (a futex wake-up and a GIL hand-over each; at 16-64 streams the threads woken by one
engine step queue for the GIL). Here the request thread sends the head and the first chunk as before, then hands
the body to the StreamRelay and sleeps until it is given back. The relay waits for all its streams' worker sockets
in one selector and, when one is readable, advances that stream's body on its own thread: the worker's lines,
the deltas, the SSE chunks written (as HTTP chunks, without blocking) to the client socket. One wake-up serves
every stream a step made ready.

What makes a body relayable (serving.Generation.deltas(relayed=True)): it never blocks. Its worker streams are
read without blocking (a ReadWait, hpcllm.httpkit.streaming, when nothing has come), and it yields HAND_BACK
before anything that may block or take long (a choice's end: routing, resuming, following a migration, accounting
against the shared state), which then runs on the request thread again.

- A client slower than its stream (its socket does not take a whole chunk) is given back with the unsent rest:
  its request thread sends it, blocking under gunicorn's socket settings, and serves the rest of that stream itself.
- A client that went away (the write fails) is given back marked gone: the request thread closes the body, which
  cancels the worker streams (the worker frees the slots at its next write), as before.
- A worker stream past its read timeout, or closed by another thread (the gateway stopping), is given back: the
  request thread's next iteration raises, as a blocking read would have.
- TLS client connections, gunicorn's gevent worker class and servers other than gunicorn (a test client) stay on
  the request thread: the body waits for each ReadWait itself (`ReadWait.wait`).
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Iterator

from prometheus_client import Counter

from hpcllm.httpkit.streaming import ReadWait

log = logging.getLogger(__name__)

# How often the relay looks for streams past their read timeout or closed by another thread.
CHECK_INTERVAL_S = 1.0


class HandBack:
    """Yielded by a relayable body before work that must run on the request's own thread."""

    def __repr__(self) -> str:
        return "HAND_BACK"


HAND_BACK = HandBack()


class _Relayed:
    """A body the relay serves; `done` is set when the request thread has it back."""

    def __init__(self, source: Iterator, wait: ReadWait, sock: socket.socket, chunked: bool) -> None:
        self.source = source
        self.wait = wait
        self.fd = wait.fileno()
        self.sock = sock
        self.chunked = chunked
        self.timeout = sock.gettimeout()
        self.done = threading.Event()
        self.unsent: bytes | None = None  # a chunk the client's socket did not take whole: the request thread sends it
        self.gone = False  # the client went away
        self.ended = False  # the body ended on the relay
        self.error: BaseException | None = None  # the body raised on the relay (a bug: bodies catch their errors)


def client_socket(environ: dict) -> socket.socket | None:
    """The socket under a gunicorn request that the relay may write to; None for TLS or another server."""
    sock = environ.get("gunicorn.socket")
    if sock is None or isinstance(sock, ssl.SSLSocket):
        return None
    return sock


class StreamRelay:
    def __init__(self, handovers: Counter | None = None) -> None:
        """handovers: counts the bodies given back, by a `returned` label (GatewayMetrics.stream_relay_handovers)."""
        self._handovers = handovers
        self._lock = threading.Lock()
        self._incoming: list[_Relayed] = []
        self._thread: threading.Thread | None = None  # with its wake-up socket pair and selector: at the first take
        self._wake_read = self._wake_write = None
        self._selector: selectors.BaseSelector | None = None
        self._relayed: dict[int, _Relayed] = {}  # by worker socket fd; the relay thread's own

    # ---- the request thread ------------------------------------------------------------------------------------

    def body(self, source: Iterator, sock: socket.socket, http_version: str) -> Iterator[bytes]:
        """The WSGI body of one relayable stream (bytes, ReadWaits and HAND_BACKs from `source`): its head and first
        chunk through gunicorn, then on the relay whenever it waits for its worker."""
        chunked = http_version != "HTTP/1.0"  # gunicorn frames an HTTP/1.1 answer without a length as chunked
        started = slow = False
        try:
            for item in source:
                if item.__class__ is bytes:
                    yield item  # gunicorn writes it (the head first); control comes back once it is sent
                    started = True
                    continue
                if item is HAND_BACK:
                    continue
                if not started or slow or item.closed:
                    item.wait()
                    continue
                relayed = self._take(source, item, sock, chunked)
                relayed.done.wait()
                if relayed.error is not None:
                    raise relayed.error
                if relayed.gone or relayed.ended:
                    return
                if relayed.unsent is not None:
                    slow = True
                    sock.sendall(relayed.unsent)  # blocking, under gunicorn's socket settings
        finally:
            source.close()  # a body given up (client gone) cancels its worker streams, on this thread

    def _take(self, source: Iterator, wait: ReadWait, sock: socket.socket, chunked: bool) -> _Relayed:
        relayed = _Relayed(source, wait, sock, chunked)
        sock.setblocking(False)  # the relay writes what fits; the timeout is restored when given back
        with self._lock:
            if self._thread is None:
                self._start()
            self._incoming.append(relayed)
        self._wake()
        return relayed

    def _start(self) -> None:
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="hpcllm-stream-relay", daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        try:
            self._wake_write.send(b"\0")
        except BlockingIOError:  # the relay has wake-ups pending already
            pass

    # ---- the relay thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        next_check = time.monotonic() + CHECK_INTERVAL_S
        while True:
            try:
                for key, _ in self._selector.select(max(0.0, next_check - time.monotonic())):
                    if key.data is None:
                        self._take_incoming()
                    else:
                        self._advance(key.data)
                if time.monotonic() >= next_check:
                    self._give_back_stale()
                    next_check = time.monotonic() + CHECK_INTERVAL_S
            except Exception:  # the relay must go on for the other streams
                log.exception("the stream relay failed; going on")

    def _take_incoming(self) -> None:
        try:
            while self._wake_read.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for relayed in incoming:
            stale = self._relayed.get(relayed.fd)
            if stale is not None:  # its socket was closed elsewhere and the fd reused: it has nothing more
                self._give_back(stale, "worker_timeout")
            self._relayed[relayed.fd] = relayed
            try:
                self._selector.register(relayed.fd, selectors.EVENT_READ, relayed)
            except (ValueError, OSError):  # the worker stream was closed meanwhile
                self._give_back(relayed, "worker_timeout")

    def _advance(self, relayed: _Relayed) -> None:
        """Run the body until it waits for its worker again (it stays) or must go back to its request thread."""
        while True:
            try:
                item = next(relayed.source)
            except StopIteration:
                relayed.ended = True
                break
            except BaseException as exc:  # never let one stream stop the relay
                relayed.error = exc
                break
            if item.__class__ is bytes:
                if self._send(relayed, item):
                    continue
                break
            if item is relayed.wait:
                return
            break  # HAND_BACK (or a wait on another socket: the request thread handles it)
        self._give_back(relayed)

    @staticmethod
    def _send(relayed: _Relayed, data: bytes) -> bool:
        """Write one chunk without blocking; False when the stream must go back (client slow or gone)."""
        chunk = b"%x\r\n%s\r\n" % (len(data), data) if relayed.chunked else data
        try:
            sent = relayed.sock.send(chunk)
        except BlockingIOError:
            sent = 0
        except OSError:  # reset, broken pipe: the client went away
            relayed.gone = True
            return False
        if sent < len(chunk):
            relayed.unsent = chunk[sent:]
            return False
        return True

    def _give_back_stale(self) -> None:
        for relayed in list(self._relayed.values()):
            if relayed.wait.closed or relayed.wait.remaining() == 0.0:
                self._give_back(relayed, "worker_timeout")

    def _give_back(self, relayed: _Relayed, why: str | None = None) -> None:
        if self._relayed.get(relayed.fd) is relayed:
            del self._relayed[relayed.fd]
            try:
                self._selector.unregister(relayed.fd)
            except (KeyError, ValueError, OSError):
                pass
        try:
            relayed.sock.settimeout(relayed.timeout)
        except OSError:
            relayed.gone = True
        if self._handovers is not None:
            if why is None:
                why = "client_gone" if relayed.gone else "slow_client" if relayed.unsent is not None \
                    else "request_thread"
            self._handovers.labels(why).inc()
        relayed.done.set()
