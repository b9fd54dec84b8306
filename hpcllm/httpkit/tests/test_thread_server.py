"""The tests' threaded server closes every response, as gunicorn does, even when the peer resets the connection
right after the last byte (what nginx does to the upstream connection of a client that left after `[DONE]`)."""

from __future__ import annotations

import socket
import struct
import threading

from flask import Flask, Response

from hpcllm.httpkit.tests.thread_server import ThreadServer

CONNECTIONS = 5


def streaming_app(closed: list[int], all_closed: threading.Event) -> Flask:
    app = Flask("stream")

    @app.post("/stream")
    def stream():
        response = Response((b"data: %d\n\n" % i for i in range(3)), mimetype="text/event-stream")

        def on_close():
            closed.append(1)
            if len(closed) == CONNECTIONS:
                all_closed.set()

        response.call_on_close(on_close)
        return response

    return app


def read_then_reset(port: int) -> None:
    """Read the whole event stream, then close with a reset (SO_LINGER 0) instead of a FIN."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"POST /stream HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
        received = b""
        while b"data: 2\n\n" not in received:
            chunk = conn.recv(65536)
            assert chunk, received
            received += chunk
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_a_response_whose_client_resets_after_the_last_byte_is_closed():
    closed: list[int] = []
    all_closed = threading.Event()
    server = ThreadServer(streaming_app(closed, all_closed))
    try:
        for _ in range(CONNECTIONS):
            read_then_reset(server.port)
        # werkzeug's own server closes none of them (the reset escapes while it discards the rest of the request)
        assert all_closed.wait(timeout=30), f"{len(closed)} of {CONNECTIONS} responses closed"
        assert len(closed) == CONNECTIONS  # and none twice
    finally:
        server.stop()
