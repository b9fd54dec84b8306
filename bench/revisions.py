"""Another revision's hpcllm beside this tree's, for benches that compare the two in one run (the machine's load
drifts between runs; in one run both see the same)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def export_revision(rev: str, into: Path) -> str:
    """The revision's hpcllm package under `into` (put `into` on PYTHONPATH); returns its short commit id."""
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "hpcllm"], cwd=REPO, check=True, capture_output=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return commit


def default_baseline() -> str:
    """Where this branch left main."""
    return subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout.strip()
