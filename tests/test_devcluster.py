"""The dev Slurm cluster (slurm/devcluster.sh): nodes, fake GPUs, multi-node steps, preemption signals, REST,
and the script's error paths.

Tests marked `slurm` share the session cluster (conftest.py's slurm_cluster). Other test sessions may run jobs on
it at the same time, so node states are checked for "responding", not strictly "idle".
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "slurm" / "devcluster.sh"
NODES = ["n1", "n2", "n3", "n4"]
RESPONDING_STATES = {"idle", "mixed", "allocated", "completing"}


def _script(*args: str, env: dict[str, str] | None = None, user: str | None = None) -> subprocess.CompletedProcess:
    command = ["bash", str(SCRIPT), *args]
    if user is not None:
        account = pwd.getpwnam(user)
        command = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups", *command]
    return subprocess.run(command, env=env or dict(os.environ), capture_output=True, text=True, timeout=120)


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _job_state(cluster, job_id: str) -> str:
    return cluster.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip()


# ------------------------------------------------------------------ the shared cluster


@pytest.mark.slurm
def test_sinfo_shows_four_nodes_with_two_gpus_each(slurm_cluster):
    lines = slurm_cluster.run("sinfo", "-h", "-N", "-p", "batch", "-o", "%N %T %G").stdout.split("\n")
    nodes = {name: (state, gres) for name, state, gres in (line.split() for line in lines if line.strip())}
    assert sorted(nodes) == NODES
    for name, (state, gres) in nodes.items():
        assert state in RESPONDING_STATES, f"{name} is {state}"
        assert gres == "gpu:2"
    partitions = slurm_cluster.run("sinfo", "-h", "-o", "%P %D").stdout.split()
    assert partitions == ["batch*", "4", "high", "4"]


@pytest.mark.slurm
def test_start_again_is_idempotent_and_prints_the_export_line(slurm_cluster):
    result = _script("start")
    assert result.returncode == 0, result.stderr
    assert "already running" in result.stderr
    assert result.stdout.strip() == f"export SLURM_CONF={slurm_cluster.conf_path}"

    status = _script("status")
    assert status.returncode == 0
    assert "\nup\n" in status.stdout


@pytest.mark.slurm
def test_gpu_job_gets_cuda_visible_devices(slurm_cluster, tmp_path):
    output = tmp_path / "gpu.out"
    slurm_cluster.run(
        "sbatch", "--wait", "--gres=gpu:1", "-o", str(output),
        "--wrap", 'echo "CVD=$CUDA_VISIBLE_DEVICES JOB_GPUS=$SLURM_JOB_GPUS"',
        timeout=60,
    )  # fmt: skip
    fields = dict(item.split("=", 1) for item in output.read_text().split())
    assert fields["CVD"] in {"0", "1"}
    assert fields["JOB_GPUS"] in {"0", "1"}


@pytest.mark.slurm
def test_srun_spans_two_distinct_nodes(slurm_cluster):
    result = slurm_cluster.run("srun", "-N2", "-n2", "--ntasks-per-node=1", "printenv", "SLURMD_NODENAME", timeout=60)
    names = result.stdout.split()
    assert len(names) == 2
    assert len(set(names)) == 2
    assert set(names) <= set(NODES)


VICTIM_SCRIPT = """#!/bin/bash
echo "started restart=${SLURM_RESTART_COUNT:-0} on $SLURMD_NODENAME"
trap 'echo "got USR1"; exit 0' USR1
for _ in $(seq 300); do sleep 0.2; done
echo "never signalled"
"""


@pytest.mark.slurm
def test_high_partition_job_preempts_and_signals_a_batch_job(slurm_cluster, tmp_path):
    # The victim takes all of n4; a high-partition job then needs n4. preempt_send_user_signal delivers the
    # victim's --signal to its batch shell at once (not after GraceTime), so the whole exchange takes seconds.
    victim_script = tmp_path / "victim.sh"
    victim_script.write_text(VICTIM_SCRIPT)
    victim_out, high_out = tmp_path / "victim.out", tmp_path / "high.out"
    submitted: list[str] = []
    try:
        victim = slurm_cluster.run(
            "sbatch", "--parsable", "-p", "batch", "-w", "n4", "--exclusive", "--requeue", "--open-mode=append",
            "--signal=B:USR1@60", "-o", str(victim_out), str(victim_script),
        ).stdout.strip().split(";")[0]  # fmt: skip
        submitted.append(victim)
        _wait_for(lambda: "started" in _read(victim_out), 30, "the batch job to start on n4")

        high = slurm_cluster.run(
            "sbatch", "--parsable", "-p", "high", "-w", "n4", "-o", str(high_out),
            "--wrap", 'echo "high ran on $SLURMD_NODENAME"',
        ).stdout.strip().split(";")[0]  # fmt: skip
        submitted.append(high)

        _wait_for(lambda: "got USR1" in _read(victim_out), 30, "SIGUSR1 in the preempted batch job")
        _wait_for(lambda: "high ran on n4" in _read(high_out), 45, "the high-partition job to run on n4")
        assert "never signalled" not in _read(victim_out)
    finally:
        if submitted:
            slurm_cluster.run("scancel", *submitted, check=False)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.mark.slurm
def test_slurmrestd_answers_with_a_jwt_token(slurm_rest):
    url = f"{slurm_rest.rest_url}/slurm/v0.0.38/ping"
    response = requests.get(url, headers=slurm_rest.rest_headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["pings"][0]["ping"] == "UP"

    assert requests.get(url, timeout=30).status_code == 401


# ------------------------------------------------------------------ error paths and a private second cluster


def _free_port_block(size: int = 11) -> int:
    """A base port such that base..base+size-1 are all free right now."""
    for _ in range(50):
        base = random.randint(20000, 30000)
        sockets = []
        try:
            for port in range(base, base + size):
                probe = socket.socket()
                sockets.append(probe)
                probe.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
    pytest.fail("found no block of free ports")


def _private_env(state_dir: Path, port_base: int) -> dict[str, str]:
    return {**os.environ, "HPCLLM_DEVCLUSTER_DIR": str(state_dir), "HPCLLM_DEVCLUSTER_PORT_BASE": str(port_base)}


@pytest.fixture
def private_state_dir():
    # munged wants every folder above its socket searchable by all, which pytest's tmp_path is not.
    state_dir = Path(tempfile.mkdtemp(prefix="hpcllm-dc-test-", dir="/var/tmp"))
    state_dir.chmod(0o755)
    yield state_dir
    shutil.rmtree(state_dir, ignore_errors=True)


def test_status_of_a_stopped_cluster_exits_3(tmp_path):
    result = _script("status", env=_private_env(tmp_path / "never-started", 17810))
    assert result.returncode == 3
    assert "down" in result.stdout
    assert "slurmctld: not running" in result.stdout


def test_start_refuses_a_port_in_use_and_names_it(private_state_dir):
    base = _free_port_block()
    taken = base + 2  # slurmd n2's port
    env = _private_env(private_state_dir, base)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        result = _script("start", env=env)
    assert result.returncode == 1
    assert f"port {taken} (for slurmd n2) is already in use" in result.stderr
    assert "HPCLLM_DEVCLUSTER_PORT_BASE" in result.stderr
    assert _script("status", env=env).returncode == 3  # nothing was started


def test_start_and_stop_require_root(tmp_path):
    for command in ("start", "stop"):
        result = _script(command, env=_private_env(tmp_path / "dc", 17810), user="nobody")
        assert result.returncode == 1
        assert "error: run as root" in result.stderr


def test_start_refuses_a_state_dir_munged_cannot_use(tmp_path):
    # pytest's tmp_path lies under a folder only root may enter; munged would refuse its socket there.
    result = _script("start", env=_private_env(tmp_path / "dc", _free_port_block()))
    assert result.returncode == 1
    assert "must be searchable by all users" in result.stderr


@pytest.mark.parametrize("name", ["with space", "tab\there", "hash#1", "a,b", "per%node", "br[1]"])
def test_start_refuses_a_state_dir_slurm_conf_cannot_hold(private_state_dir, name):
    """slurm.conf reads a path up to a space ('#' starts a comment, ',' ends AuthInfo's socket=, '%' is expanded per
    node, '[' starts a range in gres.conf's File=): such a folder is refused at once, naming
    HPCLLM_DEVCLUSTER_DIR, and nothing is started or written."""
    state_dir = private_state_dir / name
    env = _private_env(state_dir, _free_port_block())
    try:
        result = _script("start", env=env)
    finally:
        stopped = _script("stop", env=env)
    assert result.returncode == 1, result.stderr
    assert f"HPCLLM_DEVCLUSTER_DIR '{state_dir}'" in result.stderr and "choose another folder" in result.stderr
    assert not state_dir.exists() and stopped.returncode == 0


def test_unknown_command_and_option_are_rejected():
    assert "unknown command 'restart'" in _script("restart").stderr
    assert "unknown option '--fast'" in _script("start", "--fast").stderr


@pytest.mark.skipif(shutil.which("slurmctld") is None, reason="Slurm is not installed (run make host)")
@pytest.mark.parametrize("name", ["", "a&b"])
def test_a_private_cluster_starts_and_stops_every_daemon(private_state_dir, name):
    # A second, short-lived cluster in its own folder and port block: the shared one is left alone. '&' is a
    # plain character in slurm.conf; bash 5.2 would turn it into the placeholder if the script's rendering let it.
    state_dir = private_state_dir / name if name else private_state_dir
    env = _private_env(state_dir, _free_port_block())
    pids: list[int] = []
    try:
        started = _script("start", env=env)
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip() == f"export SLURM_CONF={state_dir}/conf/slurm.conf"
        assert f"\nStateSaveLocation={state_dir}/ctld\n" in (state_dir / "conf" / "slurm.conf").read_text()
        assert f" File={state_dir}/dev/fakegpu[0-1]" in (state_dir / "conf" / "gres.conf").read_text()
        pids = [int(p.read_text()) for p in (state_dir / "run").glob("*.pid")]
        assert len(pids) == 6  # munged, slurmctld, 4 slurmd
        assert oct((state_dir / "munge").stat().st_mode & 0o777) == "0o755"
        assert all((state_dir / "dev" / f"fakegpu{i}").is_char_device() for i in (0, 1))
    finally:
        stopped = _script("stop", env=env)
    assert stopped.returncode == 0, stopped.stderr
    for pid in pids:
        assert not _process_alive(pid)
    assert _script("status", env=env).returncode == 3


def _process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
