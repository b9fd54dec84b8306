"""The front door (conf/nginx/hpcllm.conf): the openai client streams through nginx over TLS, verifying the
certificate against the self-signed CA; slow or oversized requests are nginx's problem, not a gateway thread's."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from hpcllm.gateway import frontdoor
from hpcllm.tests.ports import free_port

from .conftest import MODEL, USER_KEY

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None and not frontdoor.Path("/usr/sbin/nginx").exists(),
                                reason="nginx is not installed (make host installs it)")


def trusting(door) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(door.ca))


@pytest.fixture
def front(make_gateway, tmp_path):
    gw = make_gateway(max_request_bytes=64 * 1024)
    port = free_port()
    door = frontdoor.start(gw.config, tmp_path / "nginx", f"127.0.0.1:{port}", upstream=gw.url.removeprefix("http://"))
    yield gw, door, f"https://localhost:{port}"
    assert frontdoor.stop(door.run_dir)


@pytest.fixture(params=["another program", "another nginx"])
def stranger(request, tmp_path):
    """A live process a stale nginx.pid may name after a crash or a reboot: any program, or an nginx not started with
    this run folder's nginx.conf (a system nginx: here a copy of sleep named nginx, which is what /proc shows)."""
    program = shutil.which("sleep")
    if request.param == "another nginx":
        program = shutil.copy(program, tmp_path / "nginx")
    other = subprocess.Popen([program, "600"])
    deadline = time.monotonic() + 60  # Popen may return before the child has exec'd: /proc shows python until then
    while Path(f"/proc/{other.pid}/comm").read_text().strip() != Path(program).name:
        assert time.monotonic() < deadline, f"pid {other.pid} did not become {program}"
        time.sleep(0.01)
    yield other
    other.kill()
    other.wait()


def test_stop_leaves_alone_the_process_a_stale_pid_file_names(tmp_path, stranger, caplog):
    door = frontdoor.FrontDoor(tmp_path / "nginx-run")
    door.run_dir.mkdir()
    door.pid_file.write_text(f"{stranger.pid}\n")
    assert frontdoor.stop(door.run_dir) is False
    assert stranger.poll() is None, f"stop signalled pid {stranger.pid}, not the nginx of {door.conf}"
    assert not door.pid_file.exists()
    assert f"names pid {stranger.pid}, which is not the nginx of {door.conf}: left alone, file removed" in caplog.text


def test_start_again_leaves_the_running_nginx_alone(front):
    """make up runs start every time: with this run folder's nginx running it is left serving, not started twice."""
    gw, door, url = front
    pid = door.pid_file.read_text()
    frontdoor.start(gw.config, door.run_dir, url.replace("https://localhost", "127.0.0.1"),
                    upstream=gw.url.removeprefix("http://"))
    assert door.pid_file.read_text() == pid
    assert httpx.get(f"{url}/health", verify=trusting(door)).status_code == 200


def test_start_is_not_fooled_by_a_stale_pid_file(make_gateway, tmp_path, stranger):
    """A pid file left from before names no nginx of this run folder: start starts one (and leaves the PID alone)."""
    gw = make_gateway()
    door = frontdoor.FrontDoor(tmp_path / "nginx-run")
    door.run_dir.mkdir()
    door.pid_file.write_text(f"{stranger.pid}\n")
    port = free_port()
    frontdoor.start(gw.config, door.run_dir, f"127.0.0.1:{port}", upstream=gw.url.removeprefix("http://"))
    try:
        assert httpx.get(f"https://localhost:{port}/health", verify=trusting(door)).status_code == 200
    finally:
        assert frontdoor.stop(door.run_dir), f"the nginx start() began is not the one in {door.pid_file}"
    assert stranger.poll() is None


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


