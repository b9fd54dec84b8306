"""bench/stream_mux.py: every way relays every line to its client, and the run prints each way against per-stream."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import stream_mux  # noqa: E402


@pytest.mark.parametrize("way", stream_mux.WAYS)
def test_each_way_delivers_every_line_and_measures_both_sides(way):
    # The clients' process reads every stream's lines to the count (it would hang, and measure() with it, on a lost
    # line; a stray line would end a stream early and leave the relay blocked on its send).
    gateway_us, worker_us = stream_mux.measure(way, streams=3, steps=50, step_s=0.0)
    assert gateway_us > 0 and worker_us > 0


def test_the_run_prints_every_way_against_per_stream():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "stream_mux.py"), "--streams", "2", "--steps", "20",
                          "--rounds", "1"], capture_output=True, text=True, timeout=120, check=True).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().split()[:1] in
            [[way] for way in stream_mux.WAYS]}
    assert set(rows) == set(stream_mux.WAYS), out
    assert rows["per-stream"][2] == "1.00x" and rows["per-stream"][4] == "1.00x", out


def test_bad_arguments_are_refused_in_one_line():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "stream_mux.py"), "--streams", "500"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--streams 1..191" in done.stderr and "Traceback" not in done.stderr
