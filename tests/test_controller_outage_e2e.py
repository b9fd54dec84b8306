"""Serving survives the control plane (issue 15), on the real dev Slurm cluster, through the front door.

A real controller and gunicorn gateway (as `make up` runs them) behind nginx with TLS; the official `openai`
client verifies the certificate against the dev CA. A first request cold-starts the model (a node-agent Slurm
job); then several clients stream completions without pause while the controller is killed with SIGKILL and
started again 10 s later on the same database. Not one request fails: the gateway routes to the instance the
controller had named ready while it is away, and asks it again once it is back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from e2e_helpers import (HPCLLM, admin_status, answers, clean_up_e2e, control_plane, free_port, front_door,
                         start_logged, wait_for, write_e2e_config)

from hpcllm.checkpoint.converter import convert

pytestmark = pytest.mark.slurm

SECRET = "outage-e2e-secret"
ADMIN = "outage-e2e-admin"
USER_KEY = "outage-e2e-user"
MODEL = f"tiny-llama-outage{os.getpid()}"  # unique: the jobs the controller submits are named after it
CLIENTS = 4
DOWN_SECONDS = 10


@pytest.fixture
def stack(tiny_llama_dir, tmp_path):
    """(https_url, ssl_context, root, processes, env): controller + gateway + nginx; state under /var/tmp (Slurm
    jobs run the agent as this user and munge wants world-searchable parents)."""
    root = Path(tempfile.mkdtemp(prefix="hpcllm-outage-e2e-", dir="/var/tmp"))
    root.chmod(0o755)
    controller_port, gateway_port = free_port(), free_port()
    config_path = write_e2e_config(
        root, secret=SECRET, admin=ADMIN, controller_port=controller_port, namespace=f"outage{os.getpid()}",
        gateway_port=gateway_port, user_key=USER_KEY,
        # No background read sweep (probe reads on the allocation's node) and no spare worker: the controller starts
        # the model as the agent registers (its spare, still importing, took it) and a replacement spare imported
        # torch twice beside the streaming clients. The worker starts fresh; nothing here checks either.
        node={"read_sweep": False, "spare_workers": 0},
        controller={"allocate_on_demand": True, "allocation_start_estimate_seconds": 5.0})
    convert(tiny_llama_dir, root / "models" / MODEL, progress=False)
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["HPCLLM_CONFIG"] = str(config_path)
    processes: dict[str, subprocess.Popen] = {}

    def pool_jobs() -> list[str]:
        return subprocess.run(["squeue", "-h", "-o", "%i", "-n", f"hpcllm-pool-{MODEL}"], capture_output=True,
                              text=True, timeout=30).stdout.split()

    try:
        with control_plane(root, config_path, controller_port, gateway_port, env, ADMIN, pool_jobs,
                           processes) as (gateway_url, controller_url):
            with front_door(config_path, root / "nginx", gateway_url) as (https_url, trust):
                yield https_url, trust, controller_url, root, processes, env
    finally:
        clean_up_e2e(root, tmp_path, f"outage{os.getpid()}")


class StreamingClients:
    """CLIENTS threads, each streaming completions one after another until stopped; every outcome recorded with
    the time it ended."""

    def __init__(self, base_url: str, trust):
        self.base_url, self.trust = base_url, trust
        self.ok: list[float] = []
        self.failed: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(CLIENTS)]

    def __enter__(self) -> StreamingClients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def _run(self) -> None:
        import openai

        with httpx.Client(verify=self.trust, timeout=120) as http:
            client = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=USER_KEY, max_retries=0, http_client=http)
            while not self._stop.is_set():
                try:
                    chunks = list(client.completions.create(model=MODEL, prompt="the cluster", max_tokens=16,
                                                            stream=True, extra_body={"ignore_eos": True}))
                    if chunks[-1].choices[0].finish_reason != "length":
                        raise AssertionError(f"the stream ended with {chunks[-1].choices[0].finish_reason}")
                    self.ok.append(time.monotonic())
                except Exception as exc:  # every failure counts, whatever its kind
                    self.failed.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))
                self._stop.wait(0.5)  # 4 clients stay below the key's 600 requests a minute


def test_a_controller_kill_and_restart_fails_no_request_for_a_ready_model(stack):
    import openai

    https_url, trust, controller_url, root, processes, env = stack
    deployed = httpx.post(f"{controller_url}/v1/admin/models", headers={"Authorization": f"Bearer {ADMIN}"},
                          timeout=30, json={"name": MODEL, "source": str(root / "models" / MODEL), "gpus": 0})
    assert deployed.status_code == 201, deployed.text
    # The cold start (a Slurm allocation for a node agent), through nginx with TLS verified against the dev CA.
    with httpx.Client(verify=trust, timeout=300) as http:
        client = openai.OpenAI(base_url=f"{https_url}/v1", api_key=USER_KEY, max_retries=0, http_client=http)
        first = client.completions.create(model=MODEL, prompt="the cluster", max_tokens=4)
        assert first.usage.completion_tokens == 4
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{https_url}/health")  # verification is real: without the dev CA the certificate is refused

    with StreamingClients(https_url, trust) as clients:
        wait_for(lambda: len(clients.ok) >= 2 * CLIENTS, 120, "the clients to stream through the gateway")
        processes["controller"].send_signal(signal.SIGKILL)
        processes["controller"].wait(10)
        killed_at = time.monotonic()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{controller_url}/health", timeout=2)
        time.sleep(DOWN_SECONDS)
        restarted = start_logged([HPCLLM, "controller", "--config", str(root / "hpcllm.toml")],
                                 root / "controller-restarted.log", env)
        processes["controller"] = restarted  # control_plane stops this one at the end
        restarted_at = time.monotonic()
        wait_for(lambda: answers(f"{controller_url}/health", restarted, root / "controller-restarted.log"), 60,
                 "the restarted controller to answer /health")
        served_after = len(clients.ok)
        wait_for(lambda: len(clients.ok) >= served_after + 2 * CLIENTS, 120, "requests after the restart")

    assert not clients.failed, f"{len(clients.failed)} requests failed, the first: {clients.failed[:3]}"
    while_down = [at for at in clients.ok if killed_at < at < restarted_at]
    assert len(while_down) >= CLIENTS, f"only {len(while_down)} requests were served while the controller was down"
    # The restarted controller knows the instance as before (the registry survived the kill): still one allocation.
    assert [a["model"] for a in admin_status(controller_url, ADMIN)["allocations"]] == [MODEL]
