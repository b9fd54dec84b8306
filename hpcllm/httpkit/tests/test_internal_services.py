"""The internal services on their production server: the controller as `hpcllm controller` runs it (TLS with a
site CA, two HTTP threads, a 2 s read deadline), reached by the gateway's router and the admin CLI's client;
slow clients do not stop it."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from hpcllm.config import load_config
from hpcllm.controller.cli import AdminClient
from hpcllm.controller.protocol import ClusterStatus
from hpcllm.gateway.errors import ServiceUnavailable
from hpcllm.gateway.routing import ControllerRouter

ROOT = Path(__file__).resolve().parents[3]
SECRET = "internal-secret-for-tests"
ADMIN_KEY = "admin-key-for-tests"


@pytest.fixture
def controller(tmp_path, site_ca):
    config_path = tmp_path / "hpcllm.toml"
    config_path.write_text(f"""
[paths]
state_dir = "{tmp_path / 'state'}"
[cluster]
shared_secret = "{SECRET}"
[controller]
host = "127.0.0.1"
admin_key = "{ADMIN_KEY}"
threads = 2
allocate_on_demand = false
[internal_http]
tls_cert_file = "{site_ca.cert}"
tls_key_file = "{site_ca.key}"
tls_ca_file = "{site_ca.ca}"
request_read_timeout_seconds = 2.0
""")
    config_path.chmod(0o600)
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-m", "hpcllm", "controller", "--config", str(config_path), "--port",
                             "0", "--ready-file", str(ready)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the controller did not start"
            time.sleep(0.1)
        yield load_config(config_path), ready.read_text().strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_controller_serves_https_verified_against_the_site_ca(controller, caplog):
    config, url = controller
    assert url.startswith("https://127.0.0.1:")
    trusting = ControllerRouter(url, shared_secret=SECRET, http=config.internal_http)
    assert trusting.list_models() == [] and trusting.check_ready() is None
    assert AdminClient(config, url).call("GET", "/v1/admin/status", ClusterStatus)["nodes"] == []
    untrusting = ControllerRouter(url, shared_secret=SECRET)  # public roots only: the site's certificate is refused
    with pytest.raises(ServiceUnavailable, match="controller cannot be reached"):
        untrusting.list_models()
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text  # why, for the operator (clients are not told addresses)


def slow_tls_sender(port: int, ca: Path, stop: threading.Event, closed: list) -> None:
    """A TLS client that sends one more header line every 0.5 s and never ends its request."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        sock.settimeout(0.2)
        i = 0
        while not stop.is_set():
            try:
                sock.sendall(f"X-Slow-{i}: y\r\n".encode())
                if sock.recv(1024) == b"":
                    break
            except (socket.timeout, ssl.SSLWantReadError):
                pass
            except OSError:
                break
            i += 1
            stop.wait(0.5)
        closed.append(time.monotonic())


def test_slow_clients_do_not_stop_a_normal_client_of_the_controller(controller):
    config, url = controller
    port = int(url.rsplit(":", 1)[1])
    stop, closed = threading.Event(), []
    senders = [threading.Thread(target=slow_tls_sender, args=(port, config.internal_http.tls_ca_file, stop, closed))
               for _ in range(6)]  # three times the controller's two threads
    for sender in senders:
        sender.start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        router = ControllerRouter(url, shared_secret=SECRET, http=config.internal_http, models_ttl_s=0)
        for _ in range(3):
            assert router.list_models() == []
        waited = time.monotonic() - started
        # Each slow connection holds a thread until its 2 s read deadline (a queued one 0.5 s more at most).
        assert waited < 5.0, f"a normal client waited {waited:.1f} s behind slow senders"
        deadline = time.monotonic() + 5
        while len(closed) < len(senders) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(closed) == len(senders), "the controller closes connections that never finish their request"
    finally:
        stop.set()
        for sender in senders:
            sender.join()
    with httpx.Client(verify=ssl.create_default_context(cafile=str(config.internal_http.tls_ca_file))) as client:
        assert client.get(f"https://localhost:{port}/health").json() == {"status": "ok"}