def test_tokens_arrive_as_they_are_generated(tmp_path, tiny_model_dir):
    """No response buffering in nginx: the first token's event reaches the client while the worker still holds the
    rest (a buffering proxy would hold it until the answer ended, or its buffer filled)."""
    from .conftest import GatewayFactory, ThreadServer
    from .stand_in_worker import gated_worker_app

    release, finished = threading.Event(), threading.Event()
    worker = ThreadServer(gated_worker_app(release, finished))
    factory = GatewayFactory(tmp_path, worker.url, tiny_model_dir)
    gw = factory()
    port = free_port()
    door = frontdoor.start(gw.config, tmp_path / "nginx", f"127.0.0.1:{port}", upstream=gw.url.removeprefix("http://"))
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 8, "stream": True}
    try:
        with httpx.stream("POST", f"https://localhost:{port}/v1/completions", json=body, verify=trusting(door),
                          timeout=60, headers={"Authorization": f"Bearer {USER_KEY}"}) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line)
            worker_still_generating = not finished.is_set()  # a buffering proxy: the worker ended 20 s later
            release.set()
            rest = [line for line in lines if line]
        assert worker_still_generating and json.loads(first.removeprefix("data: "))["choices"][0]["text"] == "x"
        assert rest[-1] == "data: [DONE]" and "".join(json.loads(line.removeprefix("data: "))["choices"][0]["text"]
                                                     for line in rest[:-1]) == "x" * 7
    finally:
        release.set()
        assert frontdoor.stop(door.run_dir)
        factory.stop_all()
        worker.stop()


def test_size_limit_and_slow_headers_stop_at_nginx(front):
    gw, door, url = front
    too_big = httpx.post(f"{url}/v1/completions", content=b"x" * (65 * 1024), verify=trusting(door),
                         headers={"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"})
    assert too_big.status_code == 413
    error = too_big.json()["error"]  # OpenAI's error shape, as the gateway's own 413 (not nginx's HTML page)
    assert error["code"] == "request_too_large" and f"{64 * 1024} bytes" in error["message"], error
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


def closed_by_server(conn: ssl.SSLSocket, within_s: float) -> bool:
    """True when the server closes (or resets) the connection within within_s seconds."""
    conn.settimeout(max(0.5, within_s))
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
    slow, connected_at = [], []
    for _ in range(200):
        slow.append(context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"))
        connected_at.append(time.monotonic())
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
                                                    stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True}))
        assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 32
        # Streamed, not answered at the end (tokens that reach the gateway together share an event, so not one each).
        assert sum(1 for c in chunks[:-1] if c.choices[0].text) >= 2
        # The test gateway (werkzeug) runs a thread per connection: none of the 200 reached it.
        assert threading.active_count() - threads_before < 10
        # The stream's own count ends when the gateway closes its response, a moment after the client read [DONE].
        deadline = time.monotonic() + 10
        while gw.state.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gw.state.in_flight == 0
        # nginx drops them at client_header_timeout (10 s after they connected), however they dribble (5 s of
        # slack for a busy machine).
        still_open = [i for i, conn in enumerate(slow)
                      if not closed_by_server(conn, connected_at[i] + 15 - time.monotonic())]
        assert not still_open, f"{len(still_open)} slow connections were still open 15 s after connecting"
    finally:
        stop.set()
        dribbler.join(10)
        for conn in slow:
            conn.close()




