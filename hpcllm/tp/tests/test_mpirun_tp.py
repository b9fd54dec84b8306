"""Tensor-parallel loading and serving across real MPI ranks: `mpirun -n 2` runs hpcllm.tp.selfcheck."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from hpcllm.checkpoint import read_checkpoint

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

MPIRUN_ENV = {
    **os.environ,
    # The test machines run as root; OpenMPI refuses root without both of these.
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
}


def _mpirun(ranks: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    # mpi_yield_when_idle: ranks sharing the 2 cores must not busy-wait in MPI calls.
    command = ["mpirun", "-n", str(ranks), "--oversubscribe", "--mca", "mpi_yield_when_idle", "1",
               sys.executable, "-m", "hpcllm.tp.selfcheck", *args]
    return subprocess.run(command, env=MPIRUN_ENV, capture_output=True, text=True, timeout=timeout)


def _result(completed: subprocess.CompletedProcess[str]) -> dict:
    assert completed.returncode == 0, completed.stdout + completed.stderr
    line = next(line for line in completed.stdout.splitlines() if line.startswith("result: "))
    return json.loads(line.removeprefix("result: "))


def test_two_ranks_match_the_one_rank_model_and_generate(tp_llama):
    result = _result(_mpirun(2, str(tp_llama), "--generate", "12"))

    assert result["ranks"] == 2
    assert result["max_abs_logit_diff"] < 1e-5
    assert result["tp_tokens"] == result["reference_tokens"] and len(result["tp_tokens"]) == 12
    total = read_checkpoint(tp_llama).total_bytes
    for stats in result["stats"]:
        assert 0 < stats["bytes_read"] < total and stats["strips_verified"] > 0


def _damaged_copy(tp_llama, tmp_path, name: str):
    copy = tmp_path / name
    shutil.copytree(tp_llama, copy)
    return copy


def test_a_corrupt_slice_on_rank_1_fails_every_rank_naming_rank_1(tp_llama, tmp_path):
    broken = _damaged_copy(tp_llama, tmp_path, "corrupt")
    ckpt = read_checkpoint(broken)
    entry = ckpt.tensors["model.layers.1.mlp.down_proj.weight"]  # [64, 128]: rank 1 holds columns 64..127
    with open(ckpt.partitions[entry.partition].path, "r+b") as f:
        f.seek(entry.offset + (5 * 128 + 100) * 4)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))

    started = time.monotonic()
    completed = _mpirun(2, str(tp_llama), "--path-of-rank", f"1={broken}", "--no-reference")

    assert completed.returncode != 0
    cause = "rank 1: " + str(ckpt.partitions[0].path) + ": tensor model.layers.1.mlp.down_proj.weight strip 50/64 " \
                                                        "along dim 1 is corrupt"
    assert "error: rank 0 on" in completed.stderr and "error: rank 1 on" in completed.stderr
    assert completed.stderr.count(cause) == 2, completed.stderr  # both ranks name rank 1 and the cause
    assert "result:" not in completed.stdout
    assert time.monotonic() - started < 120


def test_a_missing_data_file_on_rank_1_is_named(tp_llama, tmp_path):
    broken = _damaged_copy(tp_llama, tmp_path, "missing")
    (broken / "data-00000.h5").unlink()

    completed = _mpirun(2, str(tp_llama), "--path-of-rank", f"1={broken}", "--no-reference")

    assert completed.returncode != 0
    assert completed.stderr.count(f"rank 1: {broken / 'data-00000.h5'}: data file is missing") == 2, \
        completed.stderr


def test_rank_1_out_of_memory_is_named(wide_llama):
    completed = _mpirun(2, str(wide_llama), "--memory-limit-rank", "1", "--memory-limit-mb", "24", "--no-reference")

    assert completed.returncode != 0
    assert completed.stderr.count("rank 1: out of memory (Unable to allocate") == 2, completed.stderr


def test_a_rank_stuck_in_a_read_is_named_and_the_job_aborted(tp_llama, tmp_path):
    stuck = _damaged_copy(tp_llama, tmp_path, "stuck")
    (stuck / "data-00000.h5").unlink()
    os.mkfifo(stuck / "data-00000.h5")  # opening it blocks forever, like a hung network filesystem

    started = time.monotonic()
    completed = _mpirun(2, str(tp_llama), "--path-of-rank", f"1={stuck}", "--timeout", "5", "--no-reference")

    assert completed.returncode != 0
    assert "rank 0: rank(s) 1 did not report within 5 s while loading the model shard" in \
        completed.stdout + completed.stderr
    assert "MPI_ABORT was invoked on rank 0" in completed.stderr
    assert time.monotonic() - started < 150
