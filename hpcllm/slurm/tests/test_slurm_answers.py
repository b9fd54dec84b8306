"""What Slurm 22.05 answers in cases the other backend tests leave out, recorded on the dev cluster, and what hpcllm
makes of it (stand-in commands, no cluster needed)."""

from __future__ import annotations

import os
import signal

import pytest

from hpcllm.config import SlurmConfig
from hpcllm.procs import pid_alive
from hpcllm.slurm import adapter
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


def test_gpus_of_an_untyped_gres_whose_type_prints_as_null_are_counted():
    # Slurm prints the type of a GPU gres.conf gives none as "(null)" in a node's GresUsed (gres.c formats a NULL
    # type name), beside the in-use index list: "gpu:(null):0(IDX:N/A)" is a node with no GPU in use.
    line = ("NodeName=g1 Arch=x86_64 CPUAlloc=0 CPUTot=32 Gres=gpu:(null):2 GresDrain=N/A "
            "GresUsed=gpu:(null):{used} NodeAddr=g1 RealMemory=128000 AllocMem=0 State=IDLE Partitions=gpu\n")
    [idle] = adapter.nodes_from_scontrol_text(line.format(used="0(IDX:N/A)"))
    assert (idle.gpus_total, idle.gpus_used, idle.gpus_free) == (2, 0, 2)
    [busy] = adapter.nodes_from_scontrol_text(line.format(used="2(IDX:0-1)"))
    assert (busy.gpus_used, busy.gpus_free) == (2, 0)
