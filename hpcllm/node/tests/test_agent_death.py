"""A node agent killed outside the reach of its Slurm job's cleanup (kill -9, the OOM killer; an agent run by hand):
its workers must not keep serving, holding the node's GPUs, memory and ports for no agent. A real `hpcllm node`
process with real `hpcllm worker` processes of the tiny converted model, SIGKILLed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.node.app import create_app
from hpcllm.node.cache import UnknownModel
from hpcllm.node.tests.test_agent import (SECRET, converted, make_agent, model_processes,  # noqa: F401 (a fixture)
                                          stand_in_workers, wait_for)
from hpcllm.node.tests.test_tp_instances import tp_converted  # noqa: F401 (a fixture)
from hpcllm.node.workers import Process, processes, running
from hpcllm.procs import descendants

AUTH = {SECRET_HEADER: SECRET}


def write_config(root: Path, model_process: bool | None = None, **node) -> Path:
    """model_process: [worker] model_process, where not None."""
    namespace = f"death-{uuid.uuid4().hex[:8]}"
    settings = {"nvme_dir": str(root / "nvme"), "dram_namespace": namespace, "probe_bytes": 1 << 20,
                "memcpy_probe_bytes": 1 << 20, "listen_host": "127.0.0.1", "cache_on_load": [], **node}
    lines = ["[paths]", f"state_dir = {json.dumps(str(root / 'state'))}",
             f"models_dir = {json.dumps(str(root / 'models'))}",
             "[cluster]", f"shared_secret = {json.dumps(SECRET)}",
             "[node]", *(f"{key} = {json.dumps(value)}" for key, value in settings.items())]
    if model_process is not None:
        lines += ["[worker]", f"model_process = {json.dumps(model_process)}"]
    path = root / "hpcllm.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)  # holds the secret: the agent refuses it otherwise
    return path


class KilledAgent:
    """`hpcllm node` on a free port, its controller unreachable (it serves its API while it retries registering)."""

    def __init__(self, root: Path, model_process: bool | None = None, **node):
        root.mkdir(parents=True, exist_ok=True)
        self.log = root / "agent.log"
        config = write_config(root, model_process, **node)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "hpcllm.cli.main", "node", "--config", str(config), "--port", "0",
                 "--controller-url", "http://127.0.0.1:1"], stdout=out, stderr=subprocess.STDOUT)
        self.url = wait_for(self._listening, what="the agent's API")

    def _listening(self) -> str | None:
        assert self.process.poll() is None, self.log.read_text()
        found = re.search(r"listening on (http://\S+)", self.log.read_text())
        return found.group(1) if found else None

    def start(self, model_dir: Path, **fields) -> str:
        resp = httpx.post(f"{self.url}/v1/internal/instances", headers=AUTH, timeout=30,
                          json={"model": "tiny-llama", "source": str(model_dir), **fields})
        assert resp.status_code == 202, resp.text
        instance_id = resp.json()["instance_id"]
        wait_for(lambda: self.state(instance_id) == "ready", timeout=240, what=f"{instance_id} ready")
        return instance_id

    def state(self, instance_id: str) -> str:
        listing = httpx.get(f"{self.url}/v1/internal/instances", headers=AUTH, timeout=30).json()
        [state] = [i["state"] for i in listing["instances"] if i["instance_id"] == instance_id]
        assert state != "failed", self.log.read_text()
        return state

    def kill(self) -> list[Process]:
        """SIGKILL the agent alone; the processes that were under it (recorded with their start times)."""
        under = processes(descendants(self.process.pid))
        self.process.kill()
        self.process.wait()
        return under

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def _gone_or_killed(left: list[Process], timeout: float) -> list[Process]:
    """Wait (generously) for the processes to end; those that do not are SIGKILLed here, and returned."""
    try:
        wait_for(lambda: not running(left), timeout=timeout, what="the workers to end")
        return []
    except AssertionError:
        stuck = running(left)
        for proc in stuck:
            os.kill(proc.pid, signal.SIGKILL)
        return stuck


@pytest.mark.parametrize("spare", [False, True], ids=["fresh-worker", "spare-worker"])
def test_the_worker_of_an_agent_killed_with_sigkill_exits(tmp_path, converted, spare):  # noqa: F811
    # spare: the instance goes to the spare (a warm process that read its assignment from the agent on stdin), with
    # the model process it started (CPU workers' default); the fresh worker runs without one (a torch import less).
    agent = KilledAgent(tmp_path / "agent", model_process=None if spare else False, spare_workers=1 if spare else 0)
    try:
        if spare:
            wait_for(lambda: any("spare worker ready" in log.read_text()
                                 for log in (tmp_path / "agent").rglob("spare-*.log")),
                     timeout=240, what="the spare's imports")
        instance_id = agent.start(converted)
        took = re.search(r"spare worker pid (\d+) .* takes tiny-llama", agent.log.read_text())
        assert bool(took) == spare  # the agent's line for a spare's instance
        model_process = model_processes(int(took.group(1))) if spare else set()
        under = agent.kill()
    finally:
        agent.close()
    assert under, "no process under the agent"
    if spare:
        assert model_process and model_process <= {p.pid for p in under}, \
            f"the spare's model process {model_process} is not among the processes under the agent: {under}"
    stuck = _gone_or_killed(under, timeout=120)
    assert not stuck, f"{instance_id}: still running 120 s after the agent's death: {stuck}"
    [worker_log] = (tmp_path / "agent").rglob(f"{instance_id}.log")
    assert "the node agent that started this worker is gone; stopping" in worker_log.read_text()


@pytest.mark.mpi
@pytest.mark.slow
def test_every_rank_of_a_tensor_parallel_instance_exits_when_its_agent_is_killed(tmp_path, tp_converted):  # noqa: F811
    agent = KilledAgent(tmp_path / "agent", spare_workers=0)
    try:
        instance_id = agent.start(tp_converted, tensor_parallel=2)
        under = agent.kill()
    finally:
        agent.close()
    assert len(under) >= 3, f"expected mpirun and two ranks under the agent: {under}"
    stuck = _gone_or_killed(under, timeout=120)
    assert not stuck, f"still running 120 s after the agent's death: {stuck}"
    # the lead rank read the pipe's end (mpirun forwards stdin to it) and stopped the others: not mpirun's own abort
    [instance_log] = (tmp_path / "agent").rglob(f"{instance_id}.log")
    assert "the node agent that started this worker is gone; stopping" in instance_log.read_text()


class AgentOfAJob(KilledAgent):
    """`hpcllm node` started in the background by a Slurm job's batch script, which wrote its pid to agent.pid."""

    def __init__(self, root: Path, job: str):
        self.log = root / "agent.log"
        pid_file = root / "agent.pid"
        self.pid = wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() and int(pid_file.read_text()),
                            timeout=120, what=f"job {job} to start its agent")
        self.url = wait_for(self._listening, what="the agent's API")

    def _listening(self) -> str | None:
        found = self.log.exists() and re.search(r"listening on (http://\S+)", self.log.read_text())
        return found.group(1) if found else None


