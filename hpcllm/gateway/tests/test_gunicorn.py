"""`hpcllm gateway` for real: gunicorn with two workers in a subprocess, in front of the real worker; each worker
class (gthread, gevent)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from hpcllm.procs import stop_process
from hpcllm.tests.ports import free_port

from .conftest import ADMIN_KEY, MODEL, SECRET, USER_KEY


DRAIN_S = 6  # the stuck request waits it out (twice: gthread, gevent); the stream and the probes take ~1 s
GATEWAY_PROCESSES = 2  # gunicorn worker processes of the gateways these tests start


def write_config(path: Path, state_dir: Path, port: int, worker_url: str, source: Path, stuck_url: str,
                 worker_class: str, slow_url: str) -> Path:
    path.write_text(f"""
[paths]
state_dir = "{state_dir}"

[cluster]
shared_secret = "{SECRET}"

[gateway]
host = "127.0.0.1"
port = {port}
workers = {GATEWAY_PROCESSES}
worker_class = "{worker_class}"
threads = 4
drain_timeout_seconds = {DRAIN_S}
admin_key = "{ADMIN_KEY}"

[[gateway.api_keys]]
key = "{USER_KEY}"
name = "alice"

[gateway.static_models.{MODEL}]
worker_url = "{worker_url}"
source = "{source}"

# A "worker" that accepts connections and never answers: a request to it stays in flight.
[gateway.static_models.stuck]
worker_url = "{stuck_url}"
source = "{source}"

# A worker that streams a token every 0.1 s: a generation that runs for seconds.
[gateway.static_models.slow]
worker_url = "{slow_url}"
source = "{source}"
""")
    path.chmod(0o600)  # holds the secret: the gateway refuses it otherwise
    return path


@contextlib.contextmanager
def blackhole():
    """The URL of a "worker" that accepts connections and never answers, until the block ends."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)  # never accepted: clients connect, send, and wait
        yield f"http://127.0.0.1:{hole.getsockname()[1]}"


@pytest.fixture
def blackhole_url():
    with blackhole() as url:
        yield url


@pytest.fixture
def slow_in_flight():
    from .stand_in_worker import InFlight

    return InFlight()


@pytest.fixture
def slow_url(slow_in_flight):
    from .conftest import ThreadServer
    from .stand_in_worker import slow_worker_app

    server = ThreadServer(slow_worker_app(seconds_per_token=0.1, in_flight=slow_in_flight))
    yield server.url
    server.stop()


@contextlib.contextmanager
def running_gateway(tmp_path: Path, worker_url: str, source: Path, stuck_url: str, slow_url: str,
                    worker_class: str):
    """`hpcllm gateway` in a subprocess until it answers /health; SIGTERM (then kill) when the block ends."""
    port = free_port()
    config = write_config(tmp_path / "gateway.toml", tmp_path / "state", port, worker_url, source, stuck_url,
                          worker_class, slow_url)
    with gunicorn_process(tmp_path, config, port) as running:
        yield running


