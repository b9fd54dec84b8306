"""`hpcllm cache` end to end on the real dev Slurm cluster, driven as an admin would: the real CLI (subprocesses)
against a real controller and real node agents running as Slurm jobs on n1-n4.

One cluster setup serves the whole module (controller, 4 agents, deployed models); the tests run in file order
and build on each other's cache state:
  registration with measured bandwidths -> MPI-broadcast warm to 4 nodes, `cache ls`, `cache verify` ->
  a flipped byte caught by verify (refilled) and by a load (refilled) -> an interrupted warm leaves nothing ->
  LRU eviction under n2's small capacity keeps the model a running worker uses; `cache evict` removes one copy ->
  clear one-line errors (unknown model / node, not enough space, node down: n4's agent is killed last).

Models: the tiny Llama converted under four names (tiny-a..tiny-d, ~1 MB each: same size, so n2's capacity of
3.5 copies makes the eviction order exact) and the ~41 MB "small" Llama (small-x) for the interrupted warm.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from e2e_helpers import (HPCLLM, admin_status, assert_clean_error, controller_process, run_hpcllm,
                         wait_for)

from hpcllm.checkpoint import read_checkpoint
from hpcllm.checkpoint.converter import convert
from hpcllm.config import load_config
from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.present import human_size
from hpcllm.slurm.cli_backend import CliBackend
from hpcllm.slurm.templates import node_agent_job_spec

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]

NODES = ("n1", "n2", "n3", "n4")
TINY = ("tiny-a", "tiny-b", "tiny-c", "tiny-d")
BIG = "small-x"
SMALL_NODE = "n2"  # its agent runs with a capacity of 3.5 tiny copies
SECRET = "cache-e2e-secret"
ADMIN = "cache-e2e-admin"


@dataclass
class CacheCluster:
    root: Path
    url: str
    config: Path
    models: Path
    env: dict[str, str]
    agents: dict[str, dict] = field(default_factory=dict)  # node -> controller's node status at registration
    jobs: dict[str, str] = field(default_factory=dict)  # node -> agent's Slurm job id

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`hpcllm ARGS --config C --url U` as the admin runs it."""
        return run_hpcllm(*args, "--config", str(self.config), "--url", self.url, env=self.env, timeout=timeout)

    def nvme(self, node: str) -> Path:
        return self.root / "nvme" / node

    def agent(self, node: str) -> httpx.Client:
        return httpx.Client(base_url=self.agents[node]["agent_url"], headers={SECRET_HEADER: SECRET}, timeout=60)

    def copies(self, node: str) -> dict[str, dict]:
        """{model: copy} of a node's NVMe tier, straight from its agent (cheaper than a CLI process)."""
        with self.agent(node) as agent:
            resp = agent.get("/v1/internal/cache")
        assert resp.status_code == 200, resp.text
        return {c["model"]: c for c in resp.json()["cached"] if c["tier"] == "nvme"}

    def ensure_cached(self, node: str, model: str) -> None:
        """What an earlier test left (tests may also run alone, e.g. with -k): warm through the agent if missing."""
        if model not in self.copies(node):
            with self.agent(node) as agent:
                resp = agent.post("/v1/internal/cache/warm",
                                  json={"model": model, "source": str(self.models / model), "tier": "nvme"})
            assert resp.status_code == 200, resp.text

    def all_copies(self) -> set[tuple[str, str]]:
        return {(node, model) for node in NODES for model in self.copies(node)}

    def listed(self, node: str | None = None) -> dict[tuple[str, str], dict]:
        """`hpcllm cache ls --json`: {(node, model): copy} of the NVMe tier."""
        args = ["cache", "ls", "--json"] + (["--node", node] if node else [])
        result = self.cli(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        rows = json.loads(result.stdout)["cached"]
        return {(r["node"], r["model"]): r for r in rows if r["tier"] == "nvme"}


def _config_text(root: Path, nvme_capacity_gb: float) -> str:
    return f"""
[paths]
state_dir = "{root / 'state'}"
models_dir = "{root / 'models'}"
[cluster]
shared_secret = "{SECRET}"
[slurm]
partition = "batch"
time = "00:15:00"
gpus_per_node = 0
[node]
nvme_dir = "{root / 'nvme' / '%n'}"
nvme_capacity_gb = {nvme_capacity_gb!r}
dram_namespace = "cache-e2e-{os.getpid()}-%n"
probe_bytes = {8 << 20}
memcpy_probe_bytes = {8 << 20}
heartbeat_seconds = 1.0
worker_stop_timeout_seconds = 5.0
[controller]
host = "127.0.0.1"
database_url = "sqlite:///{root / 'controller.db'}"
admin_key = "{ADMIN}"
allocate_on_demand = false
tick_seconds = 1.0
"""


def _copy_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


@pytest.fixture(scope="module")
def cluster(slurm_cluster, tmp_path_factory, tiny_llama_dir, tiny_models_root):
    from hpcllm.devmodels.builder import make_model

    root = tmp_path_factory.mktemp("cache-e2e")
    models = root / "models"
    for name in TINY:
        convert(tiny_llama_dir, models / name, progress=False)
    small = make_model("llama", tiny_models_root / "llama-small-cache-e2e", size="small")
    convert(small, models / BIG, chunk_size=1 << 20, progress=False)

    # n2 holds 3.5 tiny copies (marker included): the 4th tiny warm must evict exactly one.
    tiny_copy = _copy_bytes(models / TINY[0]) + 300
    config = root / "hpcllm.toml"
    config.write_text(_config_text(root, 1.0))
    small_config = root / "hpcllm-n2.toml"
    small_config.write_text(_config_text(root, 3.5 * tiny_copy / 1e9))
    for written in (config, small_config):
        written.chmod(0o600)  # they hold the secret: the services refuse them otherwise

    settings = load_config(config)
    backend = CliBackend(settings.slurm, command_timeout=30)
    with controller_process(config, root / "controller.log") as url:
        env = {**slurm_cluster.env, "HPCLLM_CONTROLLER_URL": url}
        for name in (*TINY, BIG):
            resp = httpx.post(f"{url}/v1/admin/models", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30,
                              json={"name": name, "source": str(models / name), "gpus": 0,
                                    "keep_alive_seconds": 3600})
            assert resp.status_code == 201, resp.text
        state = CacheCluster(root, url, config, models, env)
        try:
            for node in NODES:
                node_config = small_config if node == SMALL_NODE else config
                spec = node_agent_job_spec(settings, nodes=1, gpus_per_node=0, name=f"cache-e2e-{node}",
                                           agent_args=["--config", str(node_config)], hpcllm=HPCLLM,
                                           output=str(root / "slurm" / f"agent-{node}-%j.out"),
                                           env={"HPCLLM_CONTROLLER_URL": url, "HPCLLM_CONFIG": str(node_config)})
                state.jobs[node] = backend.submit(spec.model_copy(update={"nodelist": (node,)}))

            def registered():
                up = {n["node_id"]: n for n in admin_status(url, ADMIN)["nodes"] if n["state"] == "up"}
                return up if set(NODES) <= set(up) else None

            state.agents = wait_for(registered, 120, f"agents on {NODES} to register")
            yield state
        finally:
            for job in state.jobs.values():
                backend.cancel(job)
            for folder in Path("/dev/shm").glob(f"hpcllm-cache-e2e-{os.getpid()}-*"):
                shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ tests


def test_agents_register_and_report_measured_bandwidths(cluster):
    result = cluster.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    nodes = {n["node_id"]: n for n in json.loads(result.stdout)["nodes"]}
    for node in NODES:
        n = nodes[node]
        assert n["state"] == "up" and n["slurm_job_id"] == cluster.jobs[node], n
        for tier in ("nvme", "dram", "sharedfs"):
            assert n["tiers"][tier]["read_gbps"] > 0, (node, tier, n["tiers"])
    # n2's agent reports the capacity of its own config (3.5 tiny copies), the others 1 GB or the free disk.
    assert nodes[SMALL_NODE]["tiers"]["nvme"]["capacity_bytes"] < 10e6
    assert nodes["n1"]["tiers"]["nvme"]["capacity_bytes"] > 100e6


def test_mpi_warm_to_four_nodes_then_ls_and_verify(cluster):
    model = TINY[0]
    result = cluster.cli("cache", "warm", model, "--nodes", "n[1-4]", "--tier", "nvme", "--mpi", "--timeout", "240",
                         "--log-dir", str(cluster.root / "warm-logs"), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for node in NODES:
        assert f"{node}: {model} verified in {cluster.nvme(node) / model}" in result.stdout
    assert f"ok model {model} ranks 4" in result.stdout

    origin_bytes = _copy_bytes(cluster.models / model)
    for node in NODES:
        copy = cluster.copies(node)[model]  # what each agent holds
        assert copy["verified"] and copy["bytes"] >= origin_bytes and copy["in_use"] == 0, copy
        read_checkpoint(Path(copy["path"])).verify_files()

    table = cluster.cli("cache", "ls")
    assert table.returncode == 0, table.stderr
    header = next(line for line in table.stdout.splitlines() if "model" in line)
    for column in ("node", "model", "tier", "size", "last use", "verified"):
        assert column in header
    rows = [line for line in table.stdout.splitlines() if model in line]
    assert len(rows) == 4 and all("nvme" in r and human_size(origin_bytes) in r and "yes" in r for r in rows), table.stdout

    verified = cluster.cli("cache", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for node in NODES:
        assert f"{node}: {model} nvme: ok" in verified.stdout

    # The agents' heartbeats tell the controller (placement reads this).
    def on_every_node():
        nodes = {n["node_id"]: n for n in admin_status(cluster.url, ADMIN)["nodes"]}
        return all(any(c["model"] == model for c in nodes[n]["cached"]) for n in NODES)

    wait_for(on_every_node, 30, "the controller to see the 4 copies")


def _flip_one_byte(copy: Path) -> Path:
    part = read_checkpoint(copy).partitions[0]
    data = bytearray(part.path.read_bytes())
    data[len(data) // 2] ^= 0x40
    part.path.write_bytes(bytes(data))
    return part.path


def test_flipped_byte_is_caught_by_verify_and_refilled(cluster):
    model = TINY[0]
    for node in NODES:
        cluster.ensure_cached(node, model)
    damaged = _flip_one_byte(cluster.nvme("n3") / model)
    origin = cluster.models / model / damaged.name

    result = cluster.cli("cache", "verify")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"n3: {model} nvme: refilled" in result.stdout
    assert "Traceback" not in result.stderr and "1 corrupt copy found" in result.stderr
    for node in ("n1", "n2", "n4"):
        assert f"{node}: {model} nvme: ok" in result.stdout
    assert damaged.read_bytes() == origin.read_bytes()

    again = cluster.cli("cache", "verify", "--node", "n3")
    assert again.returncode == 0 and f"n3: {model} nvme: ok" in again.stdout, again.stdout + again.stderr
    assert cluster.copies("n3")[model]["verified"]


@pytest.mark.slow  # a worker process start (imports + load) costs 10-25 s on the 2 shared cores
def test_flipped_byte_is_caught_by_a_load_and_refilled(cluster):
    model = TINY[0]
    cluster.ensure_cached("n4", model)
    damaged = _flip_one_byte(cluster.nvme("n4") / model)
    origin = cluster.models / model / damaged.name
    with cluster.agent("n4") as agent:
        started = agent.post("/v1/internal/instances",
                             json={"model": model, "source": str(cluster.models / model), "gpu_ids": []})
        assert started.status_code == 202, started.text
        assert started.json()["load_tier"] == "nvme"
        instance_id = started.json()["instance_id"]

        def failed():
            infos = {i["instance_id"]: i for i in agent.get("/v1/internal/instances").json()["instances"]}
            return infos[instance_id] if infos[instance_id]["state"] == "failed" else None

        info = wait_for(failed, 60, "the worker to fail its load")
        assert "status 4" in info["error"], info
        # The agent dropped the corrupt copy and refilled it from the origin: good bytes, verified.
        wait_for(lambda: damaged.exists() and damaged.read_bytes() == origin.read_bytes(), 30,
                 "the copy to be refilled")
        agent.delete(f"/v1/internal/instances/{instance_id}")
    assert cluster.copies("n4")[model]["verified"]
    verified = cluster.cli("cache", "verify", "--node", "n4")
    assert verified.returncode == 0 and f"n4: {model} nvme: ok" in verified.stdout, verified.stdout


def test_interrupted_warm_leaves_no_visible_entry(cluster):
    warm = subprocess.Popen([HPCLLM, "cache", "warm", BIG, "--nodes", "n[1-4]", "--mpi", "--config",
                             str(cluster.config), "--url", cluster.url, "--log-dir", str(cluster.root / "warm-logs")],
                            env=cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def filling():
            return [p for n in NODES if cluster.nvme(n).is_dir()
                    for p in cluster.nvme(n).glob(f".{BIG}.filling-*")]

        wait_for(lambda: filling() or warm.poll() is not None, 120, "the copy to start", interval=0.05)
        assert warm.poll() is None, "the warm finished before it could be interrupted"
        warm.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = warm.communicate(timeout=60)
    finally:
        if warm.poll() is None:
            warm.kill()
            warm.wait()
    assert warm.returncode != 0 and "Traceback" not in err, out + err

    listed = cluster.listed()
    assert not [key for key in listed if key[1] == BIG], listed
    for node in NODES:
        assert not (cluster.nvme(node) / BIG).exists()
    # The cancelled ranks' temporary folders go too (removed by the ranks, or as soon as they are dead).
    wait_for(lambda: not [p for n in NODES for p in cluster.nvme(n).glob(f".{BIG}.*")], 60,
             "the partial copies to be removed")
    # Every rank removed its own partial copy on SIGTERM, even those blocked inside an MPI call at that moment.
    [log] = (cluster.root / "warm-logs").glob(f"hpcllm-warm-{BIG}-*.err")
    wait_for(lambda: log.read_text().count("Exited with exit code 143") == 4, 30, "the 4 ranks to exit")


def test_lru_eviction_keeps_the_in_use_model_and_evict_removes_one_copy(cluster):
    node = SMALL_NODE
    in_use, older, newer, incoming = TINY
    cluster.ensure_cached(node, in_use)
    with cluster.agent(node) as agent:
        # A running worker uses tiny-a (warmed first by the MPI test): the least recently used copy, but in use.
        started = agent.post("/v1/internal/instances",
                             json={"model": in_use, "source": str(cluster.models / in_use), "gpu_ids": []})
        assert started.status_code == 202 and started.json()["load_tier"] == "nvme", started.text
        instance_id = started.json()["instance_id"]

        def worker_state() -> str:
            return next(i["state"] for i in agent.get("/v1/internal/instances").json()["instances"]
                        if i["instance_id"] == instance_id)

        try:
            # The copy is held from the worker's spawn (a reference under its pid), not only once it is ready:
            # no need to wait for the (slow) load here; it must still be running when the evictions happen.
            for model in (older, newer):
                result = cluster.cli("cache", "warm", model, "--nodes", node)
                assert result.returncode == 0, result.stdout + result.stderr
                time.sleep(0.05)  # distinct last-use times
            copies = cluster.copies(node)
            assert set(copies) == {in_use, older, newer}
            assert copies[in_use]["in_use"] == 1
            assert copies[in_use]["last_used"] < copies[older]["last_used"] < copies[newer]["last_used"]

            result = cluster.cli("cache", "warm", incoming, "--nodes", node)
            assert result.returncode == 0, result.stdout + result.stderr
            assert set(cluster.copies(node)) == {in_use, newer, incoming}  # `older` was evicted

            # Not enough space: small-x does not fit even after evicting every copy not in use.
            full = cluster.cli("cache", "warm", BIG, "--nodes", node)
            assert_clean_error(full, f"node {node}", "needs", "capacity", in_use)
            assert full.returncode == 4
            assert set(cluster.copies(node)) == {in_use, newer, incoming}

            refused = cluster.cli("cache", "evict", in_use, "--node", node, "--tier", "nvme")
            assert_clean_error(refused, "in use")
            assert worker_state() in ("loading", "ready")
        finally:
            agent.delete(f"/v1/internal/instances/{instance_id}")

    before = cluster.all_copies()
    result = cluster.cli("cache", "evict", newer, "--node", node, "--tier", "nvme")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{node}: evicted {newer} from nvme" in result.stdout
    after = cluster.all_copies()
    assert set(before) - set(after) == {(node, newer)} and set(after) <= set(before)
    assert not (cluster.nvme(node) / newer).exists()


def test_clear_errors_for_unknown_model_unknown_node_and_node_down(cluster):
    cluster.ensure_cached("n1", TINY[0])
    unknown_model = cluster.cli("cache", "warm", "no-such-model", "--nodes", "n1")
    assert_clean_error(unknown_model, "no-such-model", "not deployed")
    assert unknown_model.returncode == 4  # CacheError's exit code, as for every error below

    unknown_node = cluster.cli("cache", "warm", TINY[1], "--nodes", "n[1,9]")
    assert_clean_error(unknown_node, "n9", "no registered agent")
    assert unknown_node.returncode == 4
    unknown_node_mpi = cluster.cli("cache", "warm", TINY[1], "--nodes", "n9", "--mpi", "--log-dir",
                                   str(cluster.root / "warm-logs"))
    assert_clean_error(unknown_node_mpi, "n9", "Invalid node name")

    # n4's agent dies (SIGKILL: no drain, no goodbye); the controller still lists it for a while.
    subprocess.run(["scancel", "--signal=KILL", "--full", cluster.jobs["n4"]], env=cluster.env, check=True,
                   timeout=30)
    url = cluster.agents["n4"]["agent_url"]
    wait_for(lambda: not _answers(url), 30, "n4's agent to die")
    warm_down = cluster.cli("cache", "warm", TINY[1], "--nodes", "n[3-4]")
    assert_clean_error(warm_down, "n4", "not reachable")
    assert warm_down.returncode == 4
    listing = cluster.cli("cache", "ls")
    # The live nodes are still listed; a node that did not answer fails the command (its copies are unknown).
    assert listing.returncode == 4 and "n4" in listing.stderr and "not reachable" in listing.stderr
    assert "n1" in listing.stdout and TINY[0] in listing.stdout


def _answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=2)
        return True
    except httpx.HTTPError:
        return False
