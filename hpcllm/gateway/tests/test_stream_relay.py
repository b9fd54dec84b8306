"""The stream relay (hpcllm.gateway.relay) on real sockets: bodies that wait for their worker are served by the
relay's one thread, their chunks reach the client whole and in order, and a slow client, a client that left, a
body's hand-back and a worker stream closed elsewhere all return the body to its request thread."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, Counter

from hpcllm.gateway import relay as relay_module
from hpcllm.gateway.relay import HAND_BACK, StreamRelay
from hpcllm.httpkit.streaming import ChunkedDecoder, ReadWait

RELAY_THREAD = "hpcllm-stream-relay"


def new_relay() -> tuple[StreamRelay, Counter]:
    counter = Counter("handovers", "test", ["returned"], registry=CollectorRegistry())
    return StreamRelay(counter), counter


def returned(counter: Counter, why: str) -> float:
    return counter.labels(why)._value.get()


class FakeBody:
    """A relayable body as the gateway's are: it reads a 'worker' socket without blocking (a ReadWait when nothing
    came), yields what came as one piece and records which thread produced it; b"HAND" makes it yield HAND_BACK and
    then a piece b"after-hand-back"; the worker closing its end ends the body."""

    def __init__(self) -> None:
        self.worker, self._sock = socket.socketpair()
        self._sock.setblocking(False)
        self.wait = ReadWait(self._sock, 30.0, "fake-worker")
        self.produced_on: list[tuple[bytes, str]] = []
        self.closed_early = False

    def __iter__(self):
        try:
            yield b"head;"
            while True:
                yield self.wait
                try:
                    data = self._sock.recv(1 << 20)
                except BlockingIOError:
                    self.wait.nothing_came()
                    continue
                self.wait.data_came()
                if not data:
                    return
                if data == b"HAND":
                    yield HAND_BACK
                    data = b"after-hand-back;"
                self.produced_on.append((data, threading.current_thread().name))
                yield data
        except GeneratorExit:
            self.closed_early = True
            raise

    def close_worker_elsewhere(self) -> None:
        """What StreamingPost.close() from another thread does to a relayed stream."""
        self.wait.closed = True
        self._sock.close()


class RequestThread(threading.Thread):
    """gunicorn's part: iterate the WSGI body, write each item as an HTTP chunk, then the last chunk."""

    def __init__(self, relay: StreamRelay, body: FakeBody, sock: socket.socket, http_version: str = "HTTP/1.1"):
        super().__init__(name=f"request-{id(body)}", daemon=True)
        self.wsgi_body = relay.body(iter(body), sock, http_version)
        self.sock = sock
        self.chunked = http_version != "HTTP/1.0"
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for item in self.wsgi_body:
                self.sock.sendall(b"%x\r\n%s\r\n" % (len(item), item) if self.chunked else item)
            if self.chunked:
                self.sock.sendall(b"0\r\n\r\n")
            self.sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            self.error = exc


def read_all(client: socket.socket, chunked: bool = True) -> bytes:
    decoder, body = ChunkedDecoder(), []
    while True:
        data = client.recv(1 << 16)
        if not data:
            break
        body.append(decoder.feed(data) if chunked else data)
    assert decoder.done or not chunked, "the answer ended without its last chunk"
    return b"".join(body)


