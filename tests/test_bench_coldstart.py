"""bench/coldstart.py: a cold start through the node agent's WorkerManager, fresh and spare, in both model-process
settings, on the tiny dev model (what the bench measures must work end to end)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import coldstart  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("model_process", ["auto", "false"])
def test_coldstart_measures_a_fresh_and_a_spare_start(model_process):
    times, loads = coldstart.measure(coldstart.checkpoint("tiny"), "nvme", 1, model_process)
    assert set(times) == {"fresh", "spare"} and all(len(runs) == 1 and runs[0] > 0 for runs in times.values())
    assert all(len(runs) == 1 for runs in loads.values())
