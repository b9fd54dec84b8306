"""End to end on the real dev Slurm cluster: a real controller process, real node agents inside Slurm jobs on
n1-n4 (the node-agent sbatch template), a real worker serving the tiny converted test model.

Checks: each agent registers with measured tier bandwidths and the 2 fake GPUs Slurm gave its job; a checkpoint
warmed into one node's cache makes the controller place the model there; the route API hands out that worker and
its greedy tokens equal transformers' `generate`; the drain signal makes every agent exit 0.
Bounded: small probes, one tiny model, jobs signalled and cancelled at the end whatever happens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from e2e_helpers import submit_agent, wait_for

from hpcllm.checkpoint.converter import convert
from hpcllm.config import load_config
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.slurm.cli_backend import CliBackend
from hpcllm.worker.client import WorkerClient
from hpcllm.worker.protocol import GenerateRequest

pytestmark = pytest.mark.slurm

NODES = ("n1", "n2", "n3", "n4")
CACHED_ON = "n3"
SECRET = "e2e-secret"
ADMIN = "e2e-admin"
HPCLLM = str(Path(sys.executable).parent / "hpcllm")


# No background read sweep (~22 s of reads on each of the 4 agents, beside the model's load) and no spare workers
# (each agent's spare imports torch twice, its own and its model process's: the 3 agents that serve nothing, and the
# replacement of the one taken, slowed the one that matters to ~30 s): nothing in test_cluster_e2e uses them.
# test_cache_on_load_e2e uses the `controller` fixture, with the defaults (sweep and spares on).
LEAN_NODE = """
read_sweep = false
spare_workers = 0
"""


def write_config(tmp_path: Path, models: Path, node_overrides: str = "") -> Path:
    path = tmp_path / "hpcllm.toml"
    path.write_text(f"""
[paths]
state_dir = "{tmp_path / 'state'}"
models_dir = "{models}"
[cluster]
shared_secret = "{SECRET}"
[slurm]
partition = "batch"
time = "00:10:00"
gpus_per_node = 2
[node]
nvme_dir = "{tmp_path / 'nvme' / '%n'}"
dram_namespace = "e2e-{os.getpid()}-%n"
probe_bytes = {16 << 20}
memcpy_probe_bytes = {16 << 20}
heartbeat_seconds = 1.0
{node_overrides}
[controller]
host = "127.0.0.1"
database_url = "sqlite:///{tmp_path / 'controller.db'}"
admin_key = "{ADMIN}"
allocate_on_demand = false
tick_seconds = 1.0
""")
    path.chmod(0o600)  # holds the secret: the services refuse it otherwise
    return path


@pytest.fixture
def controller(tmp_path):
    yield from run_controller(tmp_path)


@pytest.fixture
def lean_controller(tmp_path):
    yield from run_controller(tmp_path, LEAN_NODE)


def run_controller(tmp_path: Path, node_overrides: str = ""):
    models = tmp_path / "models"
    config_path = write_config(tmp_path, models, node_overrides)
    ready = tmp_path / "controller.url"
    log = open(tmp_path / "controller.log", "wb")
    proc = subprocess.Popen([HPCLLM, "controller", "--config", str(config_path), "--port", "0", "--ready-file",
                             str(ready)], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = wait_for(lambda: ready.exists() and ready.read_text().strip(), 60, "the controller to listen")
        yield url, config_path, models
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def status(url: str) -> dict:
    return httpx.get(f"{url}/v1/admin/status", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).json()


def test_agents_register_place_by_cache_and_serve(slurm_cluster, lean_controller, tmp_path, tiny_llama_dir):
    url, config_path, models = lean_controller
    source = models / "tiny-llama"
    convert(tiny_llama_dir, source, progress=False)
    config = load_config(config_path)
    backend = CliBackend(config.slurm, command_timeout=30)
    jobs: dict[str, str] = {}
    try:
        for node in NODES:
            jobs[node] = submit_agent(backend, config, config_path, url, node, f"e2e-agent-{node}",
                                      tmp_path / "slurm")

        # Every agent registers: measured bandwidths, the job's 2 (fake) GPUs, its Slurm job, its own URL.
        def registered():
            nodes = {n["node_id"]: n for n in status(url)["nodes"] if n["state"] == "up"}
            return nodes if set(NODES) <= set(nodes) else None

        nodes = wait_for(registered, 120, f"agents on {NODES} to register")
        for name in NODES:
            n = nodes[name]
            assert n["gpus"] == 2, n
            assert n["slurm_job_id"] == jobs[name]
            for tier in ("dram", "nvme", "sharedfs"):
                assert n["tiers"][tier]["read_gbps"] > 0, (name, tier, n["tiers"])
            assert httpx.get(f"{n['agent_url']}/health", timeout=5).status_code == 401  # secret required

        # Warm the checkpoint into n3's DRAM tier through its agent; the heartbeat tells the controller.
        agent_url = nodes[CACHED_ON]["agent_url"]
        warmed = httpx.post(f"{agent_url}/v1/internal/cache/warm", headers={SECRET_HEADER: SECRET}, timeout=120,
                            json={"model": "tiny-llama", "source": str(source), "tier": "dram"})
        assert warmed.status_code == 200, warmed.text
        wait_for(lambda: any(c["model"] == "tiny-llama" for c in
                             next(n for n in status(url)["nodes"] if n["node_id"] == CACHED_ON)["cached"]),
                 30, "the cache entry to reach the controller")

        deployed = httpx.post(f"{url}/v1/admin/models", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30,
                              json={"name": "tiny-llama", "source": str(source), "gpus": 0})
        assert deployed.status_code == 201, deployed.text

        def routed():
            resp = httpx.get(f"{url}/v1/internal/route", params={"model": "tiny-llama", "wait": 20},
                             headers={SECRET_HEADER: SECRET}, timeout=40)
            assert resp.status_code in (200, 202), resp.text
            return resp.json() if resp.status_code == 200 else None

        ready = wait_for(routed, 120, "the model to become ready")
        assert ready["node_id"] == CACHED_ON, ready
        assert ready["load_tier"] == "dram"

        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        prompt = AutoTokenizer.from_pretrained(tiny_llama_dir)("the cluster", return_tensors="pt").input_ids
        expected = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1]:].tolist()
        with WorkerClient(ready["worker_url"], SECRET) as worker:
            with worker.generate(GenerateRequest(request_id="e2e", prompt_token_ids=prompt[0].tolist(), max_tokens=8,
                                                 temperature=0)) as stream:
                tokens = [line.token_id for line in stream if line.type == "token"]
        assert tokens and tokens == expected[:len(tokens)]

        # Drain: the batch shells forward USR1; every agent stops its workers and exits 0.
        for job in jobs.values():
            backend.signal(job, "USR1", batch_only=True)
        wait_for(lambda: all(backend.status(j).is_terminal for j in jobs.values()), 90, "the agents to drain")
        logs = {node: next((tmp_path / "slurm").glob(f"agent-{node}-*.out")).read_text() for node in NODES}
        for node, text in logs.items():
            assert "node agents exited with status 0" in text, (node, text[-3000:])
        assert "drained" in logs[CACHED_ON]
    finally:
        for job in jobs.values():
            backend.cancel(job)
        for folder in Path("/dev/shm").glob(f"hpcllm-e2e-{os.getpid()}-*"):
            shutil.rmtree(folder, ignore_errors=True)
