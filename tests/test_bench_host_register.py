"""bench/host_register.py (gpu_check.sh's register step) on a machine without a GPU: it says why it did not run, and
refuses bad arguments with a one-line error instead of a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "host_register.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""})


def test_without_cuda_it_is_skipped_saying_why_and_leaves_no_file(tmp_path):
    completed = _run("--dir", str(tmp_path), "--gib", "0.01")

    assert completed.returncode == 0, completed.stderr
    assert "skipped: torch sees no CUDA device" in completed.stdout
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_refused_in_one_line(tmp_path):
    for args, message in ((["--gib", "0"], "must be positive"), (["--dir", str(tmp_path / "missing")], "is not a folder")):
        completed = _run(*args)
        assert completed.returncode == 2 and message in completed.stderr
        assert "Traceback" not in completed.stderr
