"""bench/host_register.py (gpu_check.sh's register step) on a machine without a GPU: it says why it did not run,
refuses bad arguments with a one-line error instead of a traceback, and its staged baseline (the loader's ring,
reader and copy engine) copies a file exactly, here through host slots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "host_register.py"
sys.path.insert(0, str(ROOT / "bench"))
import host_register  # noqa: E402


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


def test_the_staged_baseline_copies_the_whole_file_through_the_loaders_ring(tmp_path, monkeypatch):
    import torch

    from hpcllm.store.ring import HostCopyEngine, StagingRing, host_slots

    monkeypatch.setattr(host_register, "SLOT_BYTES", 64 << 10)
    path = tmp_path / "tier.bin"
    nbytes = 40 * (64 << 10) + 4096  # a last piece shorter than a slot
    host_register.write_file(path, nbytes)
    dest = torch.zeros(nbytes, dtype=torch.uint8)
    ring = StagingRing(host_slots(3, 64 << 10), HostCopyEngine())
    for _ in range(2):  # the ring is reused round after round, as on the GPU
        dest.zero_()
        assert host_register.staged(path, nbytes, dest, ring, threads=2)["seconds"] > 0
        assert bytes(dest.numpy()) == path.read_bytes()
