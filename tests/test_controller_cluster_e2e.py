"""On-demand serving end to end on the real dev Slurm cluster, through the CLI and the slurmrestd backends.

A real controller (allocate_on_demand, short keep-alives) gets two tiny converted models deployed; a route request
makes it submit a node-agent allocation, the agent registers, the model loads and its greedy tokens equal
transformers' `generate`; the second model, warmed into that node's DRAM cache, is placed there and loads from
DRAM. Then both instances are stopped after their keep-alive and the idle allocation is cancelled (gone from
squeue). The same flow runs through slurmrestd.

Locality among several candidates: three node agents (one 3-node job) are up, tiny-gpt2 is in the DRAM cache of
one of them and tiny-llama in the DRAM of another; each model starts on the node holding it (not on the one the
tie-break or the shared FS would pick), and the controller's placement log shows all three were considered.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
from e2e_helpers import HPCLLM, admin_status, controller_process, node_key_in, wait_for

from hpcllm.checkpoint.converter import convert
from hpcllm.config import load_config
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.slurm.cli_backend import CliBackend
from hpcllm.slurm.templates import node_agent_job_spec
from hpcllm.worker.client import WorkerClient
from hpcllm.worker.protocol import GenerateRequest

pytestmark = pytest.mark.slurm

SECRET = "ctl-e2e-secret"
ADMIN = "ctl-e2e-admin"
KEEP_ALIVE_S = 4
PROMPT = "the cluster"


def write_config(base: Path, backend: str, rest, allocate_on_demand: bool = True, spare_workers: int = 1) -> Path:
    """No background read sweep (probe reads beside the loads; placement weighs the start probes' rates)."""
    rest_lines = ""
    if backend == "rest":
        token = base / "slurm.jwt"
        token.write_text(rest.rest_token)
        rest_lines = f'rest_url = "{rest.rest_url}"\nrest_token_file = "{token}"\n'
    path = base / "hpcllm.toml"
    path.write_text(f"""
[paths]
state_dir = "{base / 'state'}"
models_dir = "{base / 'models'}"
[cluster]
shared_secret = "{SECRET}"
[slurm]
backend = "{backend}"
{rest_lines}partition = "batch"
time = "00:10:00"
[node]
nvme_dir = "{base / 'nvme' / '%n'}"
dram_namespace = "{base.name}-%n"
probe_bytes = {16 << 20}
memcpy_probe_bytes = {16 << 20}
heartbeat_seconds = 1.0
read_sweep = false
spare_workers = {spare_workers}
[controller]
host = "127.0.0.1"
database_url = "sqlite:///{base / 'controller.db'}"
admin_key = "{ADMIN}"
agent_command = "{HPCLLM}"
allocate_on_demand = {str(allocate_on_demand).lower()}
tick_seconds = 1.0
keep_alive_seconds = {KEEP_ALIVE_S}
allocation_keep_alive_seconds = 3
node_timeout_seconds = 15
route_max_wait_seconds = 20
""")
    path.chmod(0o600)  # holds the secret: the services refuse it otherwise
    return path


def greedy_tokens(model_dir: Path, n: int = 8) -> tuple[list[int], list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(model_dir)(PROMPT, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return prompt[0].tolist(), out[0, prompt.shape[1]:].tolist()


def route(url: str, model: str) -> dict:
    def ready():
        resp = httpx.get(f"{url}/v1/internal/route", params={"model": model, "wait": 15},
                         headers={SECRET_HEADER: SECRET}, timeout=40)
        assert resp.status_code in (200, 202), resp.text
        return resp.json() if resp.status_code == 200 else None

    return wait_for(ready, 90, f"{model} to become ready")


def generate(worker_url: str, prompt: list[int], n: int, key: str | None = None) -> list[int]:
    """key: the route answer's worker_key (an allocation's worker takes its node key, not the secret)."""
    with WorkerClient(worker_url, key or SECRET) as worker:
        with worker.generate(GenerateRequest(request_id="ctl-e2e", prompt_token_ids=prompt, max_tokens=n,
                                             temperature=0)) as stream:
            return [line.token_id for line in stream if line.type == "token"]


def deploy(url: str, name: str, source: Path) -> None:
    resp = httpx.post(f"{url}/v1/admin/models", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30,
                      json={"name": name, "source": str(source), "gpus": 0, "keep_alive_seconds": KEEP_ALIVE_S})
    assert resp.status_code == 201, resp.text


@pytest.mark.parametrize("backend", ["cli", "rest"])
def test_on_demand_allocation_serves_two_models_then_scales_to_zero(backend, request, slurm_cluster, tiny_llama_dir,
                                                                    tiny_gpt2_dir):
    rest = request.getfixturevalue("slurm_rest") if backend == "rest" else None
    # Munge and the agents need world-searchable parents: not pytest's private tmp folder.
    base = Path(f"/var/tmp/hpcllm-ctl-e2e-{os.getpid()}-{backend}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(mode=0o755, parents=True)
    expected = {"tiny-llama": greedy_tokens(tiny_llama_dir), "tiny-gpt2": greedy_tokens(tiny_gpt2_dir)}
    sources = {name: base / "models" / name for name in expected}
    convert(tiny_llama_dir, sources["tiny-llama"], progress=False)
    convert(tiny_gpt2_dir, sources["tiny-gpt2"], progress=False)
    config_path = write_config(base, backend, rest)
    job_ids: set[str] = set()
    try:
        with controller_process(config_path, base / "controller.log") as url:
            for name, source in sources.items():
                deploy(url, name, source)

            # First request: no agent anywhere, so the controller submits an allocation and starts the model there.
            llama = route(url, "tiny-llama")
            prompt, tokens = expected["tiny-llama"]
            assert llama["worker_key"], "an allocation's agent registers with its token and gets a node key"
            assert generate(llama["worker_url"], prompt, len(tokens), llama["worker_key"]) == tokens
            node = llama["node_id"]
            status = admin_status(url, ADMIN)
            job_ids = {a["job_id"] for a in status["allocations"]}
            assert [a["nodes"] for a in status["allocations"]] == [[node]], status["allocations"]

            # Warm the second model into that node's DRAM: it is placed there and loads from the cache.
            agent_url = next(n["agent_url"] for n in status["nodes"] if n["node_id"] == node)
            agent_key = node_key_in(status, node, SECRET)  # the allocation's agent: its node key
            warmed = httpx.post(f"{agent_url}/v1/internal/cache/warm", headers={SECRET_HEADER: agent_key}, timeout=60,
                                json={"model": "tiny-gpt2", "source": str(sources["tiny-gpt2"]), "tier": "dram"})
            assert warmed.status_code == 200, warmed.text
            wait_for(lambda: any(c["model"] == "tiny-gpt2" for n in admin_status(url, ADMIN)["nodes"]
                                 if n["node_id"] == node for c in n["cached"]), 20, "the cache entry to be reported")
            gpt2 = route(url, "tiny-gpt2")
            assert (gpt2["node_id"], gpt2["load_tier"]) == (node, "dram"), gpt2
            prompt, tokens = expected["tiny-gpt2"]
            assert generate(gpt2["worker_url"], prompt, len(tokens), gpt2["worker_key"]) == tokens

            # On the defaults the agent keeps a spare worker (imports done) that an instance's start takes.
            instance_logs = [p for p in base.glob("state/node/*/*.log") if not p.name.startswith("spare-")]
            assert any("spare worker ready" in p.read_text() for p in instance_logs), instance_logs

            # Scale to zero: idle instances stop after their keep-alive, then the empty allocation is cancelled.
            wait_for(lambda: not admin_status(url, ADMIN)["instances"], 30, "the idle instances to stop")
            wait_for(lambda: all(a["state"] == "ended" for a in admin_status(url, ADMIN)["allocations"]), 45,
                     "the idle allocation to end")
            queued = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.split()
            assert not job_ids & set(queued), (job_ids, queued)
    except AssertionError as exc:
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(base.rglob("*.out")))
        ctl = (base / "controller.log").read_text()[-3000:] if (base / "controller.log").exists() else ""
        raise AssertionError(f"{exc}\n--- controller.log\n{ctl}{logs}") from None
    finally:
        cancel_and_wait(slurm_cluster, job_ids)
        for folder in Path("/dev/shm").glob(f"hpcllm-{base.name}-*"):
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def cancel_and_wait(slurm_cluster, job_ids: set[str], timeout: float = 60) -> None:
    """scancel, then wait until the jobs left the queue: agents still shutting down would recreate their cache
    folders under a test folder removed meanwhile."""
    for job in job_ids:
        slurm_cluster.run("scancel", job, check=False)

    def gone():
        live = slurm_cluster.run("squeue", "-h", "--states=PD,CF,R,CG", "-o", "%i", check=False).stdout.split()
        return not job_ids & set(live)

    try:
        wait_for(gone, timeout, f"jobs {sorted(job_ids)} to leave the queue")
    except AssertionError as exc:
        print(f"warning: {exc}")  # cleanup only: the test's own outcome stands


def placements(log_path: Path) -> dict[str, dict]:
    """The controller's last logged placement decision per model ("placement of NAME: {breakdown json}")."""
    decisions = {}
    for line in log_path.read_text().splitlines():
        head, sep, breakdown = line.partition(": {")
        if sep and "placement of " in head:
            decisions[head.rsplit("placement of ", 1)[1]] = json.loads("{" + breakdown)
    return decisions


def warm_dram(agent_url: str, model: str, source: Path) -> None:
    warmed = httpx.post(f"{agent_url}/v1/internal/cache/warm", headers={SECRET_HEADER: SECRET}, timeout=60,
                        json={"model": model, "source": str(source), "tier": "dram"})
    assert warmed.status_code == 200, warmed.text


def test_each_model_starts_on_the_one_node_of_three_caching_it(slurm_cluster, tiny_llama_dir, tiny_gpt2_dir):
    base = Path(f"/var/tmp/hpcllm-ctl-loc-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(mode=0o755, parents=True)
    sources = {"tiny-llama": base / "models" / "tiny-llama", "tiny-gpt2": base / "models" / "tiny-gpt2"}
    convert(tiny_llama_dir, sources["tiny-llama"], progress=False)
    convert(tiny_gpt2_dir, sources["tiny-gpt2"], progress=False)
    # No on-demand allocations: the three agents of one job are the only candidates, and they stay up. No spares:
    # each would import torch twice (its own and its model process's) beside the others and the two loads.
    config_path = write_config(base, "cli", None, allocate_on_demand=False, spare_workers=0)
    config = load_config(config_path)
    backend = CliBackend(config.slurm, command_timeout=30)
    job_id, nodes = None, {}
    try:
        with controller_process(config_path, base / "controller.log") as url:
            for name, source in sources.items():
                deploy(url, name, source)
            pool = node_agent_job_spec(config, nodes=3, gpus_per_node=0, name="ctl-e2e-locality", hpcllm=HPCLLM,
                                       agent_args=["--config", str(config_path)],
                                       output=str(base / "slurm" / "pool-%j.out"),
                                       env={"HPCLLM_CONTROLLER_URL": url, "HPCLLM_CONFIG": str(config_path)})
            job_id = backend.submit(pool)

            def three_up():
                up = {n["node_id"]: n for n in admin_status(url, ADMIN)["nodes"]
                      if n["state"] == "up" and n["slurm_job_id"] == job_id}
                return up if len(up) == 3 else None

            nodes = wait_for(three_up, 120, "three node agents to register")
            # The first name is where a tie would go: neither model is cached there.
            _, llama_node, gpt2_node = sorted(nodes)
            warm_dram(nodes[gpt2_node]["agent_url"], "tiny-gpt2", sources["tiny-gpt2"])
            warm_dram(nodes[llama_node]["agent_url"], "tiny-llama", sources["tiny-llama"])

            def holders(model: str) -> list[str]:
                return sorted(n["node_id"] for n in admin_status(url, ADMIN)["nodes"]
                              for c in n["cached"] if c["model"] == model)

            wait_for(lambda: holders("tiny-gpt2") == [gpt2_node] and holders("tiny-llama") == [llama_node], 20,
                     "each checkpoint to be reported cached on exactly one node")

            expected = (("tiny-gpt2", gpt2_node), ("tiny-llama", llama_node))
            for model, _ in expected:  # both cold starts at once: the two workers load side by side
                kick = httpx.get(f"{url}/v1/internal/route", params={"model": model},
                                 headers={SECRET_HEADER: SECRET}, timeout=40)
                assert kick.status_code in (200, 202), kick.text
            for model, node in expected:
                ready = route(url, model)
                assert (ready["node_id"], ready["load_tier"]) == (node, "dram"), (model, ready)
                decision = placements(base / "controller.log")[model]
                assert (decision["node"], decision["tier"], decision["kind"]) == (node, "dram", "running"), decision
                assert decision["considered"] >= 3, decision
    except AssertionError as exc:
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(base.rglob("*.out")))
        ctl = (base / "controller.log").read_text()[-3000:] if (base / "controller.log").exists() else ""
        # The rates placement weighs the copies with (the start probes'): a node's DRAM copy loses to another's
        # shared FS only where its DRAM rate is lower.
        rates = {node_id: node["tiers"] for node_id, node in sorted(nodes.items())}
        raise AssertionError(f"{exc}\n--- registered tier rates\n{rates}\n--- controller.log\n{ctl}{logs}") from None
    finally:
        cancel_and_wait(slurm_cluster, {job_id} if job_id else set())
        for folder in Path("/dev/shm").glob(f"hpcllm-{base.name}-*"):
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