def _ranks_of(model_dir: Path) -> list[Process]:
    """Every `hpcllm worker --tensor-parallel` rank on this host (the dev cluster's nodes share it) of model_dir,
    srun and mpirun left out."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):  # ended since the listing, or another user's
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if b"--tensor-parallel" in args and str(model_dir).encode() in args \
                    and not args[0].endswith((b"srun", b"mpirun")):
                pids.append(int(proc.name))
    return processes(pids)


@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.slow
def test_every_rank_of_an_instance_over_two_nodes_exits_when_its_agent_is_killed(slurm_cluster, tp_converted):  # noqa: F811
    """The agent runs in a 2-node Slurm job that outlives it (a wrapper that restarts it, an agent killed by the OOM
    killer while its batch script goes on): its instance's ranks, srun's step on both nodes, had no news of its end
    (srun's stdin was /dev/null) and served on. The lead rank now reads the agent's pipe through srun and stops."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="hpcllm-death-", dir="/var/tmp"))  # munge: world-searchable parents
    root.chmod(0o755)
    config = write_config(root, worker_stop_timeout_seconds=10, spare_workers=0)
    script = root / "agent.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"{sys.executable} -m hpcllm.cli.main node --config {config} --port 0 --controller-url http://127.0.0.1:1"
        f" > {root / 'agent.log'} 2>&1 &\n"
        f"echo $! > {root / 'agent.pid'}\n"
        "wait\n"
        "sleep 600  # the job lives on without its agent\n")
    job = slurm_cluster.run("sbatch", "--parsable", "-N2", "--ntasks-per-node=1", "-p", "batch", "-t", "15",
                            "-o", str(root / "job.out"), str(script)).stdout.strip().split(";")[0]
    try:
        agent = AgentOfAJob(root, job)
        instance_id = agent.start(tp_converted, tensor_parallel=2, nodes=2)
        ranks = _ranks_of(tp_converted)
        assert len(ranks) == 2, f"expected two ranks of {tp_converted}: {ranks}"
        os.kill(agent.pid, signal.SIGKILL)
        stuck = _gone_or_killed(ranks, timeout=120)
        assert not stuck, f"ranks still running 120 s after the agent's death: {stuck}"
        [instance_log] = root.rglob(f"{instance_id}.log")
        assert "the node agent that started this worker is gone; stopping" in instance_log.read_text()
        assert slurm_cluster.run("squeue", "-h", "-j", job, "-o", "%T", check=False).stdout.strip() == "RUNNING"
    finally:
        slurm_cluster.run("scancel", job, check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_a_start_that_fails_after_its_worker_started_closes_the_workers_pipe(tmp_path, converted, monkeypatch):  # noqa: F811
    # The cached copy is evicted (`hpcllm cache evict`) between the tier's choice and the worker's reference on it:
    # the start fails and the worker is killed; the agent's end of its pipe must go with it, not wait for a collection.
    agent = make_agent(tmp_path)
    stand_in_workers(agent)  # killed before it is ever talked to
    try:
        agent.cache.warm("tiny-llama", converted, "nvme")
        started: list[subprocess.Popen] = []
        spawn = agent.workers._spawn
        monkeypatch.setattr(agent.workers, "_spawn", lambda *args: started.append(spawn(*args)) or started[-1])

        def evicted(model, tier, pid=None, **_):
            raise UnknownModel(f"model {model!r} is not in this node's {tier} cache; warm it first")

        monkeypatch.setattr(agent.cache, "acquire", evicted)
        resp = create_app(agent).test_client().post(
            "/v1/internal/instances", headers=AUTH, json={"model": "tiny-llama", "source": str(converted)})
        assert resp.status_code >= 400 and "warm it first" in resp.get_data(as_text=True), resp.get_data(as_text=True)
        [worker] = started
        assert worker.returncode is not None  # killed and reaped
        assert worker.stdin.closed  # before: left open (an fd held by the agent per failed start)
    finally:
        agent.workers.stop_all(timeout=5)
        agent.workers.close()


def _kill_the_readers_of(pipe: str) -> list[int]:
    """SIGKILLs every other process with an fd on PIPE ('pipe:[inode]'); the ones it found."""
    found = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            pid = int(fd.parts[2])
            if pid != os.getpid() and os.readlink(fd) == pipe and pid not in found:
                found.append(pid)
                os.kill(pid, signal.SIGKILL)
    return found


def test_a_spare_that_died_as_it_was_given_an_instance_leaves_no_pipe_open(tmp_path, converted, monkeypatch):  # noqa: F811
    # The spare dies between the agent's check that it runs and the write of its assignment: the assignment's
    # flush fails, a fresh worker takes the instance, and the dead spare's pipe is closed with it.
    agent = make_agent(tmp_path, spare_workers=1, model_process=False)
    stand_in_workers(agent)  # the fresh worker that takes the instance is never talked to
    try:
        # Not waited for past its imports: a spare takes its assignment on stdin whether or not they are done.
        agent.workers.ensure_spares()
        [spare] = agent.workers._spares
        # The write fails only once no process holds the pipe's read end: kill every one that does (the spare and
        # any child inheriting its stdin, listed or started since), until none is left.
        pipe = f"pipe:[{os.fstat(spare.process.stdin.fileno()).st_ino}]"
        wait_for(lambda: not _kill_the_readers_of(pipe), what="the spare's pipe without readers")
        monkeypatch.setattr(spare.process, "poll", lambda: None)  # as at the check just before it died
        resp = create_app(agent).test_client().post(
            "/v1/internal/instances", headers=AUTH, json={"model": "tiny-llama", "source": str(converted)})
        assert resp.status_code == 202, resp.get_json()
        agent.config.node.spare_workers = 0  # no spare after this start: nothing would take it
        assert agent.workers.get(resp.get_json()["instance_id"]).process.pid != spare.process.pid
        assert spare.process.stdin.closed  # before: left open with the unsent assignment in its buffer
    finally:
        agent.workers.stop_all(timeout=5)
        agent.workers.close()
