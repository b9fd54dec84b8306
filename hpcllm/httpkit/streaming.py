"""A POST whose answer is a long stream, read straight off its socket: the hot path of the gateway (a worker's
NDJSON generation stream, one small write per token).

httpx hands a streamed body over one HTTP chunk at a time, through several layers (httpx, httpcore, h11) per
chunk. For a stream of tiny chunks that is most of the reader's CPU, and a reader that fell behind gets the chunks
that piled up in its socket one by one, so it cannot pass them on together. Here h11 (the HTTP/1.1 protocol
library under httpx) frames the request and parses the answer's head, and the caller gets, per receive,
everything that receive brought - all the chunks in the socket - as one piece. A chunked body is decoded by
ChunkedDecoder below rather than h11's event machinery: ~1 us a piece instead of 10-20 us (a few % of the
gateway's CPU per token); any other body (an error answer with a Content-Length) goes through h11.

Same as the internal httpx client (hpcllm.httpkit.client): TLS verified against the site CA when configured,
connect / write / read timeouts from an httpx.Timeout. Unlike it, one connection per stream, closed at the end
(no pool): a stream lasts as long as a generation, so a connect per stream is a small cost, and closing is how a
reader cancels the request on the worker anyway.

A reader of several streams on one thread (the gateway reading the n choices of one request as they come) reads
their chunked bodies without blocking: after `yield_when_idle()`, `pieces()` yields the stream's ReadWait instead
of waiting in a receive, and the consumer waits for any of its streams (`wait_for_any`) before iterating on the
ones that have something.
"""

from __future__ import annotations

import math
import re
import select
import socket
import ssl
import time
from collections.abc import Iterator
from functools import lru_cache

import h11
import httpx

# One receive takes what the socket holds, up to this much.
RECEIVE_BYTES = 64 * 1024


class StreamBroken(Exception):
    """The stream could not be opened or broke: no connection, a timeout, the peer closed mid-answer, bad HTTP."""


class _NothingYet(Exception):
    """A receive on a non-blocking stream found nothing to read."""


_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
# Longest chunk-size line (size, extensions) or trailer line accepted.
MAX_LINE_BYTES = 4096


