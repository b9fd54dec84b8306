"""The internal services' server (hpcllm.httpkit.server): bounded threads that slow clients cannot hold, streams
written as produced, bodies bounded, TLS with the site CA."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import pytest
from flask import Blueprint, Response, request

from hpcllm.config import InternalHttpConfig
from hpcllm.errors import ConfigError
from hpcllm.httpkit.app import service_app
from hpcllm.httpkit.client import internal_client
from hpcllm.httpkit.errors import RequestTooLarge
from hpcllm.httpkit.server import InternalServer


def demo_app():
    bp = Blueprint("demo", __name__)

    @bp.get("/ping")
    def ping():
        return {"pong": True}

    @bp.post("/echo")
    def echo():
        return {"bytes": len(request.get_data())}

    @bp.get("/stream")
    def stream():
        def lines():
            for i in range(3):
                yield f"{i}\n".encode()
                time.sleep(0.5)

        return Response(lines(), mimetype="application/x-ndjson")

    return service_app("demo", [bp], max_request_bytes=1 << 20)


@pytest.fixture
def serve():
    servers = []

    def start(threads: int = 4, **settings) -> InternalServer:
        server = InternalServer(demo_app(), "127.0.0.1", 0, http=InternalHttpConfig(**settings), threads=threads,
                                name="demo")
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def slow_sender(port: int, stop: threading.Event, closed: list) -> None:
    """Opens a request and sends one more header line every 0.5 s, never finishing it (slowloris)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(0.2)
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
        i = 0
        while not stop.is_set():
            try:
                sock.sendall(f"X-Slow-{i}: y\r\n".encode())
                if sock.recv(1024) == b"":
                    closed.append(time.monotonic())
                    return
            except socket.timeout:
                pass
            except OSError:
                closed.append(time.monotonic())
                return
            i += 1
            stop.wait(0.5)


