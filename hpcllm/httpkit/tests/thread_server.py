"""A WSGI app served over real HTTP in a daemon thread (werkzeug's threaded server), for tests.

werkzeug's server skips the response's close() when the peer resets the connection just after the response (its
request handler reads what is left of the request to discard it, and the reset raised there escapes before the close):
nginx does that to an upstream connection whose client left right after `[DONE]`. Close-time bookkeeping (the
gateway's in-flight count, a worker's stream slot) would then never run. Here the dropped connection closes the
response too, once, as gunicorn always does."""

from __future__ import annotations

import threading

from werkzeug.serving import WSGIRequestHandler, make_server

_RESPONSE_KEY = "hpcllm.tests.response"


class _CloseOnce:
    """The app's response iterable, closed at most once (by werkzeug, or by the handler when the connection dropped)."""

    def __init__(self, iterable):
        self._iterable = iterable
        self._closed = False

    def __iter__(self):
        return iter(self._iterable)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        close = getattr(self._iterable, "close", None)
        if close is not None:
            close()


class _ClosingRequestHandler(WSGIRequestHandler):
    def connection_dropped(self, error: BaseException, environ=None) -> None:
        response = (environ or {}).get(_RESPONSE_KEY)
        if response is not None:
            response.close()


def _remember_response(app):
    def wsgi(environ, start_response):
        response = environ[_RESPONSE_KEY] = _CloseOnce(app(environ, start_response))
        return response
    return wsgi


# How often serve_forever looks for a stop(): socketserver's default, 0.5 s, made every stop() wait 0.25 s on
# average (thousands of them in the test suite).
STOP_POLL_S = 0.05


class ThreadServer:
    """A WSGI app on 127.0.0.1:<port, free by default> in a daemon thread."""

    def __init__(self, app, port: int = 0):
        self.app = app
        self.server = make_server("127.0.0.1", port, _remember_response(app), threaded=True,
                                  request_handler=_ClosingRequestHandler)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(STOP_POLL_S,), daemon=True)
        self.thread.start()

    def start_again(self) -> None:
        """After stop(): the same app on the same port again (a restarted service)."""
        self.__init__(self.app, self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class CannedServer(ThreadServer):
    """A server that is not the service a client expects: every request (any path, any method) gets `answer`,
    (content type, body bytes), which a test may change between requests."""

    METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]

    def __init__(self, answer: tuple[str, bytes] = ("application/json", b"{}")):
        from flask import Flask, Response

        self.answer = answer
        app = Flask("canned")

        @app.route("/", defaults={"path": ""}, methods=self.METHODS)
        @app.route("/<path:path>", methods=self.METHODS)
        def any_path(path: str):
            return Response(self.answer[1], content_type=self.answer[0])

        super().__init__(app)
