"""MPI-broadcast cache warming: real ranks (mpirun locally, srun --mpi=pmix on the dev Slurm cluster)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcllm.checkpoint import read_checkpoint
from hpcllm.mpi.tests.fakes import OneRankWorld
from hpcllm.node.cache import CacheManager

pytestmark = pytest.mark.mpi

MPIRUN_ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


@pytest.fixture(scope="module")
def origin(tiny_llama_dir, tmp_path_factory) -> Path:
    from hpcllm.checkpoint import convert

    out = tmp_path_factory.mktemp("mpiwarm-origin") / "tiny-llama"
    convert(tiny_llama_dir, out, partitions=2, chunk_size=16 * 1024, progress=False)
    return out


def _mpirun(ranks: int, *args: str, env: dict[str, str] = MPIRUN_ENV,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = ["mpirun", "-n", str(ranks), "--oversubscribe", sys.executable, "-m", "hpcllm.node.mpiwarm", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_two_ranks_get_identical_verified_copies(origin, tmp_path):
    result = _mpirun(2, "--source", str(origin), "--model", "llama", "--nvme-dir-template",
                     str(tmp_path / "nvme{rank}"), "--nvme-capacity-gb", "1")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "mpiwarm: ok model llama ranks 2" in result.stdout
    for rank in (0, 1):
        copy = tmp_path / f"nvme{rank}" / "llama"
        assert f"rank {rank} node" in result.stdout and f"verified {copy}" in result.stdout
        read_checkpoint(copy).verify_files()
        for part in read_checkpoint(origin).partitions:
            assert (copy / part.file).read_bytes() == part.path.read_bytes()
        [listed] = CacheManager(tmp_path / f"nvme{rank}", 10**9, 10**9, "mpiwarm-test").list()
        assert (listed.model, listed.tier, listed.verified, listed.source) == (
            "llama", "nvme", True, str(origin.resolve()))
        assert [n for n in _entries(copy.parent) if n.startswith(".") and "filling" in n] == []


def test_one_failing_rank_fails_the_job_and_leaves_nothing_anywhere(origin, tmp_path):
    (tmp_path / "ok0").mkdir()
    (tmp_path / "ok1").write_text("a file where rank 1's cache folder should be")

    result = _mpirun(2, "--source", str(origin), "--model", "llama", "--nvme-dir-template",
                     str(tmp_path / "ok{rank}" / "nvme"), "--nvme-capacity-gb", "1")

    assert result.returncode != 0
    assert "failed on 1 of 2 ranks; nothing was committed on any node" in result.stderr
    assert "rank 1 on" in result.stderr and str(tmp_path / "ok1" / "nvme") in result.stderr
    assert [n for n in _entries(tmp_path / "ok0" / "nvme") if not n.startswith(".hpcllm-cache.db")] == []


def test_missing_origin_is_reported_once_by_rank_0(tmp_path):
    result = _mpirun(2, "--source", str(tmp_path / "nowhere"), "--model", "llama", "--nvme-dir-template",
                     str(tmp_path / "nvme{rank}"), "--nvme-capacity-gb", "1")

    assert result.returncode != 0
    assert result.stderr.count("does not exist") == 1
    assert not (tmp_path / "nvme0").exists() and not (tmp_path / "nvme1").exists()


def test_a_rank_whose_node_lacks_a_variable_of_the_template_fails_the_job_naming_it(origin, tmp_path):
    """A template's $VARIABLE set on one node and not on another (node-local scratch): os.path.expandvars left it as
    it is there, so that rank cached into a folder literally named "$VARIABLE" under the job's current folder (the
    shared FS) and the job succeeded. That rank now fails like any other, naming the variable; nothing is committed.
    ({rank} stands in for the node here: rank 1's variable is the one not set.)"""
    from hpcllm.slurm.templates import REPO_ROOT

    # run from tmp_path (where such a folder would appear): the ranks import hpcllm from this checkout all the same
    env = {**MPIRUN_ENV, "HPCLLM_TEST_SCRATCH_0": str(tmp_path / "scratch0"), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HPCLLM_TEST_SCRATCH_1", None)

    result = _mpirun(2, "--source", str(origin), "--model", "llama", "--nvme-dir-template",
                     "$HPCLLM_TEST_SCRATCH_{rank}/nvme", "--nvme-capacity-gb", "1", env=env, cwd=tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed on 1 of 2 ranks; nothing was committed on any node" in result.stderr, result.stderr
    assert "rank 1 on" in result.stderr and "uses $HPCLLM_TEST_SCRATCH_1, which is not set" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any("$" in p.name for p in tmp_path.rglob("*"))
    assert [n for n in _entries(tmp_path / "scratch0" / "nvme") if not n.startswith(".hpcllm-cache.db")] == []


@pytest.mark.slurm
def test_cache_warm_mpi_to_four_dev_cluster_nodes(origin, tmp_path, slurm_cluster):
    config = tmp_path / "hpcllm.toml"
    config.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n[node]\nnvme_capacity_gb = 1.0\n')
    template = str(tmp_path / "nvme" / "{node}")

    result = subprocess.run(
        [sys.executable, "-m", "hpcllm.cli.main", "cache", "warm", "llama", "--nodes", "n[1-4]", "--mpi",
         "--source", str(origin), "--nvme-dir-template", template, "--config", str(config), "--timeout", "240",
         "--log-dir", str(tmp_path / "logs")],
        env=slurm_cluster.env, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stdout + result.stderr
    for node in ("n1", "n2", "n3", "n4"):
        assert f"{node}: llama verified in {tmp_path / 'nvme' / node / 'llama'}" in result.stdout
        [copy] = CacheManager(tmp_path / "nvme" / node, 10**9, 10**9, "mpiwarm-test").list()
        assert (copy.model, copy.verified) == ("llama", True)
        read_checkpoint(copy.path).verify_files()
    assert "ok model llama ranks 4" in result.stdout


def test_a_rank_whose_disk_fails_to_sync_reports_it_and_keeps_to_the_collectives(origin, tmp_path, monkeypatch,
                                                                                  capsys):
    """fsync failing (EIO from a failing NVMe disk) after a data file was written raised OSError out of the rank:
    it left the job's collectives, so every other rank waited forever in the next broadcast. It is that rank's
    failure like any other: reported naming the rank, nothing committed."""
    import errno

    from hpcllm.node import mpiwarm

    def failing_fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(mpiwarm.os, "fsync", failing_fsync)
    status = mpiwarm.warm(origin, "llama", str(tmp_path / "nvme"), 1 << 30, comm=OneRankWorld())

    assert status == 1
    stderr = capsys.readouterr().err
    assert "failed on 1 of 1 ranks; nothing was committed" in stderr and "Input/output error" in stderr, stderr
    assert [n for n in _entries(tmp_path / "nvme") if not n.startswith(".hpcllm-cache.db")] == []


def test_a_write_error_without_errno_is_reported_with_its_text(origin, tmp_path, monkeypatch, capsys):
    """An OSError raised without an errno (a filesystem layer's own message) has strerror None: the rank's failure
    read 'cannot write ...: None'. Its text is reported instead."""
    from hpcllm.node import mpiwarm

    def failing_fsync(fd):
        raise OSError("the NVMe controller was reset")

    monkeypatch.setattr(mpiwarm.os, "fsync", failing_fsync)
    status = mpiwarm.warm(origin, "llama", str(tmp_path / "nvme"), 1 << 30, comm=OneRankWorld())

    assert status == 1
    stderr = capsys.readouterr().err
    assert "the NVMe controller was reset" in stderr and ": None" not in stderr, stderr


def test_without_mpi4py_the_warm_says_what_to_install(origin, tmp_path):
    """warm() imported mpi4py itself before asking hpcllm.mpi for the communicator: a node without it got an
    ImportError traceback instead of the error naming the fix."""
    hidden = tmp_path / "no-mpi4py" / "mpi4py"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named mpi4py')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden.parent), os.environ.get("PYTHONPATH", "")])}

    result = subprocess.run([sys.executable, "-m", "hpcllm.node.mpiwarm", "--source", str(origin), "--model", "llama",
                             "--nvme-dir-template", str(tmp_path / "nvme"), "--nvme-capacity-gb", "1"],
                            env=env, capture_output=True, text=True, timeout=120)

    assert result.returncode == 1
    assert "error: MPI is unavailable" in result.stderr and "pip install" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