@pytest.mark.parametrize("http_version", ["HTTP/1.1", "HTTP/1.0"])
def test_bodies_that_wait_for_their_worker_are_served_by_the_relay_whole_and_in_order(http_version):
    relay, counter = new_relay()
    bodies = [FakeBody() for _ in range(4)]
    pairs = [socket.socketpair() for _ in bodies]
    threads = [RequestThread(relay, body, server, http_version) for body, (server, _) in zip(bodies, pairs)]
    for thread in threads:
        thread.start()
    sent = {i: [] for i in range(len(bodies))}
    for step in range(40):  # an engine step: every stream gets a piece at once
        for i, body in enumerate(bodies):
            piece = f"s{i}-t{step};".encode()
            body.worker.sendall(piece)
            sent[i].append(piece)
        time.sleep(0.003)
    for body in bodies:
        body.worker.close()
    answers = [read_all(client, http_version == "HTTP/1.1") for _, client in pairs]
    for thread in threads:
        thread.join(10)
        assert thread.error is None
    for i, body in enumerate(bodies):
        assert answers[i] == b"head;" + b"".join(sent[i])
        # After the head (written by gunicorn's thread), the pieces were read and written by the relay.
        assert {name for _, name in body.produced_on} == {RELAY_THREAD}
        assert not body.closed_early
    assert returned(counter, "request_thread") == len(bodies)  # each came back once: at its end


def test_a_slow_client_goes_back_to_its_request_thread_with_the_unsent_rest_and_loses_nothing():
    relay, counter = new_relay()
    body = FakeBody()
    server, client = socket.socketpair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    thread = RequestThread(relay, body, server)
    thread.start()
    big = [bytes([65 + k]) * 200_000 for k in range(3)]  # more than the client's socket holds while it sleeps

    def worker() -> None:
        body.worker.sendall(b"first;")
        for piece in big:
            body.worker.sendall(piece)
            time.sleep(0.05)
        body.worker.close()

    threading.Thread(target=worker, daemon=True).start()
    time.sleep(0.3)  # the client reads nothing for a while: the relay's write does not fit
    answer = read_all(client)
    thread.join(10)
    assert thread.error is None
    assert answer == b"head;first;" + b"".join(big)
    assert returned(counter, "slow_client") == 1
    # Once back, the slow stream stays with its own thread (the relay never waits on one client).
    assert body.produced_on[-1][1] == thread.name


def test_a_client_that_left_ends_the_body_and_closes_it_on_its_request_thread():
    relay, counter = new_relay()
    body = FakeBody()
    server, client = socket.socketpair()
    thread = RequestThread(relay, body, server)
    thread.start()
    body.worker.sendall(b"one;")
    assert client.recv(100).startswith(b"5\r\nhead;")
    client.close()
    for _ in range(20):  # the relay's next write fails
        try:
            body.worker.sendall(b"more;")
        except OSError:
            break
        time.sleep(0.02)
        if not thread.is_alive():
            break
    thread.join(10)
    assert not thread.is_alive()
    assert body.closed_early  # the body was closed (the gateway's cancels its worker streams)
    assert returned(counter, "client_gone") == 1


def test_a_hand_back_runs_the_body_on_its_request_thread_until_it_waits_again():
    relay, counter = new_relay()
    body = FakeBody()
    server, client = socket.socketpair()
    thread = RequestThread(relay, body, server)
    thread.start()
    body.worker.sendall(b"a;")
    time.sleep(0.1)
    body.worker.sendall(b"HAND")
    time.sleep(0.1)
    body.worker.sendall(b"b;")
    time.sleep(0.1)
    body.worker.close()
    assert read_all(client) == b"head;a;after-hand-back;b;"
    thread.join(10)
    assert [name for _, name in body.produced_on] == [RELAY_THREAD, thread.name, RELAY_THREAD]
    assert returned(counter, "request_thread") == 2  # the hand-back, then the end


def test_a_worker_stream_closed_elsewhere_goes_back_to_its_request_thread(monkeypatch):
    monkeypatch.setattr(relay_module, "CHECK_INTERVAL_S", 0.1)
    relay, counter = new_relay()
    body = FakeBody()
    server, client = socket.socketpair()
    thread = RequestThread(relay, body, server)
    thread.start()
    body.worker.sendall(b"a;")
    time.sleep(0.2)
    body.close_worker_elsewhere()  # the socket is gone from the selector without a wake-up
    thread.join(5)
    assert not thread.is_alive()
    assert isinstance(thread.error, OSError)  # the request thread's next read says the stream is closed
    assert returned(counter, "worker_timeout") == 1
