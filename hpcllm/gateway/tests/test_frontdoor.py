"""The front door (conf/nginx/hpcllm.conf): the openai client streams through nginx over TLS, verifying the
certificate against the self-signed CA; slow or oversized requests are nginx's problem, not a gateway thread's."""

from __future__ import annotations

import shutil
import socket
import ssl
import threading
import time

import httpx
import openai
import pytest

from hpcllm.gateway import frontdoor

from .conftest import MODEL, USER_KEY

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None and not frontdoor.Path("/usr/sbin/nginx").exists(),
                                reason="nginx is not installed (make host installs it)")


def trusting(door) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(door.ca))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def front(make_gateway, tmp_path):
    gw = make_gateway(max_request_bytes=64 * 1024)
    port = free_port()
    door = frontdoor.start(gw.config, tmp_path / "nginx", f"127.0.0.1:{port}", upstream=gw.url.removeprefix("http://"))
    yield gw, door, f"https://localhost:{port}"
    assert frontdoor.stop(door.run_dir)


def test_the_openai_client_streams_through_nginx_with_tls_verification(front):
    gw, door, url = front
    with httpx.Client(verify=trusting(door)) as http:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=USER_KEY, max_retries=0, http_client=http)
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
    assert chunks[-1].usage.completion_tokens == 8
    # Without the CA the certificate is not trusted: verification is real.
    with pytest.raises(httpx.ConnectError) as exc:
        httpx.get(f"{url}/health")
    assert "CERTIFICATE_VERIFY_FAILED" in str(exc.value)


def test_tokens_arrive_as_they_are_generated(front):
    """No response buffering in nginx: the first event arrives long before the last."""
    gw, door, url = front
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, verify=trusting(door), timeout=60,
                      headers={"Authorization": f"Bearer {USER_KEY}"}) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line)
        first_at = time.monotonic()
        rest = [line for line in lines if line]
        last_at = time.monotonic()
    assert rest[-1] == "data: [DONE]" and len(rest) > 100
    assert last_at - first_at > 0.2  # the rest was still being generated when the first event came


def test_size_limit_and_slow_headers_stop_at_nginx(front):
    gw, door, url = front
    too_big = httpx.post(f"{url}/v1/completions", content=b"x" * (65 * 1024), verify=trusting(door),
                         headers={"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"})
    assert too_big.status_code == 413
    # A client that never finishes its headers costs the gateway nothing: nginx holds (and times out) it, and
    # a normal client is served meanwhile.
    context = trusting(door)
    port = int(url.rsplit(":", 1)[1])
    threads_before = threading.active_count()  # the test gateway (werkzeug) runs a thread per connection
    slow = [context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
            for _ in range(40)]
    try:
        for conn in slow:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n")  # and never the rest
        time.sleep(0.5)
        assert threading.active_count() - threads_before < 5  # none of them reached the gateway
        assert gw.state.in_flight == 0
        ok = httpx.get(f"{url}/v1/models", verify=trusting(door), headers={"Authorization": f"Bearer {USER_KEY}"})
        assert ok.status_code == 200
    finally:
        for conn in slow:
            conn.close()


def closed_by_server(conn: ssl.SSLSocket) -> bool:
    conn.settimeout(2)
    try:
        data = conn.recv(1024)
    except TimeoutError:
        return False  # still open
    except OSError:
        return True  # reset, or TLS torn down
    return data == b"" or data.startswith(b"HTTP/1.1 408")


def test_200_slow_clients_do_not_stop_a_stream(front):
    """The issue's attack (two connections sending a header line every 10 s held a gunicorn thread each; 32 stopped
    the gateway), 200 times over, on loopback: each connection dribbles a header line every 2 s. nginx holds them
    (and drops them at client_header_timeout); a normal client streams through meanwhile and the gateway never
    sees a slow one."""
    gw, door, url = front
    context = trusting(door)
    port = int(url.rsplit(":", 1)[1])
    threads_before = threading.active_count()
    slow = [context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
            for _ in range(200)]
    stop = threading.Event()

    def dribble():
        for conn in slow:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n")
        line = 0
        while not stop.wait(2.0):
            line += 1
            for conn in slow:
                try:
                    conn.sendall(f"X-Slow-{line}: {'a' * 20}\r\n".encode())
                except OSError:
                    pass  # nginx gave up on it: what it should do

    dribbler = threading.Thread(target=dribble)
    dribbler.start()
    try:
        time.sleep(3)  # every slow connection has sent headers at least twice
        with httpx.Client(verify=context, timeout=60) as http:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=USER_KEY, max_retries=0, http_client=http)
            chunks = list(client.completions.create(model=MODEL, prompt="hello", max_tokens=32, stream=True,
                                                    extra_body={"ignore_eos": True}))
        assert chunks[-1].choices[0].finish_reason == "length"
        assert sum(1 for c in chunks if c.choices[0].text) >= 16
        # The test gateway (werkzeug) runs a thread per connection: none of the 200 reached it.
        assert threading.active_count() - threads_before < 10
        assert gw.state.in_flight == 0
        # nginx drops them at client_header_timeout (10 s after they connected), however they dribble.
        time.sleep(9)
        assert sum(closed_by_server(conn) for conn in slow) == len(slow)
    finally:
        stop.set()
        dribbler.join(10)
        for conn in slow:
            conn.close()
