"""bench/coldstart.py: a cold start through the node agent's WorkerManager, fresh and spare, in both model-process
settings, on the tiny dev model (what the bench measures must work end to end)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import coldstart  # noqa: E402


def check_measured(times: dict, loads: dict, runs: int) -> None:
    """What measure returned: each kind timed `runs` times, each time above 0, and as many load times."""
    assert set(times) == {"fresh", "spare"} and all(len(kind) == runs and min(kind) > 0 for kind in times.values()), \
        times
    assert set(loads) == {"fresh", "spare"} and all(len(kind) == runs for kind in loads.values()), loads


@pytest.mark.slow
def test_coldstart_measures_a_fresh_and_a_spare_start():
    """Without a model process; the default ("auto": a model process) is measured, and checked alike, by the test
    below (a measure starts a fresh and a spare worker per run: tens of seconds here)."""
    check_measured(*coldstart.measure(coldstart.checkpoint("tiny"), "nvme", 1, "false"), runs=1)


def spare_prepared(workers) -> bool:
    """What the bench waits for before a timed spare start: every spare's imports (and its model process's) done."""
    from hpcllm.worker.spare import MODEL_PROCESS_READY

    expected = ["spare worker ready", MODEL_PROCESS_READY]
    return all(all(line in sp.log_path.read_text(errors="replace") for line in expected) for sp in workers._spares)


@pytest.mark.slow
def test_no_spare_is_importing_while_a_start_is_timed(monkeypatch):
    # Round 2 runs spare then fresh: the spare start's replacement spare imported torch beside the fresh start that
    # followed, on the same cores, and the fresh time (the ratio's numerator) paid for it.
    managers, seen = [], []
    monkeypatch.setattr(coldstart, "manager", lambda *a, make=coldstart.manager: managers.append(make(*a))
                        or managers[-1])
    timed = coldstart.time_to_ready

    def time_to_ready(workers, model):
        spare = next(m for m in managers if m.config.node.spare_workers)
        seen.append(("fresh" if workers is not spare else "spare", spare_prepared(spare)))
        return timed(workers, model)

    monkeypatch.setattr(coldstart, "time_to_ready", time_to_ready)
    measured = coldstart.measure(coldstart.checkpoint("tiny"), "nvme", 2, "auto")
    assert seen == [("fresh", True), ("spare", True), ("spare", True), ("fresh", True)]
    check_measured(*measured, runs=2)


def test_zero_runs_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["coldstart.py", "--runs", "0"])
    with pytest.raises(SystemExit) as exit_:
        coldstart.main()
    assert exit_.value.code == 2 and "--runs must be at least 1" in capsys.readouterr().err