@contextlib.contextmanager
def gunicorn_process(tmp_path: Path, config: Path, port: int):
    """`hpcllm gateway --config config` (listening on port) in a subprocess until it answers /health; SIGTERM (then
    kill) when the block ends."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    log = open(tmp_path / "gateway.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "hpcllm.cli.main", "gateway", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {(tmp_path / 'gateway.log').read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        raise AssertionError(f"gateway did not come up: {(tmp_path / 'gateway.log').read_text()}")
    try:
        yield proc, url, tmp_path
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture(params=["gthread", "gevent"])
def gunicorn_gateway(request, tmp_path, worker_url, tiny_model_dir, blackhole_url, slow_url):
    with running_gateway(tmp_path, worker_url, tiny_model_dir, blackhole_url, slow_url, request.param) as running:
        yield running


def test_gunicorn_serves_aggregates_metrics_and_drains_on_sigterm(gunicorn_gateway):
    """One gunicorn run (starting one is slow on a busy 2-core machine): serve, scrape, then SIGTERM."""
    import openai

    proc, url, tmp_path = gunicorn_gateway
    requests = 4
    texts = set()
    for _ in range(requests):
        # A fresh connection per request lets either gunicorn worker take it.
        with openai.OpenAI(base_url=f"{url}/v1", api_key=USER_KEY, max_retries=0, timeout=60) as client:
            resp = client.completions.create(model=MODEL, prompt="hello world", max_tokens=3, temperature=0,
                                             extra_body={"ignore_eos": True})
        texts.add(resp.choices[0].text)
    assert len(texts) == 1  # greedy: every worker process gives the same answer
    with openai.OpenAI(base_url=f"{url}/v1", api_key=USER_KEY, max_retries=0, timeout=60) as client:
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    # A chunked body (no Content-Length) over gateway.max_request_bytes (4 MiB): 413, not a JSON error about the text
    # werkzeug cut off at the limit.
    big = json.dumps({"model": MODEL, "prompt": "x" * (5 << 20)}).encode()
    resp = httpx.post(f"{url}/v1/completions", content=iter([big[:3 << 20], big[3 << 20:]]), timeout=60,
                      headers={"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large", resp.text

    # Every scrape, whichever process answers it, reports the sum over all worker processes.
    for _ in range(4):
        text = httpx.get(f"{url}/metrics", timeout=10).text
        assert f'hpcllm_request_success_total{{finished_reason="length",model_name="{MODEL}"}} {requests + 1}.0' \
            in text, text
    assert list((tmp_path / "state" / "gateway" / "prometheus").glob("master-*/*.db")), \
        "metrics were not written in multiprocess mode"
    check_shared_by_the_worker_processes(url)
    check_a_batch_runs_once(url)

    # Two requests in flight at SIGTERM: a real stream, and one stuck on a worker that never answers.
    stuck_outcome = {}

    def stuck_request():
        started = time.monotonic()
        try:
            r = httpx.post(f"{url}/v1/completions", json={"model": "stuck", "prompt": "hi"}, timeout=60,
                           headers={"Authorization": f"Bearer {USER_KEY}"})
            stuck_outcome["result"] = r.status_code
        except httpx.HTTPError as exc:
            stuck_outcome["result"] = type(exc).__name__
        stuck_outcome["seconds"] = time.monotonic() - started

    stuck = threading.Thread(target=stuck_request)
    stuck.start()
    time.sleep(0.5)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 60, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {USER_KEY}"}) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        rest = [line for line in lines if line]
    # The running stream finished completely.
    assert rest[-1] == "data: [DONE]"
    *events, usage = [json.loads(line.removeprefix("data: ")) for line in rest[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    # The whole stream arrived, not a cut one. (Not a count of events with text: a sampled token may decode to no
    # text yet - part of a character - and tokens that arrive together share an event.)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 60

    # While a request is still running, the gateway keeps answering: new requests get a clear 503 (not a hang
    # in the listen backlog), /ready says 503, /health stays 200.
    while True:
        probe = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=10)
        if probe.status_code == 503 or time.monotonic() - signalled > DRAIN_S / 2:
            break
        time.sleep(0.2)  # workers get the signal from the master's loop within about a second
    assert probe.status_code == 503 and probe.json()["error"]["code"] == "draining"
    assert probe.headers["Retry-After"]
    assert httpx.get(f"{url}/ready", timeout=10).status_code == 503
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200

    # The stuck request is cut when the drain timeout runs out, and the gateway exits.
    stuck.join(DRAIN_S + 30)
    assert stuck_outcome["result"] != 200
    assert stuck_outcome["seconds"] < DRAIN_S + 10
    assert proc.wait(30) == 0
    assert not list((tmp_path / "state" / "gateway" / "prometheus").glob("master-*")), \
        "the metrics directory of a stopped gateway was left behind"

    # The drain is in the log, from each forked worker and gunicorn's master alike, in every service's log format
    # (hpcllm.logs.FORMAT): time, logger, level.
    log = (tmp_path / "gateway.log").read_text()
    lines = service_log_lines(log)
    assert [line for line in lines if line[2].startswith("gateway draining")] == [
        ("hpcllm.gateway.runtime", "INFO", "gateway draining: refusing new requests, letting running ones finish")
    ] * GATEWAY_PROCESSES, log
    assert [line[:2] for line in lines if line[2].startswith("drain timeout: 1 requests still running")] == [
        ("hpcllm.gateway.server", "WARNING")], log
    assert ("gunicorn.error", "INFO", "Handling signal: term") in lines, log


SERVICE_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\S+) ([A-Z]+) (.*)")


def service_log_lines(log: str) -> list[tuple[str, str, str]]:
    """(logger, level, message) of each line of a log in the services' format (hpcllm.logs.FORMAT)."""
    return [match.groups() for line in log.splitlines() if (match := SERVICE_LOG_LINE.fullmatch(line))]


