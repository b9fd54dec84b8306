"""bench/thinking_budget.py runs greedy requests with a never-spent thinking budget and without, checks their tokens
are the same and prints each round's ratio."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "thinking_budget.py"), *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_small_run_prints_both_rates_and_their_ratio():
    completed = bench("--size", "tiny", "--requests", "2", "--max-tokens", "8", "--rounds", "2")
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert len(re.findall(r"^\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+0\.0$", completed.stdout, re.M)) == 2
    assert re.search(r"budget / plain: median [\d.]+ \(range [\d.]+-[\d.]+\) over 2 rounds, 2 requests of 8 tokens",
                     completed.stdout)


def test_a_speculating_run_on_long_prompts_checks_the_same_tokens_and_says_how_it_ran():
    completed = bench("--size", "tiny", "--requests", "2", "--max-tokens", "24", "--rounds", "1", "--speculate", "3",
                      "--prompt-tokens", "600", "--model-process", "on")
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "speculating 3 tokens on 600-token prompts" in completed.stdout
    sent = re.findall(r"^\s+0\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)$", completed.stdout, re.M)
    assert len(sent) == 1 and float(sent[0]) > 0  # ids/tok: the budget's TokenStates in the model process


def test_bad_arguments_are_refused_with_what_to_fix():
    completed = bench("--rounds", "0")
    assert completed.returncode == 2 and "--rounds must be at least 1" in completed.stderr
    completed = bench("--speculate", "-1")
    assert completed.returncode == 2 and "--speculate must be 0" in completed.stderr
    completed = bench("--speculate", "4", "--prompt-tokens", "64", "--max-tokens", "64")
    assert completed.returncode == 2 and "--prompt-tokens must exceed --max-tokens" in completed.stderr
    completed = bench("--prompt-tokens", "8192")  # not ignored: it would not change the run
    assert completed.returncode == 2 and "--prompt-tokens needs --speculate K" in completed.stderr
