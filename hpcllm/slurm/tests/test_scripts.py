"""The single-node node-agent script run by plain bash (no Slurm): signal forwarding and exit status."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hpcllm.config import Config
from hpcllm.slurm.templates import node_agent_job_spec, render_batch_script

AGENT = """#!/bin/bash
echo "agent started: $*"
drain() { trap "" USR1 TERM; echo "agent drained on $1"; kill "$child" 2>/dev/null; exit 0; }
trap 'drain USR1' USR1
trap 'drain TERM' TERM
if [[ ${AGENT_EXIT:-} ]]; then exit "$AGENT_EXIT"; fi
sleep 60 & child=$!
wait
"""


def start(tmp_path: Path, **env: str) -> subprocess.Popen:
    agent = tmp_path / "hpcllm"
    agent.write_text(AGENT)
    agent.chmod(0o755)
    config = Config.model_validate({"paths": {"state_dir": str(tmp_path)}})
    script = tmp_path / "job.sh"
    script.write_text(render_batch_script(node_agent_job_spec(config, nodes=1, hpcllm=str(agent))))
    job_env = {**os.environ, "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1", **env}
    return subprocess.Popen(["bash", str(script)], env=job_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def read_until(process: subprocess.Popen, text: str, timeout: float = 20) -> str:
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        seen += line
        if text in line:
            return seen
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"no {text!r} in output: {seen!r}")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_to_the_batch_shell_drains_the_agent(tmp_path, sig):
    process = start(tmp_path)
    try:
        read_until(process, "agent started: node")
        process.send_signal(sig)
        name = sig.name.removeprefix("SIG")
        rest = read_until(process, "node agents exited")
        assert f"agent drained on {name}" in rest and "exited with status 0" in rest
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
        process.wait()


def test_the_agents_exit_status_is_the_jobs(tmp_path):
    process = start(tmp_path, AGENT_EXIT="3")
    try:
        assert "exited with status 3" in read_until(process, "node agents exited")
        assert process.wait(timeout=20) == 3
    finally:
        process.kill()
        process.wait()
