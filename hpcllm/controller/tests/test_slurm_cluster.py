"""The controller's Slurm-facing part against the real dev Slurm cluster (nodes n1-n4, 2 fake GPUs each).

Marked `slurm` (the root conftest starts the cluster). The node agent inside each allocation is a stand-in script
that waits until it is cancelled: these tests check what the controller asks of Slurm and what it reads back, not
the agent. Jobs are cancelled at the end of every test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcllm.config import parse_config
from hpcllm.controller.allocations import TAG_PREFIX, Allocator
from hpcllm.controller.errors import AllocationFailed, InvalidModelConfig, NoCapacity
from hpcllm.controller.protocol import DeployedModel, ModelSpec
from hpcllm.controller.registry import Registry
from hpcllm.controller.service import Controller
from hpcllm.controller.tests.doubles import FakeAgents, checkpoint_folder
from hpcllm.slurm.factory import get_backend

pytestmark = pytest.mark.slurm

WAIT_S = 120  # allocations hold their nodes whole: on the shared dev cluster they may queue behind others


def stand_in_agent(tmp_path: Path) -> Path:
    script = tmp_path / "hpcllm"
    script.write_text("#!/bin/bash\necho \"agent on $SLURMD_NODENAME: $*\"\nsleep 300 & wait\n")
    script.chmod(0o755)
    return script


def cluster_config(tmp_path: Path) -> dict:
    return {
        "paths": {"state_dir": str(tmp_path / "state")},
        "slurm": {"partition": "batch", "time": "00:10:00", "gpus_per_node": 1},
        "controller": {"database_url": f"sqlite:///{tmp_path / 'c.db'}", "agent_command": str(stand_in_agent(tmp_path))},
    }


@pytest.fixture
def cluster_controller(request, slurm_cluster, tmp_path, monkeypatch):
    """A controller on the dev cluster through the CLI backend, or slurmrestd when parametrized with "rest"."""
    settings = cluster_config(tmp_path)
    if getattr(request, "param", "cli") == "rest":
        rest = request.getfixturevalue("slurm_rest")
        monkeypatch.setenv("SLURM_JWT", rest.rest_token)
        settings["slurm"].update(backend="rest", rest_url=rest.rest_url, rest_user=rest.rest_user)
    config = parse_config(settings)
    registry = Registry(config.controller.database_url)
    backend = get_backend(config.slurm)
    allocator = Allocator(config, registry, backend, "http://127.0.0.1:8700")
    controller = Controller(config, registry, FakeAgents(), allocator)
    yield controller
    for alloc in registry.allocations(active_only=True):
        backend.cancel(alloc.job_id)
    registry.close()


def wait_for_state(controller: Controller, job_id: str, state: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while controller.registry.get_allocation(job_id).state != state:
        assert time.monotonic() < deadline, controller.registry.get_allocation(job_id)
        time.sleep(0.5)
        controller.allocator.sync(time.time())


def model(tmp_path: Path, **fields) -> DeployedModel:
    source = tmp_path / "models" / "m"
    source.mkdir(parents=True, exist_ok=True)
    return DeployedModel(name="m", source=str(source), size_bytes=10**9, gpus=1, deployed_at=time.time(), **fields)


@pytest.mark.parametrize("cluster_controller", ["cli", "rest"], indirect=True)
def test_allocation_lands_on_the_preferred_node_runs_and_ends(cluster_controller, tmp_path):
    """n3 is not where Slurm puts a one-node job on an idle cluster (n1): landing there is --nodelist at work, and
    through slurmrestd v0.0.38 its "nodelist" key."""
    c = cluster_controller
    job_id = c.allocator.submit(model(tmp_path), ["n3"], time.time())
    wait_for_state(c, job_id, "running")
    alloc = c.registry.get_allocation(job_id)
    assert alloc.nodes == ["n3"]
    assert alloc.walltime_end == pytest.approx(alloc.started_at + 600, abs=5)
    c.allocator.cancel(job_id, "test", time.time())
    wait_for_state(c, job_id, "ended")
    assert c.registry.get_allocation(job_id).reason == "test"


def test_partition_is_checked_against_the_cluster(cluster_controller, tmp_path):
    c = cluster_controller
    source = checkpoint_folder(tmp_path / "models" / "m")
    with pytest.raises(InvalidModelConfig, match="unknown partition 'nope'"):
        c.deploy(ModelSpec(name="m", source=str(source), size_bytes=1, slurm={"partition": "nope"}))
    assert c.registry.models() == []
    deployed, _ = c.deploy(ModelSpec(name="m", source=str(source), size_bytes=1, slurm={"partition": "high"}))
    assert deployed.slurm.partition == "high"


def test_sbatch_refusal_is_reported_with_slurms_words_and_leaves_nothing(cluster_controller, tmp_path):
    c = cluster_controller
    with pytest.raises(AllocationFailed, match="(?i)invalid partition"):
        c.allocator.submit(model(tmp_path, slurm={"partition": "nope"}), [], time.time())
    assert c.registry.allocations() == []
    # Through the route API the same refusal is a 503 (AllocationRefused, code allocation_failed: answered at once,
    # never waited on) naming the cause.
    c.registry.put_model(model(tmp_path, slurm={"partition": "nope"}))
    with pytest.raises(NoCapacity, match="(?i)invalid partition"):
        c.route("m")
    assert c.registry.allocations() == []


def test_route_without_nodes_submits_an_allocation_that_slurm_runs(cluster_controller, tmp_path):
    c = cluster_controller
    c.registry.put_model(model(tmp_path))
    outcome = c.route("m")
    assert outcome.status == "allocating"
    wait_for_state(c, outcome.job_id, "running")
    # Until its agent registers the model keeps waiting for this allocation rather than asking for another.
    assert c.route("m").job_id == outcome.job_id
    assert len(c.registry.allocations()) == 1


# A controller process that sbatches one allocation and is killed (SIGKILL, by itself) the moment sbatch answered:
# before it could record the job.
_SUBMIT_THEN_KILL9 = """
import json, os, signal, sys, time
from hpcllm.config import parse_config
from hpcllm.controller.allocations import Allocator
from hpcllm.controller.protocol import DeployedModel
from hpcllm.controller.registry import Registry
from hpcllm.slurm.factory import get_backend
from hpcllm.slurm.cli_backend import CliBackend