def check_shared_by_the_worker_processes(url: str) -> None:
    """What one gunicorn worker process writes to the gateway's database the others read: a stored response (each
    process opens it on its first use) and the usage records (each process has its own writer thread, started after
    the fork)."""
    import openai

    with openai.OpenAI(base_url=f"{url}/v1", api_key=USER_KEY, max_retries=0, timeout=60) as client:
        stored = client.responses.create(model=MODEL, input="hello", max_output_tokens=2)
    for _ in range(4):  # a fresh connection each: either process answers
        got = httpx.get(f"{url}/v1/responses/{stored.id}", headers={"Authorization": f"Bearer {USER_KEY}"},
                        timeout=10)
        assert got.status_code == 200 and got.json()["output"][0]["content"][0]["text"] == stored.output_text
    # 4 completions of 3 tokens, a streamed chat of 3 and the response of 2 (the 413 never reached a worker), each
    # written by whichever process served it: a report from either sees all once their writers ran.
    want = {"requests": 6, "completion_tokens": 4 * 3 + 3 + 2}
    deadline = time.monotonic() + 30
    while True:
        report = httpx.get(f"{url}/v1/admin/usage", params={"by": "key"}, timeout=10,
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
        got = {name: report["total"][name] for name in want}
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert got == want and [row["key"] for row in report["data"]] == ["alice"], report


def check_a_batch_runs_once(url: str) -> None:
    """Both worker processes poll for batches; one claims it, and each request runs once: the output holds each
    custom_id once, and the usage report grows by exactly the batch's requests."""
    import io

    import openai

    def alice_requests() -> int:
        return httpx.get(f"{url}/v1/admin/usage", params={"by": "key"}, timeout=10,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["total"]["requests"]

    before = alice_requests()
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": MODEL, "prompt": f"hello {i}", "max_tokens": 2}} for i in range(6)]
    with openai.OpenAI(base_url=f"{url}/v1", api_key=USER_KEY, max_retries=0, timeout=60) as client:
        source = io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())
        uploaded = client.files.create(file=("batch.jsonl", source), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
        deadline = time.monotonic() + 60
        while (batch := client.batches.retrieve(batch.id)).status != "completed" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert batch.status == "completed" and batch.request_counts.completed == 6, batch
        output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in output) == [f"r{i}" for i in range(6)]
    deadline = time.monotonic() + 30
    while alice_requests() < before + 6 and time.monotonic() < deadline:  # each process's writer thread
        time.sleep(0.3)
    assert alice_requests() == before + 6
    # Counted once over both processes; the database's gauges (files stored) shown by whichever process answers.
    for _ in range(4):
        text = httpx.get(f"{url}/metrics", timeout=10).text
        assert f'hpcllm_batch_requests_total{{model_name="{MODEL}",status="completed"}} 6.0' in text, text
        assert 'hpcllm_files 2.0' in text, text


def abort_count(url: str, model: str) -> float:
    line = f'hpcllm_request_success_total{{finished_reason="abort",model_name="{model}"}} '
    found = [ln for ln in httpx.get(f"{url}/metrics", timeout=10).text.splitlines() if ln.startswith(line)]
    return float(found[0].rsplit(" ", 1)[1]) if found else 0.0


def wait_for_abort_count(url: str, model: str, count: float, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while abort_count(url, model) < count:
        assert time.monotonic() < deadline, f"the generation was not cancelled within {within_s} s"
        time.sleep(0.2)


def test_gevent_gateway_serves_long_generations_side_by_side_and_cancels_those_whose_client_left(
        tmp_path, worker_url, tiny_model_dir, blackhole_url, slow_url, slow_in_flight):
    """Under gevent every request is a greenlet of one thread: a request that waits (on the worker, on its client)
    must let the others run, and the checks for a client that left must not wait for the client."""
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    with running_gateway(tmp_path, worker_url, tiny_model_dir, blackhole_url, slow_url, "gevent") as (_, url, _):
        # Non-streaming requests of ~1.5 s each, more at once than processes: each is checked for a client that
        # left at every token (a check that waited for the client to send something would hold it forever), and
        # they overlap.
        results = []

        def complete() -> None:
            r = httpx.post(f"{url}/v1/completions", json={"model": "slow", "prompt": "hi", "max_tokens": 15},
                           headers=headers, timeout=30)
            results.append((r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text))

        requests = [threading.Thread(target=complete) for _ in range(6)]
        for thread in requests:
            thread.start()
        for thread in requests:
            thread.join(60)
        assert results == [(200, "x" * 15)] * 6
        # Side by side: the worker streamed more of them at once than the gateway has processes (one request at a
        # time per process would make it at most GATEWAY_PROCESSES).
        assert slow_in_flight.most > GATEWAY_PROCESSES, slow_in_flight.most

        # A streaming client that leaves: its generation is cancelled long before its 20 s are up.
        before = abort_count(url, "slow")
        body = {"model": "slow", "prompt": "hi", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=30) as stream:
            assert next(line for line in stream.iter_lines() if line).startswith("data: {")
        wait_for_abort_count(url, "slow", before + 1, within_s=10)

        # A non-streaming client that leaves mid-generation: noticed by the client-gone check, cancelled too.
        payload = json.dumps({"model": "slow", "prompt": "hi", "max_tokens": 200}).encode()
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as client:
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Authorization: Bearer " + USER_KEY.encode() + b"\r\n"
                           b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            time.sleep(1.5)
        wait_for_abort_count(url, "slow", before + 2, within_s=10)


def raw_answer(url: str, request: bytes) -> bytes:
    """The gateway's answer to raw request bytes; the client sends nothing after them (half-closes)."""
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as client:
        client.settimeout(30)
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    return answer


@pytest.fixture(scope="module", params=["gthread", "gevent"])
def refusing_gateway(request, tmp_path_factory, tiny_model_dir):
    """(url, log, process) of a gateway of each worker class whose models all point at a worker that never answers,
    shared by the tests that only send it requests it refuses before any worker is asked (a start takes ~10 s
    here), then stopped by test_a_gateway_stops_without_a_traceback_in_its_log: last in this file, it runs after
    them for each worker class (pytest keeps file order within a module fixture's parameter)."""
    tmp_path = tmp_path_factory.mktemp(f"refusing-{request.param}")
    with blackhole() as hole, running_gateway(tmp_path, hole, tiny_model_dir, hole, hole,
                                              request.param) as (proc, url, _):
        yield url, tmp_path / "gateway.log", proc


def test_a_body_that_cannot_be_read_is_a_400_not_a_500_with_a_traceback(refusing_gateway):
    """gunicorn raises its parse errors while a view reads the body: they were 'internal server error' answers
    with a traceback in the gateway's log, for a mistake of the client's."""
    head = (b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + USER_KEY.encode() +
            b"\r\nContent-Type: %s\r\n")
    requests = [
        head % (b"/v1/completions", b"application/json") + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        head % (b"/v1/completions", b"application/json") + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}XY",
        head % (b"/v1/files", b"multipart/form-data; boundary=b") + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    ]
    url, log_path, _ = refusing_gateway
    logged_before = log_path.stat().st_size
    for request in requests:
        answer = raw_answer(url, request)
        assert answer.startswith(b"HTTP/1.1 400 ") and b'"code":"unreadable_body"' in answer, (request, answer)
    with log_path.open("rb") as log_file:  # what the gateway logged while it answered these
        log = log_file.read()[logged_before:].decode(errors="replace")
    assert "Traceback" not in log and "unexpected error" not in log, log


def test_after_a_body_that_cannot_be_read_the_connection_closes(refusing_gateway):
    """Where a broken body ends is unknown, so what follows it must not be served as a next request, and the 400
    must not promise the client a connection it can reuse (Connection: keep-alive, then closed under it)."""
    auth = b"Host: x\r\nAuthorization: Bearer " + USER_KEY.encode() + b"\r\n"
    following = b"GET /v1/models HTTP/1.1\r\n" + auth + b"\r\n"
    broken = (b"POST /v1/completions HTTP/1.1\r\n" + auth + b"Content-Type: application/json\r\n"
              b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + following)
    url, _, _ = refusing_gateway
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as client:
        client.settimeout(30)
        client.sendall(broken)  # and no half-close: the gateway itself must end the connection
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert answer.startswith(b"HTTP/1.1 400 ") and b"\r\nconnection: close" in head, answer
    assert answer.count(b"HTTP/1.1 ") == 1, answer


def test_gunicorns_own_refusals_have_the_one_error_shape(refusing_gateway):
    """Requests gunicorn refuses before the app runs (a request line or headers over its limits, a malformed
    request line) were answered with an HTML page, unlike every other error of the gateway: an openai client or a
    script reading error.code got no JSON."""
    auth = b"Host: x\r\nAuthorization: Bearer " + USER_KEY.encode() + b"\r\n"
    # Each within one read of gunicorn's (8 KiB): bytes left unread when it closes would reset the connection.
    requests = [
        (b"GET /v1/models?" + b"q" * 5_000 + b" HTTP/1.1\r\n" + auth + b"\r\n", 414),  # request line over 4094
        (b"GET /v1/models HTTP/1.1\r\n" + auth + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n",
         431),  # more than 100 header fields
        (b"NOT A REQUEST LINE\r\n" + auth + b"\r\n", 400),
    ]
    url, _, _ = refusing_gateway
    for request, status in requests:
        answer = raw_answer(url, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), (request[:60], answer)
        assert b"\r\ncontent-type: application/json" in head.lower(), answer
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request_error" and error["code"] and error["message"], error


def test_a_gateway_stops_without_a_traceback_in_its_log(refusing_gateway):
    """SIGTERM to a gateway that served a request: it drains and exits 0, and its log holds no traceback (gevent's
    workers printed logging's `_removeHandlerRef` TypeError as each exited). The refusing tests' gateway (the same
    configuration; one start fewer per worker class): this test stops it, so it stays last in this file."""
    url, log_path, proc = refusing_gateway
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {USER_KEY}"},
                     timeout=30).status_code == 200
    stop_process(proc)
    log = log_path.read_text()
    assert proc.returncode == 0 and "Shutting down: Master" in log, log
    assert "Traceback" not in log and "Exception ignored" not in log, log


