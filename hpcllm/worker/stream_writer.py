"""One thread writes the worker's generation streams, instead of one HTTP thread per stream woken per token.

Each generate or attach answer is an NDJSON stream served by a cheroot thread. That thread used to wait on its
request's event queue and write every batch itself: per step and stream one thread wake-up, a GIL hand-over and a
trip through werkzeug's and cheroot's writers. That was most of the worker's front: 0.040 of 0.057 ms of CPU per
streamed token at 16 clients (bench/worker_stream.py). Now the HTTP thread sends the head and the first batch as
before (keep-alive lines while the request waits), then hands the stream to the StreamWriter and sleeps until the
stream ends. The engine wakes the writer once per step's hand-over (EngineBase.on_events_delivered); the writer
takes every handed-over stream's new lines and writes them as HTTP chunks, without blocking, to the socket.

- A client that reads slower than the worker writes (its socket buffer full) is handed back to its HTTP thread
  with the unsent rest: that thread sends it, blocking as before, and serves the stream on itself. The writer never
  waits on one client.
- A write that fails (the client went away) ends the hand-over; the HTTP thread returns and the request is
  cancelled, as before. Idle handed-over streams get a keep-alive line every keepalive_seconds, so a dropped client
  is still noticed while its request waits.
- TLS connections too. A TLS write that finds no room raises "want write"; OpenSSL may have sent part of the
  record already and finishes it when the same bytes are written again, so the whole chunk goes back to the HTTP
  thread, which writes it again, blocking (nothing goes out twice). Answers that are not chunked stay on their HTTP
  thread (the classic path).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

from hpcllm.httpkit.server import RawConnection
from hpcllm.worker.protocol import FinalLine
from hpcllm.worker.requests import Event, RequestStream

log = logging.getLogger(__name__)

KEEPALIVE = b"\n"


class _HandedOver:
    """A stream the writer serves; `done` is set when its HTTP thread has it back."""

    def __init__(self, stream: RequestStream, sock: socket.socket, render: Callable[[list[Event]], bytes]) -> None:
        self.stream = stream
        self.sock = sock
        self.render = render
        self.timeout = sock.gettimeout()
        self.last_write = time.monotonic()
        self.done = threading.Event()
        self.unsent: bytes | None = None  # a write the socket did not take whole: the HTTP thread sends the rest
        self.gone = False  # the client went away


class StreamWriter:
    def __init__(self, keepalive_seconds: float) -> None:
        self.keepalive_seconds = keepalive_seconds
        self._cond = threading.Condition()
        self._streams: list[_HandedOver] = []
        self._woken = False
        self._thread: threading.Thread | None = None
        self.handed_over = 0  # streams the writer took (tests)
        self.handed_back = 0  # of them, given back to their HTTP thread for a slow client

    def wake(self) -> None:
        """New events for some stream (the engine, after a step's hand-over or a cancel)."""
        if self._streams:  # unlocked read: a stream added meanwhile wakes the writer itself
            with self._cond:
                self._woken = True
                self._cond.notify()

    def body(self, stream: RequestStream, connection: RawConnection | None,
             render: Callable[[list[Event]], bytes]) -> Iterator[bytes]:
        """The WSGI body of one stream: its first lines through the server, the rest by the writer when it can."""
        def writes():  # on this thread: a batch of lines per write, a keep-alive line while none come
            for batch in stream.event_batches(self.keepalive_seconds):
                yield render(batch) if batch else KEEPALIVE

        try:
            for data in writes():  # keep-alives until the first lines, which also send the head
                yield data
                if data is not KEEPALIVE:
                    break
            if not stream.finished and self._can_hand_over(connection):
                handed = self._hand_over(stream, connection.socket, render)
                handed.done.wait()
                if handed.gone or handed.unsent is None:
                    return
                connection.socket.sendall(handed.unsent)  # blocking, under the server's socket timeout
            yield from writes()  # after the hand-back, or never handed over (no raw connection, not chunked)
        finally:
            stream.close()  # cancels the request unless it finished

    @staticmethod
    def _can_hand_over(connection: RawConnection | None) -> bool:
        return connection is not None and connection.chunked

    def _hand_over(self, stream: RequestStream, sock: socket.socket,
                   render: Callable[[list[Event]], bytes]) -> _HandedOver:
        handed = _HandedOver(stream, sock, render)
        sock.setblocking(False)  # the writer sends what fits; the HTTP thread restores the timeout when back
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hpcllm-stream-writer", daemon=True)
                self._thread.start()
            self._streams.append(handed)
            self.handed_over += 1
            self._woken = True  # lines may have come between the first batch and now
            self._cond.notify()
        return handed

    # ---- the writer thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._woken:
                    if not self._cond.wait(self._until_keepalive()):
                        break  # a keep-alive is due
                self._woken = False
                streams = list(self._streams)
            ended = [handed for handed in streams if not self._serve(handed)]
            if ended:
                with self._cond:
                    for handed in ended:
                        self._streams.remove(handed)
                        self.handed_back += handed.unsent is not None
                for handed in ended:
                    self._give_back(handed)

    def _until_keepalive(self) -> float | None:
        if not self._streams:
            return None
        return max(0.0, min(h.last_write for h in self._streams) + self.keepalive_seconds - time.monotonic())

    def _serve(self, handed: _HandedOver) -> bool:
        """Write the stream's new lines (or a due keep-alive); False once the writer is done with it."""
        try:
            batch = handed.stream.take_ready()
        except Exception:  # never let one stream stop the writer
            log.exception("stream %s: reading its events failed", handed.stream.request_id)
            handed.gone = True
            return False
        if batch:
            data = handed.render(batch)
        elif time.monotonic() - handed.last_write >= self.keepalive_seconds:
            data = KEEPALIVE
        else:
            return True
        chunk = b"%x\r\n%s\r\n" % (len(data), data)
        try:
            sent = handed.sock.send(chunk)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):  # no room (TLS: resend all of it)
            sent = 0
        except OSError:  # reset, broken pipe, a TLS error: the client went away
            handed.gone = True
            return False
        handed.last_write = time.monotonic()
        if sent < len(chunk):
            handed.unsent = chunk[sent:]
            return False
        return not (batch and isinstance(batch[-1], FinalLine))

    @staticmethod
    def _give_back(handed: _HandedOver) -> None:
        try:
            handed.sock.settimeout(handed.timeout)
        except OSError:
            handed.gone = True
        handed.done.set()
