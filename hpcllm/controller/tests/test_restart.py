"""Restart safety: kill -9 a controller process while requests hit its route API, restart it on the same
database, and check that nothing was lost and that it reconciled with Slurm and the node agents."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from hpcllm.controller.protocol import InstanceInfo
from hpcllm.controller.tests.conftest import ADMIN_KEY, GB, SECRET
from hpcllm.controller.tests.doubles import FileBackend, HttpNodeAgent, checkpoint_folder
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.tests.ports import free_port

INTERNAL = {SECRET_HEADER: SECRET}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
START_TIMEOUT_S = 60


class ControllerProcess:
    def __init__(self, tmp_path: Path, port: int, database_url: str | None = None):
        self.tmp_path = tmp_path
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.config = tmp_path / "hpcllm.toml"
        self.config.write_text(f"""
[paths]
state_dir = "{tmp_path / 'state'}"
[cluster]
shared_secret = "{SECRET}"
[slurm]
partition = "debug"
[controller]
admin_key = "{ADMIN_KEY}"
database_url = "{database_url or f"sqlite:///{tmp_path / 'controller.db'}"}"
tick_seconds = 0.3
node_timeout_seconds = 600
migration_seconds_per_instance = 100
""")
        self.config.chmod(0o600)  # holds the secret: the controller refuses it otherwise
        self.slurm_state = tmp_path / "slurm.json"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        ready = self.tmp_path / f"ready-{self.starts}"
        log = open(self.tmp_path / f"controller-{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hpcllm.controller.tests.controller_proc", str(self.config),
             str(self.slurm_state), str(self.port), str(ready)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"controller did not start: {(self.tmp_path / f'controller-{self.starts}.log').read_text()}")
            time.sleep(0.05)

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Traffic:
    """Threads asking the route API for a model as fast as they can, counting answers by kind."""

    def __init__(self, url: str, model: str, threads: int = 3):
        self.url, self.model = url, model
        self.counts: Counter = Counter()
        self.worker_urls: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers=INTERNAL, timeout=5) as client:
            while not self._stop.is_set():
                try:
                    resp = client.get("/v1/internal/route", params={"model": self.model})
                    kind = resp.status_code
                    if kind == 200:
                        with self._lock:
                            self.worker_urls.add(resp.json()["worker_url"])
                except httpx.HTTPError:
                    kind = "connection_error"
                    time.sleep(0.02)
                with self._lock:
                    self.counts[kind] += 1

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def wait_for(self, kind, at_least: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        start = self.counts[kind]
        while self.counts[kind] < start + at_least:
            assert time.monotonic() < deadline, f"no {at_least} answers {kind} within {timeout} s: {self.counts}"
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)


def register(client: httpx.Client, agent: HttpNodeAgent, job: str | None, cached=()) -> None:
    resp = client.post("/v1/internal/nodes/register", headers=INTERNAL, json={
        "node_id": agent.node_id, "agent_url": agent.url, "slurm_job_id": job, "job_scoped": job is not None,
        "gpus": 2, "tiers": {"dram": {"read_gbps": 20}, "nvme": {"read_gbps": 4, "scope": "persistent"},
                             "sharedfs": {"read_gbps": 1}},
        "cached": [{"model": m, "tier": t, "bytes": GB} for m, t in cached]})
    assert resp.status_code == 200, resp.text


def heartbeat(client: httpx.Client, agent: HttpNodeAgent, cached=()) -> httpx.Response:
    return client.post(f"/v1/internal/nodes/{agent.node_id}/heartbeat", headers=INTERNAL, json={
        "cached": [{"model": m, "tier": t, "bytes": GB} for m, t in cached],
        "instances": [i.model_dump() for i in agent.instances.values()]})


@pytest.fixture
def controller_process(tmp_path):
    proc = ControllerProcess(tmp_path, free_port())
    yield proc
    proc.stop()


def test_kill_9_mid_traffic_loses_nothing(tmp_path, database_url):
    """On SQLite and on PostgreSQL (where a server is installed)."""
    ctl = ControllerProcess(tmp_path, free_port(), database_url)
    slurm = FileBackend(ctl.slurm_state)
    n1 = HttpNodeAgent("n1", SECRET)
    try:
        ctl.start()
        client = httpx.Client(base_url=ctl.url, timeout=10)
        for name, gpus in (("chat", 1), ("huge", 2)):
            src = checkpoint_folder(tmp_path / "models" / name)
            resp = client.post("/v1/admin/models", headers=ADMIN, json={
                "name": name, "source": str(src), "size_bytes": 2 * GB, "gpus": gpus, "keep_alive_seconds": 3600})
            assert resp.status_code == 201, resp.text

        # n1 (2 GPUs) registers; "chat" cold-starts there and becomes ready.
        register(client, n1, job=None, cached=[("chat", "nvme")])
        assert client.get("/v1/internal/route", params={"model": "chat"}, headers=INTERNAL).status_code == 202
        n1.finish_loading(tier="nvme")
        assert heartbeat(client, n1, cached=[("chat", "nvme")]).status_code == 200
        ready = client.get("/v1/internal/route", params={"model": "chat"}, headers=INTERNAL).json()
        assert ready["status"] == "ready"
        # "huge" needs both GPUs of a node; moving the busy "chat" off n1 (100 s, configured) costs more than a
        # new allocation (30 s estimate + 2 s load): the controller submits one.
        resp = client.get("/v1/internal/route", params={"model": "huge"}, headers=INTERNAL)
        assert resp.status_code == 202 and resp.json()["status"] == "allocating", resp.text
        job_id = resp.json()["job_id"]
        before = client.get("/v1/admin/status", headers=ADMIN).json()

        traffic = Traffic(ctl.url, "chat")
        traffic.start()
        traffic.wait_for(200, at_least=50)
        ctl.kill9()  # mid-traffic: requests are in flight
        traffic.wait_for("connection_error", at_least=5)

        # While the controller is dead, Slurm starts the allocation on n2 and the agent there starts up.
        slurm.set_job(job_id, state="RUNNING", nodes=["n2"], start_time=time.time(), end_time=time.time() + 3600)
        ctl.start()
        traffic.wait_for(200, at_least=50)
        traffic.stop()

        after = client.get("/v1/admin/status", headers=ADMIN).json()
        assert after["models"] == before["models"]
        assert [(n["node_id"], n["state"], n["agent_url"]) for n in after["nodes"]] == [("n1", "up", n1.url)]
        assert [(i["instance_id"], i["state"], i["worker_url"]) for i in after["instances"]] == \
            [(ready["instance_id"], "ready", ready["worker_url"])]
        assert after["cold_starts"] == before["cold_starts"]
        [alloc] = after["allocations"]
        assert (alloc["job_id"], alloc["model"], alloc["state"], alloc["nodes"]) == (job_id, "huge", "running", ["n2"])
        assert alloc["submitted_at"] == before["allocations"][0]["submitted_at"]
        # Every answer was a served route or a refused connection while it was down: never an error status.
        assert set(traffic.counts) == {200, "connection_error"}, traffic.counts
        assert traffic.worker_urls == {ready["worker_url"]}
        # The node agent is still known: its heartbeats are accepted without registering again.
        assert heartbeat(client, n1, cached=[("chat", "nvme")]).status_code == 200

        if database_url.startswith("sqlite"):
            db = sqlite3.connect(tmp_path / "r.db")
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            db.close()
        client.close()
    finally:
        ctl.stop()
        n1.close()


def test_restart_reconciles_instances_with_the_node_agent(tmp_path, controller_process):
    """Instances that stopped or started on an agent while the controller was down are seen at once."""
    ctl = controller_process
    n1 = HttpNodeAgent("n1", SECRET)
    try:
        ctl.start()
        client = httpx.Client(base_url=ctl.url, timeout=10)
        src = checkpoint_folder(tmp_path / "models" / "chat")
        client.post("/v1/admin/models", headers=ADMIN,
                    json={"name": "chat", "source": str(src), "size_bytes": GB, "max_instances": 2})
        register(client, n1, job=None)
        client.get("/v1/internal/route", params={"model": "chat"}, headers=INTERNAL)
        n1.finish_loading()
        heartbeat(client, n1)
        [old] = client.get("/v1/admin/status", headers=ADMIN).json()["instances"]
        ctl.kill9()
        # While it is down the old worker dies and an admin starts another one by hand on the agent.
        n1.instances.clear()
        n1.instances["n1-manual"] = InstanceInfo(instance_id="n1-manual", model="chat", state="ready",
                                                 worker_url="http://n1.workers/manual")
        ctl.start()
        instances = client.get("/v1/admin/status", headers=ADMIN).json()["instances"]
        assert [(i["instance_id"], i["state"]) for i in instances] == [("n1-manual", "ready")]
        assert old["instance_id"] != "n1-manual"
        resp = client.get("/v1/internal/route", params={"model": "chat"}, headers=INTERNAL).json()
        assert resp["worker_url"] == "http://n1.workers/manual"
        client.close()
    finally:
        n1.close()


def test_a_restart_with_slurm_down_still_reconciles_the_node_agents(harness):
    """A start reserved just before the crash that the agent never got: reconcile drops the reservation, else the
    model's requests wait on it ("starting") until the autoscaler drops it minutes later. Slurm being down at the
    restart must not skip the agents (reconcile still reports it incomplete)."""
    from hpcllm.controller.errors import ControllerError

    harness.deploy("m")
    job = harness.allocator.submit(harness.registry.get_model("m"), [], harness.clock.now)
    harness.backend.run_job(job, "n1", harness.clock.now)
    harness.register("n1", job=job)
    harness.registry.reserve_instance("m", "n1", [0], harness.clock.now)
    harness.backend.down = True
    with pytest.raises(ControllerError, match="Slurm"):
        harness.controller.reconcile()
    assert not [i for i in harness.registry.instances() if i.reserved]
    outcome = harness.controller.route("m")
    assert outcome.status == "starting" and outcome.instance_id is not None  # a real start, not the dead one


def test_a_node_whose_report_is_refused_does_not_keep_reconcile_from_the_others(harness):
    """At the restart n1's agent lists an instance the registry holds for n2 (its report is refused whole, as its
    heartbeats are): the other nodes are reconciled all the same, n2's instance that became ready meanwhile with
    them."""
    harness.deploy("m")
    harness.register("n1")
    harness.register("n2")
    started = harness.agents.start_instance("http://n2:9000", "m", "/models/m", [0]).instance_id
    harness.heartbeat("n1")
    harness.heartbeat("n2")
    n2 = harness.agents.agents["http://n2:9000"]
    harness.agents.agents["http://n1:9000"].add(n2.instances[started])  # n1's agent lists it too
    harness.agents.finish_loading("http://n2:9000")
    harness.controller.reconcile()
    assert harness.registry.get_instance(started).state == "ready"
    assert harness.registry.get_instance(started).node_id == "n2"


def test_reconcile_takes_the_instance_list_of_a_node_registered_by_an_agent_process(harness):
    """A node whose agent named its process at registration: the instance list reconcile asks its agent for is that
    process's report (not a late one of an earlier process, refused 409 agent_replaced), so the instance started
    while the controller was down is seen at once."""
    harness.deploy("m")
    harness.register("n1", agent_process="c" * 32)
    started = harness.agents.start_instance("http://n1:9000", "m", "/models/m", [0]).instance_id
    harness.agents.finish_loading("http://n1:9000")
    harness.controller.reconcile()
    assert harness.registry.get_instance(started).state == "ready"
    assert harness.controller.route("m").instance_id == started
