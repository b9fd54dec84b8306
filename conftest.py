"""Pytest fixtures and marker rules shared by every test in the repository.

Markers (declared in pyproject.toml):
- ``slurm``: the test gets the session fixture ``slurm_cluster`` automatically (the real dev Slurm cluster of
  slurm/devcluster.sh). It starts the cluster if it is down and stops it at the end only if a fixture started it
  and no other test session still uses it (several pytest processes may share the one cluster on this host).
- ``gpu``: skipped, with the reason, when torch.cuda.is_available() is False.
- ``mpi``: skipped, with the reason, when mpi4py or mpirun is missing.

Fixtures: ``slurm_cluster`` (DevCluster), ``slurm_rest`` (the same cluster with slurmrestd up and a JWT token),
``require_cuda`` (skips without CUDA, else returns torch.device("cuda")).
"""

from __future__ import annotations

# Tiny offline test models (tiny_models, tiny_llama_dir, tiny_gpt2_dir, tiny_sharded_dir, ...) for every test.
pytest_plugins = ["hpcllm.devmodels.pytest_fixtures"]

import fcntl
import functools
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from hpcllm.procs import pid_alive

# Idle OpenMP threads (torch's libgomp, MKL, oneDNN) sleep instead of spinning, in this process and every process a
# test starts (workers, model processes, agents: sbatch jobs inherit OMP_*, slurm.templates.AGENT_VARIABLES); set
# before anything here imports torch. On the 2-core host pytest, its workers and their model processes (and other
# test sessions) compute beside each other, and spinning pools starve each other: two processes decoding the small
# Llama at once (8 greedy runs of 40 tokens each) took 34-60 s wall and 13-17 s CPU each with libgomp's default
# wait, 3-4 s and 2.5 s passive. The tests' setting, not the product's: there a worker gets its share of the job's
# CPUs (node.workers.threads_for) and keeps one thread beside its model process (worker.cli._leave_the_threads_to).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parent
DEVCLUSTER_SCRIPT = REPO_ROOT / "slurm" / "devcluster.sh"
DEFAULT_DEVCLUSTER_DIR = "/var/tmp/hpcllm-devcluster"
# Generous: the host's 2 cores are shared by several test sessions.
SCRIPT_TIMEOUT_S = 240
REST_TOKEN_LIFESPAN_S = 6 * 3600


