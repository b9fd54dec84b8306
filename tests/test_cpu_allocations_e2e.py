"""Allocations for CPU models submitted together each get a node, and every agent registers (real dev Slurm
cluster, real controller and node agents).

Found by bench/replay.py: two CPU models' first requests made the controller submit two allocations in the same
instant; they asked Slurm for no GPU, Slurm put both on one node, and only the first agent there could register
(one agent per node): the other model's requests waited until they were lost, its job holding Slurm resources.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from e2e_helpers import (HPCLLM, admin_status, cancel_controller_jobs, controller_process, free_port, wait_for,
                         write_e2e_config)

from hpcllm.checkpoint.converter import convert
from hpcllm.config import load_config
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.slurm.cli_backend import CliBackend

pytestmark = pytest.mark.slurm

SECRET = "cpu-alloc-e2e-secret"
ADMIN = "cpu-alloc-e2e-admin"


def test_two_cpu_allocations_submitted_at_once_land_on_two_nodes_and_both_agents_register(slurm_cluster,
                                                                                          tiny_llama_dir):
    base = Path(f"/var/tmp/hpcllm-cpualloc-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(mode=0o755, parents=True)
    source = base / "models" / "tiny"
    convert(tiny_llama_dir, source, progress=False)
    models = [f"cpualloc-{os.getpid()}-{i}" for i in (1, 2)]
    port = free_port()
    config_path = write_e2e_config(
        base, secret=SECRET, admin=ADMIN, controller_port=port, namespace=base.name,
        # No autoscaler tick (no Slurm poll) between the two submissions: neither allocation's node is known to the
        # controller when the other is submitted, as when both are submitted in one tick.
        controller={"agent_command": HPCLLM, "allocate_on_demand": True, "max_allocations": 2, "tick_seconds": 300,
                    "node_timeout_seconds": 15, "keep_alive_seconds": 120, "allocation_keep_alive_seconds": 120})
    log = base / "controller.log"
    jobs: list[str] = []
    try:
        with controller_process(config_path, log, port=port) as url:
            for model in models:
                resp = httpx.post(f"{url}/v1/admin/models", headers={"Authorization": f"Bearer {ADMIN}"},
                                  timeout=30, json={"name": model, "source": str(source), "gpus": 0})
                assert resp.status_code == 201, resp.text
            for model in models:  # back to back: the second is submitted before Slurm has placed the first
                resp = httpx.get(f"{url}/v1/internal/route", params={"model": model, "wait": 0},
                                 headers={SECRET_HEADER: SECRET}, timeout=30)
                assert resp.status_code == 202 and resp.json()["status"] == "allocating", resp.text
                jobs.append(resp.json()["job_id"])
            assert len(set(jobs)) == 2

            def both_registered():
                nodes = {n["slurm_job_id"]: n["node_id"] for n in admin_status(url, ADMIN)["nodes"]
                         if n["state"] == "up"}
                return nodes if all(job in nodes for job in jobs) else None

            registered = wait_for(both_registered, 180, "both allocations' agents to register")
            assert registered[jobs[0]] != registered[jobs[1]], registered
    except AssertionError as exc:
        ends = [(p, 2000) for p in sorted(base.rglob("*.out"))] + [(log, 4000)]
        raise AssertionError(f"{exc}" + "".join(f"\n--- {p.name}\n{p.read_text()[-n:]}" for p, n in ends
                                                if p.exists())) from None
    finally:  # the controller has stopped: every job it submitted is known
        cancel_controller_jobs(config_path, CliBackend(load_config(config_path).slurm, command_timeout=30))
        for folder in Path("/dev/shm").glob(f"hpcllm-{base.name}-*"):
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
