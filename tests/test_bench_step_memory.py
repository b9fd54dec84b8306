"""bench/step_memory.py runs both allocator set-ups, each in its own process, and prints their ratio."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_small_run_measures_both_modes_and_prints_the_ratio():
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "step_memory.py"), "--decodes", "3", "--context", "20", "40",
         "--prefill", "16", "--rounds", "1", "--steps", "2"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert re.search(r"round 1, default: step [\d.]+ ms", completed.stdout)
    assert re.search(r"round 1, kept: step [\d.]+ ms", completed.stdout)
    assert re.search(r"default [\d.]+ ms, kept heap [\d.]+ ms: [\d.]+x", completed.stdout)
