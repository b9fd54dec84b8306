"""Cache on load end to end on the real dev Slurm cluster: a real controller, a node agent in a Slurm job on n2 and
real workers serving the tiny converted model. The model's first start on the node reads the shared FS; without any
`hpcllm cache warm` the agent keeps verified DRAM and NVMe copies, the controller hears of them through the
heartbeat, and the second start on the node loads from DRAM."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from e2e_helpers import submit_agent, wait_for
from test_cluster_e2e import ADMIN, SECRET, controller, status  # noqa: F401 - controller is a fixture

from hpcllm.checkpoint import read_checkpoint
from hpcllm.checkpoint.converter import convert
from hpcllm.config import load_config
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.slurm.cli_backend import CliBackend

pytestmark = pytest.mark.slurm

NODE = "n2"
AUTH = {SECRET_HEADER: SECRET}


def test_second_start_on_a_node_is_local_without_cache_warm(slurm_cluster, controller, tmp_path, tiny_llama_dir):
    url, config_path, models = controller
    source = models / "tiny-llama"
    convert(tiny_llama_dir, source, progress=False)
    config = load_config(config_path)
    backend = CliBackend(config.slurm, command_timeout=30)
    job = None
    try:
        job = submit_agent(backend, config, config_path, url, NODE, f"e2e-col-{NODE}", tmp_path / "slurm")

        def node():
            return next((n for n in status(url)["nodes"] if n["node_id"] == NODE and n["state"] == "up"), None)

        agent_url = wait_for(node, 120, f"the agent on {NODE} to register")["agent_url"]
        assert node()["cached"] == []

        # Deployed with a short keep-alive: the instance scales to zero between the two starts.
        deployed = httpx.post(f"{url}/v1/admin/models", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30,
                              json={"name": "tiny-llama", "source": str(source), "gpus": 0,
                                    "keep_alive_seconds": 2})
        assert deployed.status_code == 201, deployed.text

        def routed():
            resp = httpx.get(f"{url}/v1/internal/route", params={"model": "tiny-llama", "wait": 20},
                             headers=AUTH, timeout=40)
            assert resp.status_code in (200, 202), resp.text
            return resp.json() if resp.status_code == 200 else None

        first = wait_for(routed, 120, "the first start")
        assert (first["node_id"], first["load_tier"]) == (NODE, "sharedfs"), first

        # No `cache warm`: the load's own bytes became DRAM and NVMe copies, and the controller knows.
        def cached_at_controller():
            tiers = sorted(c["tier"] for c in node()["cached"] if c["model"] == "tiny-llama")
            return tiers if tiers == ["dram", "nvme"] else None

        wait_for(cached_at_controller, 60, "the copies kept on load to reach the controller")
        copies = httpx.get(f"{agent_url}/v1/internal/cache", headers=AUTH, timeout=10).json()["cached"]
        assert sorted(c["tier"] for c in copies) == ["dram", "nvme"]
        for copy in copies:
            assert copy["verified"], copy
            read_checkpoint(copy["path"]).verify_files()  # the cached copies verify

        wait_for(lambda: not [i for i in status(url)["instances"] if i["model"] == "tiny-llama"], 60,
                 "the idle instance to scale to zero")
        second = wait_for(routed, 120, "the second start")
        assert (second["node_id"], second["load_tier"]) == (NODE, "dram"), second
    finally:
        if job is not None:
            backend.cancel(job)
        for folder in Path("/dev/shm").glob(f"hpcllm-e2e-{os.getpid()}-*"):
            shutil.rmtree(folder, ignore_errors=True)