def open_gateway_config(tmp_path: Path, worker_url: str, source: Path, drain_timeout_s: float) -> tuple[Path, int]:
    """An open development gateway (one gthread worker): its requests write nothing to the limits database (no key,
    no rate limits), so only the usage writer waits while a test holds the database's write lock."""
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
[paths]
state_dir = "{tmp_path / 'state'}"

[cluster]
shared_secret = "{SECRET}"
dev = true

[gateway]
host = "127.0.0.1"
port = {port}
workers = 1
worker_class = "gthread"
drain_timeout_seconds = {drain_timeout_s}

[gateway.static_models.{MODEL}]
worker_url = "{worker_url}"
source = "{source}"
""")
    config.chmod(0o600)
    return config, port


@contextlib.contextmanager
def limits_db_locked(tmp_path: Path):
    """The gateway's limits database with its write lock held by the test (the usage writer waits for it: busy
    timeout 30 s) until the block ends."""
    lock = sqlite3.connect(tmp_path / "state" / "gateway" / "limits.db", isolation_level=None, timeout=30)
    try:
        lock.execute("BEGIN IMMEDIATE")
        yield
    finally:
        lock.rollback()
        lock.close()


def usage_rows(tmp_path: Path) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "gateway" / "limits.db")) as db:
        return db.execute("SELECT endpoint, requests, completion_tokens FROM gateway_usage").fetchall()


def answer_one_completion(url: str, client: httpx.Client | None = None) -> None:
    answer = (client or httpx).post(f"{url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "hello", "max_tokens": 3, "ignore_eos": True})
    assert answer.status_code == 200, answer.text


def test_usage_of_requests_answered_just_before_sigterm_is_written_before_the_worker_exits(tmp_path, worker_url,
                                                                                           tiny_model_dir):
    """A gunicorn worker writes usage records from a background thread; one still queued when the worker stopped
    (the limits database slow or busy) died with it: requests served, never accounted. The worker closes its
    gateway as it exits, which writes what is queued, within the drain timeout. (gthread only: under gevent the
    test's lock on the database would freeze the whole worker process, its signal handling included.)"""
    config, port = open_gateway_config(tmp_path, worker_url, tiny_model_dir, drain_timeout_s=60)
    gateway_log = tmp_path / "gateway.log"
    with gunicorn_process(tmp_path, config, port) as (proc, url, _):
        with limits_db_locked(tmp_path):
            answer_one_completion(url)
            proc.send_signal(signal.SIGTERM)
            # The lock is held until the worker is about to write the queued record on its way out, or has exited.
            deadline = time.monotonic() + 60
            while proc.poll() is None and "usage records" not in gateway_log.read_text():
                assert time.monotonic() < deadline, gateway_log.read_text()
                time.sleep(0.1)
        assert proc.wait(60) == 0, gateway_log.read_text()
    assert usage_rows(tmp_path) == [("completions", 1, 3)], gateway_log.read_text()


def test_a_quick_stop_does_not_wait_on_a_stalled_limits_database(tmp_path, worker_url, tiny_model_dir):
    """SIGINT or SIGQUIT stops the gateway at once: the worker's close of its gateway (batches handed back, queued
    usage written) waited up to 20 s on a stalled limits database (its usage writer 5 s, the batch runner 10 s, the
    lease heartbeat 5 s). It now gives up after 1 s and says what is lost."""
    config, port = open_gateway_config(tmp_path, worker_url, tiny_model_dir, drain_timeout_s=60)
    gateway_log = tmp_path / "gateway.log"
    # The client's connection stays open until the gateway is gone: gunicorn's gthread worker, on SIGQUIT, shuts
    # its thread pool down in the signal handler, which can deadlock when it interrupts the main thread while
    # handing that pool a connection event (this connection closing): a hang until the master's SIGKILL.
    with gunicorn_process(tmp_path, config, port) as (proc, url, _), httpx.Client(timeout=60) as client:
        with limits_db_locked(tmp_path):
            answer_one_completion(url, client)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0, gateway_log.read_text()
    log = gateway_log.read_text()
    assert re.search(r"gateway shutdown: 1 usage records not written after [01] s .*they are lost", log), log
    assert usage_rows(tmp_path) == [], log


def test_gateways_side_by_side_share_no_gunicorn_control_socket(tmp_path, worker_url, tiny_model_dir, monkeypatch):
    """gunicorn 27 opens a control socket at one path per user ($XDG_RUNTIME_DIR/gunicorn.ctl): a second gateway on
    the host replaced the first's, gunicornc reached the wrong one, and either gateway's stop removed it. The
    gateway opens none."""
    runtime_dir = tmp_path / "runtime"
    runtime_dir.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime_dir))
    logs = []
    with contextlib.ExitStack() as gateways:
        for name in ("first", "second"):
            (tmp_path / name).mkdir()
            config, port = open_gateway_config(tmp_path / name, worker_url, tiny_model_dir, drain_timeout_s=DRAIN_S)
            gateways.enter_context(gunicorn_process(tmp_path / name, config, port))
            logs.append(tmp_path / name / "gateway.log")
        assert list(runtime_dir.iterdir()) == [], [log.read_text() for log in logs]
    for log in logs:
        assert "Control socket" not in log.read_text(), log.read_text()
