"""bench/priority.py runs interactive requests alone, beside a FIFO batch and beside a low-priority batch, and prints
each mode's medians and ratios to alone (the numbers are the machine's: only the table's shape is checked)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_small_run_prints_every_mode_with_its_ratio_to_alone():
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "priority.py"), "--size", "tiny", "--rounds", "1", "--interactive", "2",
         "--batch", "5", "--batch-tokens", "24", "--model-process", "off"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 0, completed.stderr[-2000:]
    number = r"\s+[\d.]+"
    assert re.search(rf"^alone{number}\s+1\.00{number}\s+1\.00\s+-$", completed.stdout, re.M), completed.stdout
    for mode in ("batch-fifo", "batch-priority"):
        assert re.search(rf"^{mode}({number}){{5}}$", completed.stdout, re.M), completed.stdout
