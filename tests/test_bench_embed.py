"""bench/embed.py runs both pooling modes on one engine and prints their rates and ratio."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_small_run_measures_both_modes_and_prints_the_ratio():
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "embed.py"), "--passages", "6", "--tokens", "8", "--rounds", "2"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 0, completed.stderr[-2000:]
    for mode in ("one-at-a-time", "batched"):
        assert re.search(rf"L=   8 {mode} +[\d.]+ embeddings/s \(range [\d.]+-[\d.]+\)", completed.stdout)
    assert re.search(r"L=   8 batched / one-at-a-time: [\d.]+x \(per round [\d.]+-[\d.]+x\)", completed.stdout)


def test_bad_arguments_are_refused_with_what_to_fix():
    completed = subprocess.run([sys.executable, str(ROOT / "bench" / "embed.py"), "--passages", "0"],
                               capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 2
    assert "--passages must be at least 1" in completed.stderr


def test_a_too_long_input_is_refused_before_any_length_is_measured():
    completed = subprocess.run([sys.executable, str(ROOT / "bench" / "embed.py"), "--passages", "2", "--rounds", "1",
                                "--tokens", "8", "100000"],
                               capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 2
    assert "--tokens 100000 is longer than the model's" in completed.stderr
    assert "L=   8" not in completed.stdout  # nothing measured first
