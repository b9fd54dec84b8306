"""`make down` (slurm/down.sh) stops the services `make up` started by the PIDs in their pid files, and only them:
RUN_DIR is under /var/tmp, which outlives a reboot, so a pid file may name a PID another process has since taken.

Each test points down.sh at its own RUN_DIR and at a dev cluster folder that does not exist, so `devcluster.sh
stop` finds nothing to stop (the shared dev cluster is never touched).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "slurm" / "down.sh"

# A stand-in `hpcllm`: as `hpcllm gateway` it serves until SIGTERM, then exits.
FAKE_HPCLLM = """#!/bin/bash
trap 'exit 0' TERM
while :; do sleep 0.2; done
"""


def _down(run_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HPCLLM_")}
    env.update(HPCLLM_RUN_DIR=str(run_dir), HPCLLM_DEVCLUSTER_DIR=str(tmp_path / "no-devcluster"))
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)


def test_pid_files_naming_another_process_are_not_signalled_but_removed(tmp_path):
    """After a reboot the pid files are stale and their PIDs may belong to anything: make down leaves it alone."""
    run_dir = tmp_path / "run"
    (run_dir / "nginx").mkdir(parents=True)
    other = subprocess.Popen(["sleep", "600"])
    try:
        for pid_file in ("gateway.pid", "controller.pid", "nginx/nginx.pid"):
            (run_dir / pid_file).write_text(f"{other.pid}\n")
        result = _down(run_dir, tmp_path)
        assert other.poll() is None, f"make down signalled pid {other.pid}, not one of its services:\n{result.stderr}"
        assert "stopping" not in result.stderr
        assert f"nginx.pid names pid {other.pid}, which is not the nginx of {run_dir / 'nginx' / 'nginx.conf'}: " \
               "left alone, file removed" in result.stderr
        for name in ("gateway", "controller"):
            assert f"{name}.pid names pid {other.pid}, which is not a running 'hpcllm {name}': left alone, file " \
                   "removed" in result.stderr
        assert not [path.name for path in run_dir.rglob("*.pid")]
    finally:
        other.kill()
        other.wait()


# The gateway's command line as `ps` shows it: `hpcllm gateway`, or with setproctitle installed the title gunicorn
# gives its master (proc_name hpcllm-gateway, hpcllm/gateway/server.py), set here as the stand-in's argv[0].
GATEWAY_COMMAND_LINES = {
    "hpcllm gateway": lambda fake: ["bash", str(fake), "gateway"],
    "setproctitle": lambda fake: ["gunicorn: master [hpcllm-gateway]", str(fake)],
}


@pytest.mark.parametrize("command_line", GATEWAY_COMMAND_LINES)
def test_a_running_service_is_stopped(tmp_path, command_line):
    run_dir, fake = tmp_path / "run", tmp_path / "bin" / "hpcllm"
    run_dir.mkdir()
    fake.parent.mkdir()
    fake.write_text(FAKE_HPCLLM)
    command = GATEWAY_COMMAND_LINES[command_line](fake)
    gateway = subprocess.Popen(command, executable="bash")
    # Popen may return before the child has exec'd: until then /proc shows this test's command line.
    cmdline = Path(f"/proc/{gateway.pid}/cmdline")
    deadline = time.monotonic() + 60
    while cmdline.read_bytes().split(b"\0")[0] != command[0].encode():
        assert time.monotonic() < deadline, f"pid {gateway.pid} did not exec {command}"
        time.sleep(0.01)
    reaper = threading.Thread(target=gateway.wait)  # reaped at once, so down.sh sees it gone
    reaper.start()
    try:
        (run_dir / "gateway.pid").write_text(f"{gateway.pid}\n")
        result = _down(run_dir, tmp_path)
        reaper.join(timeout=60)
        assert gateway.returncode == 0, result.stderr
        assert f"stopping gateway (pid {gateway.pid})" in result.stderr and "did not stop" not in result.stderr
        assert not (run_dir / "gateway.pid").exists()
    finally:
        if gateway.returncode is None:
            gateway.kill()
        reaper.join()
