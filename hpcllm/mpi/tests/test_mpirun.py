"""The broadcast across real MPI ranks: `mpirun -n 2` on this host runs hpcllm.mpi.selfcheck."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.mpi

MPIRUN_ENV = {
    **os.environ,
    # The test machines run as root; OpenMPI refuses root without both of these.
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
}


def _mpirun(ranks: int, *args: str, mpirun_options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    command = ["mpirun", "-n", str(ranks), "--oversubscribe", *mpirun_options, sys.executable, "-m",
               "hpcllm.mpi.selfcheck", *args]
    return subprocess.run(command, env=MPIRUN_ENV, capture_output=True, text=True, timeout=120)


def test_two_ranks_receive_identical_bytes(tmp_path):
    source = tmp_path / "model.bin"
    data = os.urandom(3_000_001)
    source.write_bytes(data)
    dest_dir = tmp_path / "warm"
    dest_dir.mkdir()

    result = _mpirun(2, str(source), "--dest-dir", str(dest_dir), "--chunk-bytes", str(256 * 1024))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: 2 ranks" in result.stdout
    assert result.stdout.count(" ok\n") == 2
    for rank in (0, 1):
        assert (dest_dir / f"rank{rank}-model.bin").read_bytes() == data
    assert sorted(p.name for p in dest_dir.iterdir()) == ["rank0-model.bin", "rank1-model.bin"]


def test_missing_file_fails_on_every_rank_with_roots_reason(tmp_path):
    result = _mpirun(2, str(tmp_path / "absent.bin"))

    assert result.returncode != 0
    assert "error: rank 0 on" in result.stderr
    assert "error: rank 1 on" in result.stderr
    assert result.stderr.count("absent.bin: No such file or directory") == 2


def test_a_rank_that_cannot_write_its_copy_fails_the_check_without_hanging(tmp_path):
    """Rank 1 cannot write its copy (a folder where it goes) while rank 0 gets the file: rank 1 exited at once and
    rank 0 waited for its report forever where the launcher does not end a job when one rank exits non-zero (srun
    without --kill-on-bad-exit; here mpirun with orte_abort_on_non_zero_status off)."""
    source = tmp_path / "model.bin"
    data = os.urandom(300_000)
    source.write_bytes(data)
    dest_dir = tmp_path / "warm"
    (dest_dir / "rank1-model.bin").mkdir(parents=True)

    result = _mpirun(2, str(source), "--dest-dir", str(dest_dir), "--chunk-bytes", str(64 * 1024),
                     mpirun_options=("--mca", "orte_abort_on_non_zero_status", "0"))

    # (mpirun's own exit status is 0 with that option, whatever its ranks return: the verdict lines tell)
    assert "error: rank 1 on" in result.stderr and "rank1-model.bin: Is a directory" in result.stderr, result.stderr
    assert "rank 1 on" in result.stdout and ": FAILED (its error above)" in result.stdout, result.stdout
    assert "FAILED: some ranks did not receive" in result.stderr
    assert (dest_dir / "rank0-model.bin").read_bytes() == data


def test_root_that_cannot_reread_the_file_says_why(tmp_path):
    """Root sent the file, then cannot read it again for the expected digest: every rank showed MISMATCH with no
    reason. Here the file lies behind a link to its folder where rank 1's copy goes (rank1-model.bin), so rank 1's
    rename replaces the link and the path no longer leads to the file."""
    folder = tmp_path / "real"
    folder.mkdir()
    (folder / "model.bin").write_bytes(os.urandom(300_000))
    (tmp_path / "rank1-model.bin").symlink_to(folder)

    result = _mpirun(2, str(tmp_path / "rank1-model.bin" / "model.bin"), "--dest-dir", str(tmp_path))

    assert result.returncode != 0
    assert "error: rank 0 on" in result.stderr and "model.bin: Not a directory" in result.stderr, result.stderr
    assert "FAILED: some ranks did not receive" in result.stderr
