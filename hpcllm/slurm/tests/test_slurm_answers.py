"""What Slurm 22.05 answers in cases the other backend tests leave out, recorded on the dev cluster, and what hpcllm
makes of it (stand-in commands, no cluster needed)."""

from __future__ import annotations

import os
import signal

import pytest

from hpcllm.config import SlurmConfig
from hpcllm.procs import pid_alive
from hpcllm.slurm.base import make_job_spec
from hpcllm.slurm.cli_backend import CliBackend
from hpcllm.slurm.errors import SlurmError, SlurmUnavailable
from hpcllm.slurm.tests.fake_slurm import FakeSlurm


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeSlurm:
    fake = FakeSlurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", fake.path_env())
    yield fake
    for pid in fake.lingering():
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def backend() -> CliBackend:
    return CliBackend(SlurmConfig(), command_timeout=10)


def test_a_job_refused_because_every_node_was_left_out_says_which_nodes_it_left_out(fake, backend):
    # 22.05, `sbatch --exclude=n[1-4]` on a partition of n[1-4] (the controller leaves out the nodes where its agents
    # run): the words Slurm also uses for more GPUs per node than the partition has.
    stderr = "sbatch: error: Batch job submission failed: Requested node configuration is not available\n"
    fake.on("sbatch", "", stderr=stderr, rc=1)
    spec = make_job_spec(name="t", script="true", partition="batch", gpus_per_node=1,
                         exclude=("n1", "n2", "n3", "n4"))
    with pytest.raises(SlurmError) as refused:
        backend.submit(spec)
    assert not isinstance(refused.value, SlurmUnavailable)
    message = str(refused.value)
    assert message.startswith(f"sbatch --parsable failed: {stderr.strip()}")
    assert "none of nodes n1,n2,n3,n4 (--exclude" in message

    named = make_job_spec(name="t", script="true", gpus_per_node=1, nodelist=("n3",))
    with pytest.raises(SlurmError, match=r"only nodes n3 \(--nodelist\)"):
        backend.submit(named)