def test_slow_connections_do_not_stop_a_normal_client(serve):
    server = serve(threads=2, request_read_timeout_seconds=2.0)
    stop, closed = threading.Event(), []
    senders = [threading.Thread(target=slow_sender, args=(server.port, stop, closed)) for _ in range(8)]
    for sender in senders:  # 8 slow connections against 2 threads
        sender.start()
    try:
        time.sleep(0.5)
        # Without the read deadline the 2 threads stay with the slow senders for ever and these requests time out
        # (httpx's ReadTimeout); with it they are served once the senders' connections are cut (~2 s). No bound on
        # how long they waited: a loaded machine took 4.03 s once, and the timeout already tells the two apart.
        with httpx.Client(timeout=15) as client:
            answers = [client.get(f"http://127.0.0.1:{server.port}/ping") for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        # Each sender returns once it sees its connection closed (it looks every ~0.5 s; under load, later).
        give_up = time.monotonic() + 15.0
        for sender in senders:
            sender.join(timeout=max(0.0, give_up - time.monotonic()))
        assert len(closed) == 8, "the server closes connections that do not finish their request in time"
        assert server.deadline_closes >= 8
    finally:
        stop.set()
        for sender in senders:
            sender.join()


def test_a_slow_body_is_cut_off_too(serve):
    server = serve(threads=1, request_read_timeout_seconds=1.5)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        started = time.monotonic()
        sock.settimeout(5)
        try:
            for _ in range(20):
                sock.sendall(b"x")
                time.sleep(0.25)
        except OSError:
            pass
        assert time.monotonic() - started < 3.5
    answer = httpx.post(f"http://127.0.0.1:{server.port}/echo", content=b"y" * 1000, timeout=5)
    assert answer.json() == {"bytes": 1000}


def test_streams_are_written_as_they_are_produced(serve):
    server = serve()
    with httpx.stream("GET", f"http://127.0.0.1:{server.port}/stream", timeout=10) as resp:
        started = time.monotonic()
        lines = resp.iter_lines()
        first = next(lines)
        assert first == "0" and time.monotonic() - started < 0.4
        assert list(lines) == ["1", "2"]


def test_bodies_over_the_limit_are_refused(serve):
    server = serve(max_request_bytes=64 * 1024)
    url = f"http://127.0.0.1:{server.port}/echo"
    assert httpx.post(url, content=b"x" * 1000).json() == {"bytes": 1000}
    assert httpx.post(url, content=b"x" * 200_000).status_code == 413


def answer_to(port: int, request: bytes) -> bytes:
    """What the server answers to raw request bytes, read until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(15)
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("chunked", [True, False])
def test_a_body_over_the_limit_is_a_413_chunked_or_not(serve, caplog, chunked):
    server = serve(max_request_bytes=64 * 1024)
    url = f"http://127.0.0.1:{server.port}/echo"
    assert httpx.post(url, content=iter([b"x" * 1000] * 10)).json() == {"bytes": 10_000}  # chunked, within
    body = b"x" * 200_000
    refused = httpx.post(url, content=iter([body]) if chunked else body)  # chunked: no length said up front
    # the same words, told by Content-Length or found while reading chunks (by Content-Length: cheroot's, before)
    assert (refused.status_code, refused.json()["error"]["message"]) == (413, RequestTooLarge.over(64 * 1024).message)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "an error was logged"


@pytest.mark.parametrize("head, body", [
    (b"Transfer-Encoding: chunked", b"zz\r\nab\r\n0\r\n\r\n"),  # a chunk size that is no hex number
    (b"Transfer-Encoding: chunked", b"2\r\nabXY0\r\n\r\n"),  # a chunk without its CRLF
    (b"Content-Length: -5", b""),
])
def test_a_malformed_body_is_a_400_not_a_500_with_a_traceback(serve, caplog, head, body):
    """Anyone who reaches an internal port could fill the service's log with ERROR tracebacks this way."""
    server = serve()
    answer = answer_to(server.port, b"POST /echo HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n\r\n" + body)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"malformed request body" in answer, answer
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "an error was logged"
    assert httpx.get(f"http://127.0.0.1:{server.port}/ping").json() == {"pong": True}


def received_until_closed(sock: socket.socket) -> bytes:
    """What the server sends until it closes; a reset (it closed with bytes of ours unread) ends it as a close."""
    answer = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return answer
        if not chunk:
            return answer
        answer += chunk


def test_an_endless_chunk_size_line_is_refused_before_it_is_read_whole(serve):
    """cheroot read a chunk-size line whole (however long, until its line break) before checking it against the
    body's limit: 200 MB of "size" was 400 MB of the service's memory."""
    server = serve(max_request_bytes=64 * 1024)
    line_bytes = 64 * 1024 * 1024
    sent, stopped_by = [0], []

    def send_the_line(sock: socket.socket) -> None:
        block = b"1" * 65536
        try:
            while sent[0] < line_bytes:
                sock.sendall(block)
                sent[0] += len(block)
        except OSError as exc:  # the server closed the connection on us: the test's point
            stopped_by.append(exc)

    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(30)
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        sender = threading.Thread(target=send_the_line, args=(sock,), daemon=True)
        sender.start()
        answer = received_until_closed(sock)
        sender.join(30)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"malformed request body" in answer, answer[:300]
    assert stopped_by and sent[0] < line_bytes, f"the server read all {sent[0]} bytes of the line"


@pytest.mark.parametrize("head, status", [
    (b"GET /ping HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 8000) for i in range(256)),
     b"413"),
    (b"GET /ping?" + b"q" * 2_000_000 + b" HTTP/1.1\r\nHost: x\r\n", b"414"),
])
def test_a_request_head_past_its_bound_is_refused(serve, head, status):
    """Unbounded, a head (2 MB here) was read whole into memory before any credential was checked: a few clients
    sending endless header lines within the read deadline could take a controller's memory."""
    server = serve()
    answer = answer_to(server.port, head + b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]
    assert httpx.get(f"http://127.0.0.1:{server.port}/ping").json() == {"pong": True}


def error_of_answer(answer: bytes) -> tuple[int, dict[str, str], dict]:
    """A raw answer's status, headers (lower-case names) and JSON body."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip()
               for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split(" ")[1]), headers, json.loads(body)


@pytest.mark.parametrize("request_bytes, status, code", [
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400,
     "invalid_request"),  # a malformed body: the server's own check
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n", 413, "request_too_large"),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n30d40\r\n", 413,
     "request_too_large"),
    (b"GET /ping HTTP/1.1\r\nHost: x\r\n" + b"X-Filler: " + b"y" * 70_000 + b"\r\n\r\n", 413, "request_too_large"),
    (b"GET /ping?" + b"q" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request_uri_too_long"),
    (b"GET /ping HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\n\r\n", 400, "invalid_request"),  # cheroot's
])
def test_the_servers_own_refusals_have_the_one_error_shape(serve, request_bytes, status, code):
    """Refusals before the app runs (malformed or oversized bodies and heads) were plain text, unlike every other
    error: a curl script or a monitor reading error.code got no JSON."""
    server = serve(max_request_bytes=64 * 1024)
    answer_status, headers, body = error_of_answer(answer_to(server.port, request_bytes))
    assert (answer_status, body["error"]["code"]) == (status, code), body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"], body
    assert headers["content-type"] == "application/json" and headers["connection"] == "close", headers


def test_errors_have_the_one_shape(serve):
    server = serve()
    resp = httpx.get(f"http://127.0.0.1:{server.port}/nowhere")
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "unknown_url" and resp.json()["error"]["type"] == "invalid_request_error"


def test_tls_with_the_site_ca(serve, site_ca):
    server = serve(tls_cert_file=site_ca.cert, tls_key_file=site_ca.key, tls_ca_file=site_ca.ca)
    http = InternalHttpConfig(tls_cert_file=site_ca.cert, tls_key_file=site_ca.key, tls_ca_file=site_ca.ca)
    assert server.scheme == "https"
    with internal_client(http) as client:
        assert client.get(f"https://localhost:{server.port}/ping").json() == {"pong": True}
        with client.stream("GET", f"https://127.0.0.1:{server.port}/stream") as resp:
            assert list(resp.iter_lines()) == ["0", "1", "2"]
    with httpx.Client() as public_roots:  # not signed by a public CA: refused
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            public_roots.get(f"https://localhost:{server.port}/ping")
    with pytest.raises(httpx.HTTPError):  # plain HTTP gets no answer from a TLS port
        httpx.get(f"http://127.0.0.1:{server.port}/ping", timeout=3)


def test_a_silent_tls_client_does_not_stall_the_server(serve, site_ca):
    server = serve(threads=2, request_read_timeout_seconds=2.0, tls_cert_file=site_ca.cert,
                   tls_key_file=site_ca.key, tls_ca_file=site_ca.ca)
    http = InternalHttpConfig(tls_cert_file=site_ca.cert, tls_key_file=site_ca.key, tls_ca_file=site_ca.ca)
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]  # never say hello
    try:
        started = time.monotonic()
        with internal_client(http, timeout=10) as client:
            assert client.get(f"https://localhost:{server.port}/ping").status_code == 200
        assert time.monotonic() - started < 1.5
    finally:
        for sock in silent:
            sock.close()


def test_incomplete_tls_settings_are_a_config_error(site_ca):
    with pytest.raises(ValueError, match="tls_key_file"):
        InternalHttpConfig(tls_cert_file=site_ca.cert, tls_ca_file=site_ca.ca)
    bad = InternalHttpConfig(tls_cert_file=site_ca.ca, tls_key_file=site_ca.ca, tls_ca_file=site_ca.ca)
    with pytest.raises(ConfigError, match="cannot load the certificate"):
        InternalServer(demo_app(), "127.0.0.1", 0, http=bad, threads=1, name="demo")


def test_a_server_left_running_does_not_keep_the_process_from_exiting():
    """A server bound and serving but never stopped (a failed start, a forgotten test server) must not hang the
    interpreter's exit: cheroot's worker threads would, so ours are daemons."""
    import subprocess
    import sys

    script = ("from flask import Flask\n"
              "from hpcllm.config import InternalHttpConfig\n"
              "from hpcllm.httpkit.server import InternalServer\n"
              "server = InternalServer(Flask('left'), '127.0.0.1', 0, http=InternalHttpConfig(), threads=4, name='left')\n"
              "server.start()\n"
              "print(server.port)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().isdigit(), done.stderr