def test_gateway_shutdown_ends_a_stream_through_nginx_with_an_error_event_and_settles_its_tokens(tmp_path,
                                                                                                  tiny_model_dir):
    """`hpcllm gateway` (gunicorn) behind nginx gets SIGTERM while a stream runs longer than its drain time: the
    client gets the gateway_shutdown error event and [DONE] (the openai client raises it), not a cut connection,
    and the key's token bucket gets back what the stream had reserved but not used."""
    import signal
    import subprocess
    import sys

    from hpcllm.config import load_config
    from hpcllm.gateway.ratelimit import _bucket_id
    from hpcllm.gateway.shared_state import SharedState

    from .conftest import SECRET, ThreadServer
    from .stand_in_worker import slow_worker_app

    worker = ThreadServer(slow_worker_app(seconds_per_token=0.2))
    gateway_port, tpm = free_port(), 100_000
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(f"""
[paths]
state_dir = "{tmp_path / 'state'}"
[cluster]
shared_secret = "{SECRET}"
[gateway]
host = "127.0.0.1"
port = {gateway_port}
workers = 1
threads = 4
drain_timeout_seconds = 7
[[gateway.api_keys]]
key = "{USER_KEY}"
tokens_per_minute = {tpm}
[gateway.static_models.slow]
worker_url = "{worker.url}"
source = "{tiny_model_dir}"
""")
    config_path.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with open(tmp_path / "gateway.log", "wb") as log:
        gateway = subprocess.Popen([sys.executable, "-m", "hpcllm.cli.main", "gateway", "--config", str(config_path)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    port = free_port()
    door = None
    try:
        deadline = time.monotonic() + 90
        while not _answers(f"http://127.0.0.1:{gateway_port}/health"):
            assert gateway.poll() is None and time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
            time.sleep(0.3)
        door = frontdoor.start(load_config(config_path), tmp_path / "nginx", f"127.0.0.1:{port}")
        bucket = _bucket_id(load_config(config_path).gateway.api_keys[0], "tokens")
        limits = SharedState(tmp_path / "state" / "gateway" / "limits.db")

        def used() -> float:
            return tpm - limits.level(bucket, capacity=tpm, per_second=0.0)

        body = {"model": "slow", "prompt": "hello", "max_tokens": 400, "stream": True}
        with httpx.stream("POST", f"https://localhost:{port}/v1/completions", json=body, timeout=60,
                          verify=trusting(door), headers={"Authorization": f"Bearer {USER_KEY}"}) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")
            reserved = used()
            assert reserved >= 400  # prompt + max_tokens, while it runs
            gateway.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            rest = [line for line in lines if line]
        # The drain budget (7 - 5 s) ran out long before the 400 tokens (80 s): the stream was ended, with words.
        assert time.monotonic() - signalled < 15
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert error["code"] == "gateway_shutdown" and "shutting down" in error["message"]
        assert gateway.wait(30) == 0
        # Settled: the prompt and the tokens really delivered are charged, the rest of the 400 came back.
        delivered = sum(1 for line in rest[:-2] if json.loads(line.removeprefix("data: "))["choices"][0]["text"])
        assert 0 < delivered < 100
        assert used() <= reserved - 300, (used(), reserved)
        limits.close()
    finally:
        if door is not None:
            frontdoor.stop(door.run_dir)
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
        worker.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_batch_files_larger_than_a_request_body_upload_through_nginx(front):
    """nginx bounds bodies by gateway.max_request_bytes (64 KiB here), but POST /v1/files by files_max_bytes."""
    import io

    gw, door, url = front
    content = b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n' + b" " * (256 << 10)
    with httpx.Client(verify=trusting(door)) as http:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=USER_KEY, max_retries=0, http_client=http)
        uploaded = client.files.create(file=("big.jsonl", io.BytesIO(content)), purpose="batch")
        assert client.files.content(uploaded.id).content == content
        with pytest.raises(openai.APIStatusError) as refused:  # any other endpoint keeps the request bound
            client.completions.create(model=MODEL, prompt="x" * (256 << 10))
    assert refused.value.status_code == 413


def test_a_gateway_that_does_not_answer_is_a_503_in_the_error_shape(make_gateway, tmp_path):
    """nginx in front of a gateway that is down (restarting): the openai client gets a 503 with a message and
    Retry-After in OpenAI's error shape, which it retries, not nginx's HTML 502 page; a file upload too (its route
    has error pages of its own)."""
    gw = make_gateway()
    port = free_port()
    door = frontdoor.start(gw.config, tmp_path / "nginx", f"127.0.0.1:{port}", upstream=f"127.0.0.1:{free_port()}")
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    try:
        answers = [httpx.get(f"https://localhost:{port}/v1/models", verify=trusting(door), headers=headers),
                   httpx.post(f"https://localhost:{port}/v1/files", verify=trusting(door), headers=headers,
                              files={"file": ("in.jsonl", b"{}\n")}, data={"purpose": "batch"})]
    finally:
        assert frontdoor.stop(door.run_dir)
    for resp in answers:
        assert resp.status_code == 503, (resp.request.url, resp.text)
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.json()["error"]["code"] == "gateway_unavailable" and resp.headers["Retry-After"] == "5"