@dataclass
class DevCluster:
    """The running dev Slurm cluster as tests see it."""

    state_dir: Path
    conf_path: Path
    # Environment for subprocesses: os.environ plus SLURM_CONF.
    env: dict[str, str]
    rest_url: str | None = None
    rest_token: str | None = None
    rest_user: str = field(default_factory=lambda: pwd.getpwuid(os.getuid()).pw_name)

    @property
    def rest_headers(self) -> dict[str, str]:
        """Headers slurmrestd's JWT auth wants on every request."""
        if self.rest_token is None:
            raise RuntimeError("slurmrestd is not set up for this cluster object: use the slurm_rest fixture")
        return {"X-SLURM-USER-NAME": self.rest_user, "X-SLURM-USER-TOKEN": self.rest_token}

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs a Slurm client command (sbatch, squeue, ...) against this cluster; raises on failure if check."""
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result


def _devcluster_dir() -> Path:
    return Path(os.environ.get("HPCLLM_DEVCLUSTER_DIR", DEFAULT_DEVCLUSTER_DIR))


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(DEVCLUSTER_SCRIPT), *args], capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S
    )


def _read_ports(state_dir: Path) -> dict[str, int]:
    ports = {}
    for line in (state_dir / "conf" / "ports.env").read_text().splitlines():
        name, _, value = line.partition("=")
        if value.strip().isdigit():
            ports[name.strip()] = int(value)
    return ports



def _pid_alive_from(pid: int | None) -> bool:
    return pid is not None and pid_alive(pid)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class _ClusterLeases:
    """Who uses the cluster and whether a fixture started it, shared by all pytest processes on this host.

    leases/<pid> marks a live test session using the cluster. fixture-started holds the slurmctld PID of a cluster
    a fixture started: the last session to leave stops that cluster, never one a person started by hand (or one
    restarted since, which has another slurmctld PID).
    """

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.leases_dir = state_dir / "leases"
        self.marker = state_dir / "fixture-started"
        self.lock_path = state_dir / "fixture.lock"

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def slurmctld_pid(self) -> int | None:
        return _read_int(self.state_dir / "run" / "slurmctld.pid")

    def mark_started_by_fixture(self) -> None:
        self.marker.write_text(f"{self.slurmctld_pid()}\n")

    def started_by_fixture(self) -> bool:
        marked = _read_int(self.marker)
        return marked is not None and marked == self.slurmctld_pid()

    def add(self, pid: int) -> None:
        self.leases_dir.mkdir(exist_ok=True)
        (self.leases_dir / str(pid)).touch()

    def remove(self, pid: int) -> None:
        (self.leases_dir / str(pid)).unlink(missing_ok=True)

    def live_holders(self) -> list[int]:
        holders = []
        for lease in self.leases_dir.glob("*"):
            if lease.name.isdigit() and pid_alive(int(lease.name)):
                holders.append(int(lease.name))
            else:
                lease.unlink(missing_ok=True)  # a crashed session's lease
        return holders


def _fail_with(what: str, result: subprocess.CompletedProcess[str]) -> None:
    pytest.fail(f"{what} (exit {result.returncode}):\n{result.stdout}{result.stderr}", pytrace=False)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[DevCluster]:
    """The real dev Slurm cluster (4 nodes n1-n4, 2 fake GPUs each, partitions batch and high)."""
    state_dir = _devcluster_dir()
    leases = _ClusterLeases(state_dir)
    me = os.getpid()
    with leases.locked():
        if _script("status").returncode != 0:
            controller_before = leases.slurmctld_pid() if _pid_alive_from(leases.slurmctld_pid()) else None
            started = _script("start")
            if started.returncode != 0:
                _fail_with("slurm/devcluster.sh start failed", started)
            # Only a cluster whose controller this fixture started is ours to stop (not a partly-up one we completed).
            if leases.slurmctld_pid() != controller_before:
                leases.mark_started_by_fixture()
        leases.add(me)

    conf_path = state_dir / "conf" / "slurm.conf"
    previous_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf_path)
    cluster = DevCluster(state_dir=state_dir, conf_path=conf_path, env={**os.environ, "SLURM_CONF": str(conf_path)})
    try:
        yield cluster
    finally:
        if previous_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous_conf
        with leases.locked():
            leases.remove(me)
            if leases.started_by_fixture() and not leases.live_holders():
                stopped = _script("stop")
                leases.marker.unlink(missing_ok=True)
                if stopped.returncode != 0:
                    _fail_with("slurm/devcluster.sh stop failed", stopped)


@pytest.fixture(scope="session")
def slurm_rest(slurm_cluster: DevCluster) -> DevCluster:
    """slurm_cluster with slurmrestd running on loopback and a JWT token for the current user.

    Use cluster.rest_url (e.g. http://127.0.0.1:17820) with cluster.rest_headers; API version openapi/v0.0.38.
    """
    leases = _ClusterLeases(slurm_cluster.state_dir)
    with leases.locked():
        if _script("status", "--rest").returncode != 0:
            started = _script("start", "--rest")
            if started.returncode != 0:
                _fail_with("slurm/devcluster.sh start --rest failed", started)
    token_out = slurm_cluster.run("scontrol", "token", f"lifespan={REST_TOKEN_LIFESPAN_S}").stdout.strip()
    if not token_out.startswith("SLURM_JWT="):
        pytest.fail(f"scontrol token printed no SLURM_JWT=...: {token_out!r}", pytrace=False)
    slurm_cluster.rest_token = token_out.removeprefix("SLURM_JWT=")
    slurm_cluster.rest_url = f"http://127.0.0.1:{_read_ports(slurm_cluster.state_dir)['REST_PORT']}"
    return slurm_cluster


@pytest.fixture(autouse=True)
def _slurm_marked_tests_get_the_cluster(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("slurm") is not None:
        request.getfixturevalue("slurm_cluster")


# Signals whose disposition child processes inherit when ignored: a test that leaves one ignored breaks every later
# test that interrupts a subprocess, far from the cause (it happened: three tests failed a session apart).
_INHERITED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


@pytest.fixture(autouse=True)
def _no_test_leaves_signal_handlers_changed() -> Iterator[None]:
    before = {signum: signal.getsignal(signum) for signum in _INHERITED_SIGNALS}
    yield
    changed = [signal.Signals(signum).name for signum, handler in before.items()
               if signal.getsignal(signum) != handler]
    for signum, handler in before.items():
        signal.signal(signum, handler)
    if changed:
        pytest.fail(f"the test left the handlers of {', '.join(changed)} changed in the pytest process; restore them "
                    f"(or patch signal.signal) so later tests and their subprocesses are not affected", pytrace=False)


@functools.lru_cache(maxsize=None)
def _cuda_missing_reason() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    return f"needs CUDA: torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA {torch.version.cuda})"


@functools.lru_cache(maxsize=None)
def _mpi_missing_reason() -> str | None:
    if importlib.util.find_spec("mpi4py") is None:
        return "needs MPI: mpi4py is not installed (pip install -e '.[mpi]')"
    if shutil.which("mpirun") is None:
        return "needs MPI: mpirun is not on PATH (install OpenMPI: make host)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None and (reason := _cuda_missing_reason()):
        pytest.skip(reason)
    if item.get_closest_marker("mpi") is not None and (reason := _mpi_missing_reason()):
        pytest.skip(reason)


@pytest.fixture
def require_cuda():
    """Skips the test without CUDA; otherwise returns torch.device("cuda")."""
    if reason := _cuda_missing_reason():
        pytest.skip(reason)
    import torch

    return torch.device("cuda")
