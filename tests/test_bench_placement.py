"""bench/placement.py: the speed-up it prints compares the fast path with the baselines on the same decisions, and
bad arguments get one line, not a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import placement  # noqa: E402


def test_the_speed_up_compares_the_fast_path_on_the_baselines_decisions(monkeypatch, capsys):
    # Stand-in times per decision (the answers are the real ones): the fast path takes 1 ms on the baselines' 10
    # decisions and 0.001 ms on the 30 the baselines never run; the baselines take 10 ms. The same decisions make
    # 10x; a median over all 40 fast decisions against the baselines' 10 made 10000x.
    calls = []

    def timed(fn, queries):
        calls.append(len(queries))
        answers = [fn(model, slots) for model, slots in queries]
        if len(calls) == 2:  # after the warm-up: the fast path, on every decision
            return [1.0 if i < 10 else 0.001 for i in range(len(queries))], answers
        return [10.0] * len(queries), answers

    monkeypatch.setattr(placement, "timed", timed)
    monkeypatch.setattr(sys, "argv", ["placement.py", "--nodes", "50", "--models", "5", "--decisions", "40",
                                      "--baseline-decisions", "10"])
    placement.main()
    out = capsys.readouterr().out
    assert calls[1:] == [40, 10, 10]
    assert "speed-up vs naive: 10.0x; vs loop: 10.0x" in out
    assert "same node chosen by all three: True (10 decisions compared)" in out


@pytest.mark.parametrize("argv", [["--decisions", "1"], ["--decisions", "100", "--baseline-decisions", "300"],
                                  ["--decisions", "0"], ["--nodes", "0"]])
def test_bad_arguments_get_one_line(monkeypatch, capsys, argv):
    monkeypatch.setattr(sys, "argv", ["placement.py", "--models", "3", *argv])
    with pytest.raises(SystemExit) as exit_:
        placement.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "must be" in err.splitlines()[-1]