config = parse_config(json.loads(sys.argv[1]))
backend = CliBackend(config.slurm, command_timeout=30)
real_submit = backend.submit

def submit_then_die(spec):
    job_id = real_submit(spec)
    print(job_id, spec.comment, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

backend.submit = submit_then_die
allocator = Allocator(config, Registry(config.controller.database_url), backend, "http://127.0.0.1:8700")
model = DeployedModel(name="m", source=sys.argv[2], size_bytes=10**9, gpus=1, deployed_at=time.time())
allocator.submit(model, ["n2"], time.time())
"""


def test_job_sbatch_accepted_just_before_a_kill_9_is_adopted_after_restart(cluster_controller, tmp_path):
    c = cluster_controller
    source = checkpoint_folder(tmp_path / "models" / "m")
    crashed = subprocess.run([sys.executable, "-c", _SUBMIT_THEN_KILL9, json.dumps(cluster_config(tmp_path)),
                              str(source)], capture_output=True, text=True, timeout=60)
    assert crashed.returncode == -9, crashed.stderr
    job_id, tag = crashed.stdout.split()
    try:
        assert tag.startswith(TAG_PREFIX)
        assert c.allocator.backend.list_jobs()[job_id].comment == tag  # Slurm has the job, tagged
        assert c.registry.allocations() == [] and [i.tag for i in c.registry.allocation_intents()] == [tag]

        c.reconcile()  # what a restarted controller does first
        [alloc] = c.registry.allocations()
        assert (alloc.job_id, alloc.model, alloc.preferred_nodes) == (job_id, "m", ["n2"])
        assert c.registry.allocation_intents() == []
        wait_for_state(c, job_id, "running")
        assert c.registry.get_allocation(job_id).nodes == ["n2"]
        # Owned again: the controller releases it like any other allocation.
        c.allocator.cancel(job_id, "idle", time.time())
        wait_for_state(c, job_id, "ended")
    finally:
        c.allocator.backend.cancel(job_id)
