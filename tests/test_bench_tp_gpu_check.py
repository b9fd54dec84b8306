"""bench/tp_gpu_check.py (gpu_check.sh's NCCL step) on a machine without a GPU: what it says when it cannot run the
GPU path, and the same MPI launch and report on CPU ranks (the GPU path itself has not run: no GPU here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "tp_gpu_check.py"
sys.path.insert(0, str(ROOT / "bench"))

import tp_gpu_check  # noqa: E402


def _run(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=environment, capture_output=True, text=True,
                          timeout=timeout)


def test_without_cuda_the_check_is_skipped_saying_why():
    completed = _run(CUDA_VISIBLE_DEVICES="")

    assert completed.returncode == 0, completed.stderr
    assert "tp_gpu_check: skipped: CUDA is not available" in completed.stdout


def test_without_an_mpi_launcher_it_fails_saying_what_to_install_or_carry(tmp_path):
    completed = _run("--device", "cpu", "--workdir", str(tmp_path), PATH=str(Path(sys.executable).parent))

    assert completed.returncode == 1
    assert "not run: no MPI launcher (mpirun or mpiexec) on PATH" in completed.stdout
    assert "make gpu-wheels" in completed.stdout and "pip install mpi4py" in completed.stdout
    assert not any(tmp_path.iterdir())  # it stopped before building the model


@pytest.mark.mpi
def test_when_mpi4py_cannot_find_its_mpi_library_the_check_says_so(tmp_path):
    completed = _run("--device", "cpu", "--workdir", str(tmp_path), MPI4PY_LIBMPI=str(tmp_path / "libmpi.so.12"))

    assert completed.returncode == 1
    assert "not run: mpi4py cannot start MPI in" in completed.stdout and "make gpu-wheels" in completed.stdout


def test_one_gpu_runs_one_rank_and_says_the_two_rank_path_did_not_run(monkeypatch, capsys):
    launches = []
    monkeypatch.setattr(tp_gpu_check, "visible_gpus", lambda: 1)
    monkeypatch.setattr(tp_gpu_check, "find_mpi", lambda: ("mpirun", None))
    monkeypatch.setattr(tp_gpu_check, "build_checkpoint", lambda workdir: workdir / "ckpt")
    monkeypatch.setattr(tp_gpu_check, "run_ranks", lambda *args: launches.append(args) or 0)
    monkeypatch.setattr(sys, "argv", ["tp_gpu_check.py"])

    assert tp_gpu_check.main() == 0
    said = capsys.readouterr().out
    assert "one GPU visible" in said and "2-rank NCCL collectives need >= 2 GPUs and did NOT run" in said
    (launcher, ranks, _checkpoint, device, *_rest), = launches
    assert (launcher, ranks, device) == ("mpirun", 1, "cuda")


def test_more_ranks_than_gpus_is_refused_before_launching(monkeypatch, capsys):
    monkeypatch.setattr(tp_gpu_check, "visible_gpus", lambda: 2)
    monkeypatch.setattr(tp_gpu_check, "find_mpi", lambda: pytest.fail("must not get as far as MPI"))
    monkeypatch.setattr(sys, "argv", ["tp_gpu_check.py", "--ranks", "4"])

    assert tp_gpu_check.main() == 1
    assert "--ranks 4 needs 4 GPUs, 2 visible" in capsys.readouterr().out


def test_tokens_that_differ_from_generate_fail_the_check(capsys):
    stats = [{"rank": r, "host": "n1", "seconds": 1.5, "bytes_read": 100, "reads": 3} for r in range(2)]
    result = {"ranks": 2, "device": "cuda:0", "stats": stats, "tp_tokens": [5, 6], "reference_tokens": [5, 7],
              "tp_tokens_per_s": 80.0, "prompt_tokens": 4, "max_abs_logit_diff": 0.3}

    assert tp_gpu_check.report(result, 10.0) == 1
    assert "FAILED: TP tokens [5, 6] != generate's [5, 7]" in capsys.readouterr().out
    assert tp_gpu_check.report({**result, "reference_tokens": [5, 6]}, 10.0) == 0


@pytest.mark.mpi
@pytest.mark.slow
def test_the_same_launch_on_two_cpu_ranks_reports_load_times_and_matches_generate(tmp_path):
    completed = _run("--device", "cpu", "--workdir", str(tmp_path), "--tokens", "6", timeout=300)

    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    header = lines.index(next(line for line in lines if line.strip().startswith("rank")))
    rows = [line.split() for line in lines[header + 1:header + 3]]
    # rank, host, imports s, load s, build s, bytes read, reads: the load timed apart from the libraries' import,
    # the model's assembly (part of the load) shown on its own
    assert [row[0] for row in rows] == ["0", "1"]
    assert all(float(row[2]) >= 0 and float(row[3]) > 0 and 0 <= float(row[4]) <= float(row[3]) and int(row[5]) > 0
               for row in rows), rows
    assert "TP greedy decode: 6 tokens at" in completed.stdout
    assert "tp_gpu_check: OK: the 2-rank tokens equal transformers' generate" in completed.stdout
