"""MPI under Slurm: `srun --mpi=pmix -N2 -n2` across two fake nodes of the dev cluster broadcasts a file."""

from __future__ import annotations

import os
import sys

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]


def test_srun_pmix_broadcast_across_two_nodes(slurm_cluster, tmp_path):
    source = tmp_path / "model.bin"
    data = os.urandom(2_000_003)
    source.write_bytes(data)
    dest_dir = tmp_path / "warm"
    dest_dir.mkdir()

    # Debian's OpenMPI has no PMI-1/2 client: pmix is the plugin that works.
    result = slurm_cluster.run(
        "srun", "--mpi=pmix", "-N2", "-n2", "--ntasks-per-node=1",
        sys.executable, "-m", "hpcllm.mpi.selfcheck", str(source),
        "--dest-dir", str(dest_dir), "--chunk-bytes", str(128 * 1024),
        timeout=120, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: 2 ranks on 2 node(s)" in result.stdout
    for rank in (0, 1):
        assert (dest_dir / f"rank{rank}-model.bin").read_bytes() == data
