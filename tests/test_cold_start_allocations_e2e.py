"""Exactly one allocation for a cold start, on the real dev Slurm cluster (issue 16).

Found on the dev stack: after `make down` / `make up` (a fresh slurmctld numbers jobs from the start again; the
controller's registry remembers its old allocations and the node caching the model), the first request made the
controller submit allocations "prefer ['n1']" every half second until an agent registered. Here the registry is
pre-seeded the same way: a node (idle in Slurm now) whose persistent NVMe caches the model, and ended allocations
carrying the job ids Slurm hands out next. A route request must then submit one allocation asking for that node,
and keep it at one while the route is polled, across a controller restart in the middle of the cold start, until
the instance serves there.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from e2e_helpers import HPCLLM, admin_status, controller_process, free_port, wait_for, write_e2e_config

from hpcllm.checkpoint.converter import convert
from hpcllm.controller.protocol import CacheEntry, NodeRegistration, Tiers, TierInfo
from hpcllm.controller.registry import Registry
from hpcllm.httpkit.auth import SECRET_HEADER

pytestmark = pytest.mark.slurm

SECRET = "once-e2e-secret"
ADMIN = "once-e2e-admin"
SEEDED_JOB_IDS = 300  # ended allocations with the ids Slurm gives next (other sessions submit meanwhile too)


def next_job_id(slurm_cluster) -> int:
    """The id Slurm gives the next job: submit a held job and cancel it."""
    out = slurm_cluster.run("sbatch", "--parsable", "--hold", "-p", "batch", "-t", "1", "-J", "once-probe",
                            "-o", "/dev/null", "--wrap", "true").stdout.strip()
    job = int(out.split(";")[0])
    slurm_cluster.run("scancel", str(job))
    return job + 1


def usable_node(slurm_cluster) -> str:
    states = dict(line.split() for line in slurm_cluster.run("sinfo", "-h", "-p", "batch", "-N", "-o", "%N %t")
                  .stdout.splitlines())
    usable = sorted(n for n, s in states.items() if s.rstrip("*~#") in ("idle", "mix"))
    assert usable, f"no idle or mixed node in partition batch: {states}"
    return usable[-1]  # the last name: not where a tie-break or Slurm's own choice would go


def seed_registry(database_url: str, model: str, node: str, first_job: int) -> None:
    registry = Registry(database_url)
    try:
        tiers = Tiers(dram=TierInfo(capacity_bytes=1 << 30, read_gbps=5.0),
                      nvme=TierInfo(capacity_bytes=1 << 34, read_gbps=2.0, scope="persistent"),
                      sharedfs=TierInfo(read_gbps=0.5))
        now = time.time() - 600
        registry.register_node(NodeRegistration(
            node_id=node, agent_url="http://127.0.0.1:9", slurm_job_id=str(first_job - 1), gpus=0, tiers=tiers,
            cached=[CacheEntry(model=model, tier="nvme", bytes=1, verified=True)]), now)
        registry.node_left(node, "gone")  # its job ended: the persistent NVMe entry stays
        for job in range(first_job, first_job + SEEDED_JOB_IDS):
            registry.add_allocation(str(job), model, [node], "batch", 600, now)
            registry.update_allocation(str(job), state="ended", ended_at=now, reason="cancelled")
    finally:
        registry.close()


def jobs_named(slurm_cluster, name: str) -> list[str]:
    return slurm_cluster.run("squeue", "-h", "-t", "all", "-n", name, "-o", "%i").stdout.split()


def route_once(url: str, model: str, wait: float) -> dict:
    resp = httpx.get(f"{url}/v1/internal/route", params={"model": model, "wait": wait},
                     headers={SECRET_HEADER: SECRET}, timeout=wait + 30)
    assert resp.status_code in (200, 202), resp.text
    return resp.json()


def live_allocations(url: str) -> list[dict]:
    return [a for a in admin_status(url, ADMIN)["allocations"] if a["state"] != "ended"]


def test_cold_start_with_a_remembered_cache_and_reused_job_ids_submits_one_allocation(slurm_cluster,
                                                                                       tiny_llama_dir):
    base = Path(f"/var/tmp/hpcllm-once-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(mode=0o755, parents=True)
    model = f"once-{os.getpid()}"
    job_name = f"hpcllm-pool-{model}"
    source = base / "models" / model
    convert(tiny_llama_dir, source, progress=False)
    port = free_port()
    database_url = f"sqlite:///{base / 'controller.db'}"
    config_path = write_e2e_config(
        base, secret=SECRET, admin=ADMIN, controller_port=port, namespace=base.name,
        # No background read sweep and no spare worker (torch imported twice) beside the load: not the subject.
        node={"read_sweep": False, "spare_workers": 0},
        controller={"database_url": database_url, "agent_command": HPCLLM, "allocate_on_demand": True,
                    "node_timeout_seconds": 15, "route_max_wait_seconds": 20, "keep_alive_seconds": 120,
                    "allocation_keep_alive_seconds": 60, "preferred_node_wait_seconds": 600})
    node = usable_node(slurm_cluster)
    seed_registry(database_url, model, node, next_job_id(slurm_cluster))
    logs = [base / "controller-1.log", base / "controller-2.log"]
    try:
        with controller_process(config_path, logs[0], port=port) as url:
            resp = httpx.post(f"{url}/v1/admin/models", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30,
                              json={"name": model, "source": str(source), "gpus": 0})
            assert resp.status_code == 201, resp.text
            first = route_once(url, model, wait=0)
            assert first["status"] == "allocating", first
            for _ in range(3):  # the gateway's polling: each long-poll re-checks every 0.5 s
                route_once(url, model, wait=1.5)
            [alloc] = live_allocations(url)
            assert (alloc["job_id"], alloc["preferred_nodes"]) == (first["job_id"], [node]), alloc
            assert jobs_named(slurm_cluster, job_name) == [first["job_id"]]
        # Restarted in the middle of the cold start (the job is queued or its agent is starting).
        with controller_process(config_path, logs[1], port=port) as url:
            def ready():
                answer = route_once(url, model, wait=10)
                return answer if answer.get("status") == "ready" else None

            served = wait_for(ready, 150, f"{model} to serve")
            assert served["node_id"] == node, served
            assert jobs_named(slurm_cluster, job_name) == [first["job_id"]]
            [alloc] = live_allocations(url)
            assert (alloc["job_id"], alloc["nodes"]) == (first["job_id"], [node]), alloc
    except AssertionError as exc:
        ends = [(p, 2000) for p in sorted(base.rglob("*.out"))] + [(p, 4000) for p in logs if p.exists()]
        raise AssertionError(f"{exc}" + "".join(f"\n--- {p.name}\n{p.read_text()[-n:]}" for p, n in ends)) from None
    finally:
        leftover = jobs_named(slurm_cluster, job_name)
        if leftover:
            slurm_cluster.run("scancel", *leftover)
            wait_for(lambda: not set(leftover) & set(slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.split()),
                     60, "the allocations to leave the queue")
        for folder in Path("/dev/shm").glob(f"hpcllm-{base.name}-*"):
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
