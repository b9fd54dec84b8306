"""bench/spec_decode.py runs a plain and a speculating engine on the same copying model and prints their ratio,
the acceptance and the tokens per step (the outputs checked equal by the bench itself)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_small_run_accepts_every_copy_proposal_and_none_where_nothing_matches():
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "spec_decode.py"), "--size", "tiny", "--rounds", "1", "--requests", "1",
         "--max-tokens", "24", "--model-process", "off", "--workloads", "copy", "none"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 0, completed.stderr[-2000:]
    copy = re.search(r"^copy\s+1\s+0\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+(\S+)\s+([\d.]+)$", completed.stdout, re.M)
    none = re.search(r"^none\s+1\s+0\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+(\S+)\s+([\d.]+)$", completed.stdout, re.M)
    assert copy and none, completed.stdout
    assert copy.group(1) == "100%" and float(copy.group(2)) > 2  # the copying model takes every proposal
    assert none.group(1) == "-" and float(none.group(2)) == 1.0  # random tokens: nothing proposed
    assert re.search(r"^copy\s+1\s+median\s+[\d.]+ \([\d.]+-[\d.]+\)$", completed.stdout, re.M), completed.stdout


def test_bad_step_cost_arguments_are_refused_before_the_run():
    """--step-cost's quartiles need two reps, and its sequences a context that fits their blocks: refused up front
    (were a StatisticsError after the whole run, an IndexError or empty prompts)."""
    for args, says in ((["--rounds", "1"], "--rounds must be >= 1, and >= 2 with --step-cost"),
                       (["--context", "20"], "--context must be 21 to"),
                       (["--context", "1600"], "--context must be 21 to")):
        completed = subprocess.run([sys.executable, str(ROOT / "bench" / "spec_decode.py"), "--step-cost", *args],
                                   capture_output=True, text=True, timeout=600,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert completed.returncode == 2 and says in completed.stderr, (args, completed.stderr[-2000:])
