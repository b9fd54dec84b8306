"""Fixtures: a controller on a temporary SQLite database with a fake clock, in-memory node agents and Slurm."""

from __future__ import annotations

import os

from pathlib import Path

import pytest

from hpcllm.config import Config, parse_config
from hpcllm.controller.allocations import Allocator
from hpcllm.controller.app import create_app
from hpcllm.controller.autoscaler import Autoscaler
from hpcllm.controller.protocol import CacheEntry, Heartbeat, ModelSpec, NodeRegistration, Tiers, TierInfo
from hpcllm.controller.registry import Registry
from hpcllm.controller.service import Controller
from hpcllm.controller.tests import pg_server
from hpcllm.controller.tests.doubles import FakeAgents, FakeClock, RecordingBackend, checkpoint_folder

SECRET = "test-secret"
ADMIN_KEY = "test-admin-key"
GB = 10**9


def make_config(tmp_path: Path, **controller) -> Config:
    # min_residency_seconds 0: the eviction tests place a victim and evict it at the same fake instant; the
    # residency tests (test_residency.py) set it. Start costs 0 before any cold start: the estimates tests compute
    # by hand are queue + load + migration; the start cost tests (test_start_cost.py) set them.
    settings = {"admin_key": ADMIN_KEY, "database_url": f"sqlite:///{tmp_path / 'controller.db'}",
                "allocation_start_estimate_seconds": 30.0, "min_residency_seconds": 0.0,
                "start_cost_seconds": 0.0, "tensor_parallel_start_cost_seconds": 0.0, **controller}
    return parse_config({"paths": {"state_dir": str(tmp_path / "state"), "models_dir": str(tmp_path / "models")},
                         "cluster": {"shared_secret": SECRET},
                         "slurm": {"partition": "debug", "time": "01:00:00", "gpus_per_node": 2},
                         "controller": settings})


def _cache_entry(model: str, tier: str, degree: int | None = None, rank: int | None = None) -> CacheEntry:
    """(model, tier): a whole copy; (model, "nvme", N, R): rank R of a tensor_parallel = N instance's slices."""
    return CacheEntry(model=model, tier=tier, bytes=1, verified=True, tensor_parallel=degree, rank=rank)


class Harness:
    """A controller wired to test doubles, with helpers that act like node agents and admins."""

    def __init__(self, tmp_path: Path, **controller_settings):
        self.tmp_path = tmp_path
        self.clock = FakeClock()
        self.backend = RecordingBackend()
        self.agents = FakeAgents()
        self.config = make_config(tmp_path, **controller_settings)
        self._start_controller()
        self.job_ends: dict[str, float] = {}  # what a node's agent reports as its Slurm job's end (model pools)
        self.agent_processes: dict[str, str] = {}  # the process id a node's agent registered with, if any

    def _start_controller(self) -> None:
        """The controller process: its registry on the config's database, allocator, controller and autoscaler."""
        self.registry = Registry(self.config.controller.database_url)
        self.allocator = Allocator(self.config, self.registry, self.backend, "http://controller:8700",
                                   clock=self.clock)
        self.controller = Controller(self.config, self.registry, self.agents, self.allocator, clock=self.clock)
        self.autoscaler = Autoscaler(self.controller)

    def restart_controller(self) -> None:
        """The controller process restarts on the same database (same Slurm, same agents) and reconciles with the
        live agents."""
        self.registry.close()
        self._start_controller()
        self.controller.reconcile()

    def source(self, name: str, positions: int = 4096) -> Path:
        return checkpoint_folder(self.tmp_path / "models" / name, positions)

    def deploy(self, name: str, size_bytes: int = 2 * GB, **fields):
        spec = ModelSpec(name=name, source=str(self.source(name)), size_bytes=size_bytes, **fields)
        return self.controller.deploy(spec)[0]

    def register(self, node_id: str, gpus: int = 2, cached: tuple[tuple[str, str], ...] = (), job: str | None = None,
                 dram_gbps: float = 20.0, nvme_gbps: float = 4.0, sharedfs_gbps: float = 1.0,
                 nvme_scope: str = "persistent", pool_model: str | None = None,
                 agent_process: str | None = None) -> str:
        url = f"http://{node_id}:9000"
        tiers = Tiers(dram=TierInfo(capacity_bytes=64 * GB, read_gbps=dram_gbps),
                      nvme=TierInfo(capacity_bytes=1000 * GB, read_gbps=nvme_gbps, scope=nvme_scope),
                      sharedfs=TierInfo(read_gbps=sharedfs_gbps))
        self.controller.register(NodeRegistration(
            node_id=node_id, agent_url=url, slurm_job_id=job, job_scoped=job is not None, gpus=gpus, tiers=tiers,
            cached=[_cache_entry(*c) for c in cached], pool_model=pool_model, agent_process=agent_process))
        if agent_process is not None:
            self.agent_processes[node_id] = agent_process
        return url

    def heartbeat(self, node_id: str, **loading_done) -> None:
        """The node's agent reports what the fake agent runs, with its instance-list version (after finishing loads
        when asked)."""
        url = f"http://{node_id}:9000"
        if loading_done:
            instances = self.agents.finish_loading(url, **loading_done)
        else:
            instances = self.agents.list_instances(url)
        cached = [CacheEntry(model=c.model, tier=c.tier, bytes=c.bytes, verified=c.verified,
                             tensor_parallel=c.tensor_parallel, rank=c.rank)
                  for c in self.registry.cache(node_id=node_id)]
        self.controller.heartbeat(node_id, Heartbeat(cached=cached, instances=instances,
                                                     job_end=self.job_ends.get(node_id),
                                                     instances_version=self.agents.instances_version(url),
                                                     agent_process=self.agent_processes.get(node_id)))

    def tick(self, seconds: float = 0.0, heartbeats: bool = True):
        """Move the clock and run one autoscaler tick; live agents heartbeat first unless told not to."""
        self.clock.advance(seconds)
        if heartbeats:
            for node in self.registry.nodes(states=("up", "draining")):
                self.heartbeat(node.node_id)
        return self.autoscaler.tick(self.clock.now)

    def app_client(self):
        return create_app(self.controller).test_client()


@pytest.fixture
def harness(tmp_path) -> Harness:
    h = Harness(tmp_path)
    yield h
    h.registry.close()


@pytest.fixture
def make_harness(tmp_path):
    made = []

    def make(**settings) -> Harness:
        h = Harness(tmp_path / f"h{len(made)}", **settings)
        made.append(h)
        return h

    yield make
    for h in made:
        h.registry.close()


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server for the session (pg_server.py); skipped, with the reason, where there is no
    server or no psycopg (the optional extra `postgres`)."""
    reason = pg_server.missing_reason()
    if reason:
        if os.environ.get("CI"):  # make test installs postgresql: under CI a missing server is a failure
            pytest.fail(f"CI must run the PostgreSQL tests: {reason}", pytrace=False)
        pytest.skip(f"PostgreSQL tests need a local server: {reason}")
    with pg_server.postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """An empty controller database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'r.db'}"
    url = request.getfixturevalue("postgres_url")
    pg_server.reset_database(url)
    return url


@pytest.fixture(scope="session")
def converted_checkpoint(tmp_path_factory) -> Path:
    """A real converted checkpoint of a tiny randomly initialized Llama (made offline)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hpcllm.checkpoint import convert

    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    model.save_pretrained(root / "hf")
    convert(root / "hf", root / "tiny", progress=False)
    return root / "tiny"
