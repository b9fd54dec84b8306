"""`hpcllm gateway` for real: gunicorn with two gthread workers in a subprocess, in front of the real worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from .conftest import MODEL, SECRET, USER_KEY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DRAIN_S = 10


def write_config(path: Path, state_dir: Path, port: int, worker_url: str, source: Path, stuck_url: str) -> Path:
    path.write_text(f"""
[paths]
state_dir = "{state_dir}"

[cluster]
shared_secret = "{SECRET}"

[gateway]
host = "127.0.0.1"
port = {port}
workers = 2
threads = 4
drain_timeout_seconds = {DRAIN_S}

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
""")
    path.chmod(0o600)  # holds the secret: the gateway refuses it otherwise
    return path


@pytest.fixture
def blackhole_url():
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)  # never accepted: clients connect, send, and wait
        yield f"http://127.0.0.1:{hole.getsockname()[1]}"


@pytest.fixture
def gunicorn_gateway(tmp_path, worker_url, tiny_model_dir, blackhole_url):
    port = free_port()
    config = write_config(tmp_path / "gateway.toml", tmp_path / "state", port, worker_url, tiny_model_dir,
                          blackhole_url)
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
    yield proc, url, tmp_path
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.close()


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

    # Every scrape, whichever process answers it, reports the sum over all worker processes.
    for _ in range(4):
        text = httpx.get(f"{url}/metrics", timeout=10).text
        assert f'hpcllm_request_success_total{{finished_reason="length",model_name="{MODEL}"}} {requests + 1}.0' \
            in text, text
    assert list((tmp_path / "state" / "gateway" / "prometheus").glob("master-*/*.db")), \
        "metrics were not written in multiprocess mode"

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
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 60, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {USER_KEY}"}) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        rest = [line for line in lines if line]
    # The running stream finished completely.
    assert rest[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in rest[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for e in events if e["choices"][0]["text"]) > 30  # the whole stream arrived, not a cut one

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