class ChunkedDecoder:
    """A `Transfer-Encoding: chunked` body (RFC 9112 section 7.1), fed as it arrives: feed(data) returns the body
    bytes in it (those of all the chunks it completes or begins); `done` once the last chunk and the trailer
    section are read. Chunk extensions and trailer fields are skipped. Malformed framing raises StreamBroken."""

    def __init__(self) -> None:
        self._pending = b""  # an incomplete size line, data CRLF or trailer line
        self._left = 0  # data bytes of the current chunk still to come
        self._state = "size"  # size -> data -> crlf -> size ... -> trailers -> done
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buf = self._pending + data if self._pending else data
        body = []
        pos, end = 0, len(buf)
        while pos < end and not self.done:
            if self._state == "data":
                take = min(self._left, end - pos)
                body.append(buf[pos:pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._state = "crlf"
                continue
            if self._state == "crlf":
                if end - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise StreamBroken(f"a chunk's data is not followed by CRLF ({buf[pos:pos + 2]!r})")
                pos += 2
                self._state = "size"
                continue
            newline = buf.find(b"\r\n", pos)
            if newline < 0:
                if end - pos > MAX_LINE_BYTES:
                    raise StreamBroken("a chunk size or trailer line is too long")
                break
            line, pos = buf[pos:newline], newline + 2
            if self._state == "trailers":
                self.done = not line  # the blank line ends the trailer section
                continue
            size = line.split(b";", 1)[0].strip(b" \t")
            if not _CHUNK_SIZE.fullmatch(size):
                raise StreamBroken(f"bad chunk size line {line[:40]!r}")
            self._left = int(size, 16)
            self._state = "data" if self._left else "trailers"
        self._pending = buf[pos:]
        return b"".join(body)


@lru_cache(maxsize=1)
def _default_tls() -> ssl.SSLContext:
    return httpx.create_ssl_context()


def tls_context(verify: ssl.SSLContext | bool) -> ssl.SSLContext:
    """The context an https stream verifies its server with (hpcllm.httpkit.client.verify_of's answer)."""
    return verify if isinstance(verify, ssl.SSLContext) else _default_tls()


class ReadWait:
    """Yielded by a non-blocking stream's body in place of data: wait until `fileno()` is readable, then iterate
    on. The stream keeps the read timeout: iterated on past it with nothing to read, it raises StreamBroken."""

    def __init__(self, sock: socket.socket, timeout: float | None, host: str) -> None:
        self._sock = sock
        self.timeout = timeout
        self._host = host
        self._since: float | None = None  # when the stream began waiting (its last data before)
        self.closed = False  # the stream was closed (from any thread): a waiter stops waiting for it

    def fileno(self) -> int:
        return self._sock.fileno()

    def remaining(self) -> float | None:
        """Seconds left of the read timeout (None: no timeout)."""
        if self.timeout is None:
            return None
        if self._since is None:
            self._since = time.monotonic()
        return max(0.0, self._since + self.timeout - time.monotonic())

    def data_came(self) -> None:
        self._since = None

    def nothing_came(self) -> None:
        """A receive found nothing: StreamBroken once the read timeout has passed since the last data."""
        if self.remaining() == 0.0:
            raise StreamBroken(f"no data from {self._host} within {self.timeout} s")


def wait_for_any(waits: list[ReadWait]) -> list[ReadWait]:
    """Block until one of the waits' sockets is readable; those that are, or, when a read timeout passed first or a
    stream was closed meanwhile, those (their next iteration raises). poll, not select: a gateway process may hold
    more than FD_SETSIZE sockets (gevent patches poll as it does select)."""
    closed = [wait for wait in waits if wait.closed]
    if closed:
        return closed
    poller = select.poll()
    by_fd = {}
    for wait in waits:
        fd = wait.fileno()
        if fd < 0:  # closed since the check above
            return [wait]
        by_fd[fd] = wait
        poller.register(fd, select.POLLIN)
    timeouts = [left for left in (wait.remaining() for wait in waits) if left is not None]
    events = poller.poll(math.ceil(min(timeouts) * 1000) if timeouts else None)
    if events:
        return [by_fd[fd] for fd, _ in events if fd in by_fd]
    return [wait for wait in waits if wait.remaining() == 0.0]


class StreamingPost:
    """One POST and its answer. open() sends the request and reads the answer's status and headers; then
    `pieces()` yields the body as it arrives, or `read()` returns all of it (an error answer)."""

    def __init__(self, url: str, body: bytes, headers: dict[str, str], timeout: httpx.Timeout,
                 verify: ssl.SSLContext | bool = True) -> None:
        self.url = httpx.URL(url)
        self._body = body
        self._headers = headers
        self._timeout = timeout
        self._verify = verify
        self._sock: socket.socket | None = None
        self._http = h11.Connection(h11.CLIENT)
        self.status = 0
        self.reason = ""
        self.headers: dict[str, str] = {}
        self.wait: ReadWait | None = None  # set by yield_when_idle(): the body is read without blocking

    # ------------------------------------------------------------------------------------------------- opening
    def open(self) -> StreamingPost:
        """Connect, send the request, read the answer's head. Raises StreamBroken (nothing left open then)."""
        try:
            self._connect()
            self._send()
            self._read_head()
        except BaseException:
            self.close()
            raise
        return self

    def _connect(self) -> None:
        url = self.url
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            sock = socket.create_connection((url.host, port), timeout=self._timeout.connect)
            self._sock = sock
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if url.scheme == "https":  # the handshake runs under the connect timeout
                self._sock = tls_context(self._verify).wrap_socket(sock, server_hostname=url.host)
        except (OSError, ssl.SSLError) as exc:
            raise StreamBroken(f"cannot connect to {url.host}:{port}: {exc}") from exc

    def _send(self) -> None:
        url = self.url
        headers = [("Host", url.netloc.decode("ascii")), ("Content-Length", str(len(self._body))),
                   ("Connection", "close"), *self._headers.items()]
        request = h11.Request(method="POST", target=url.raw_path, headers=headers)
        try:
            data = self._http.send(request) + self._http.send(h11.Data(data=self._body)) + \
                self._http.send(h11.EndOfMessage())
            self._sock.settimeout(self._timeout.write)
            self._sock.sendall(data)
        except (OSError, h11.LocalProtocolError) as exc:
            raise StreamBroken(f"sending the request to {url.host} failed: {exc}") from exc

    def _read_head(self) -> None:
        self._sock.settimeout(self._timeout.read)
        while True:
            event = self._next_event()
            if event is h11.NEED_DATA:
                self._receive()
            elif isinstance(event, h11.Response):
                self.status = event.status_code
                self.reason = event.reason.decode("latin-1")
                self.headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in event.headers}
                return
            # an h11.InformationalResponse (1xx): the real answer follows

    def yield_when_idle(self) -> None:
        """From now on `pieces()` never blocks: when the socket has nothing, it yields `self.wait` (a ReadWait)
        instead. Only for a chunked body (the streams a worker answers); any other body is still read blocking."""
        if self.wait is None and self._sock is not None and self._chunked():
            self.wait = ReadWait(self._sock, self._timeout.read, self.url.host)
            self._sock.settimeout(0.0)

    def _chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    # ------------------------------------------------------------------------------------------------- the body
    def pieces(self) -> Iterator[bytes | ReadWait]:
        """The body as it arrives: per receive, all the data it brought (every HTTP chunk in it), joined; ends
        at the end of the answer. A connection that breaks before raises StreamBroken. After yield_when_idle(),
        a ReadWait between pieces: the socket is to be waited for before the next receive."""
        if self._chunked():
            yield from self._chunked_pieces()
            return
        while True:
            data = []
            while True:
                event = self._next_event()
                if event is h11.NEED_DATA:
                    break
                if isinstance(event, h11.Data):
                    data.append(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    if data:
                        yield b"".join(data)
                    return
            if data:
                yield b"".join(data)
            self._receive()
            while isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
                self._receive()  # decrypted bytes of a TLS record the last receive did not take: there already

    def _chunked_pieces(self) -> Iterator[bytes]:
        decoder = ChunkedDecoder()
        data = bytes(self._http.trailing_data[0])  # what came with the head (h11 has not parsed it)
        while True:
            body = decoder.feed(data)
            if body:
                yield body
            if decoder.done:
                return
            if self.wait is not None:
                data = yield from self._receive_when_readable()
            else:
                data = self._receive_bytes()
            while isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
                data += self._receive_bytes()  # the rest of a TLS record the last receive did not take (no wait)
            if not data:
                raise StreamBroken(f"{self.url.host} closed the connection before the end of the answer")

    def read(self) -> bytes:
        """All of the (rest of the) body."""
        return b"".join(self.pieces())

    def _next_event(self):
        try:
            return self._http.next_event()
        except h11.RemoteProtocolError as exc:
            raise StreamBroken(f"the answer from {self.url.host} broke off or is not HTTP: {exc}") from exc

    def _receive(self) -> None:
        self._http.receive_data(self._receive_bytes())  # b"": closed; the next event says if that was too early

    def _receive_when_readable(self):
        """One receive on the non-blocking socket, the consumer waiting for it to be readable first (its poll says
        so at once when data is there; a receive that finds nothing would cost a system call and an exception per
        piece)."""
        wait = self.wait
        while True:
            yield wait
            try:
                data = self._receive_bytes()
            except _NothingYet:
                wait.nothing_came()  # woken without data (or past the timeout: raises)
                continue
            wait.data_came()
            return data

    def _receive_bytes(self) -> bytes:
        sock = self._sock
        if sock is None:
            raise StreamBroken("the stream was closed")
        try:
            return sock.recv(RECEIVE_BYTES)
        except socket.timeout as exc:
            raise StreamBroken(f"no data from {self.url.host} within {self._timeout.read} s") from exc
        except (BlockingIOError, ssl.SSLWantReadError):  # a non-blocking socket (yield_when_idle) with nothing
            raise _NothingYet from None
        except (OSError, ssl.SSLError) as exc:
            raise StreamBroken(f"reading from {self.url.host} failed: {exc}") from exc

    def close(self) -> None:
        """Close the connection (from any thread: a reader waiting in a receive wakes up with StreamBroken)."""
        sock, self._sock = self._sock, None
        if self.wait is not None:
            self.wait.closed = True
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
