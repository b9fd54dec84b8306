"""bench/replay.py's aggregation and calibration, and bench/simulate.py's check against a replay (--compare): the
parts that need no Slurm, on hand-made measurements."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from replay import calibrate, slot_seconds, summarize, table  # noqa: E402
from simulate import compare_with_replay, comparison_rows, comparison_table, relative_error  # noqa: E402
from workload import ModelInfo, Request  # noqa: E402

TINY = ModelInfo("m000-7b", 2_000_000, 0, "tiny", 1, 0.7)
SMALL = ModelInfo("m001-13b", 60_000_000, 0, "small", 2, 0.3)


def record(i, t, model, ttft, e2e, tokens=10, prompt=50, error=None):
    return {"id": i, "t": t, "model": model, "prompt_tokens": prompt, "output_tokens": tokens, "error": error,
            "ttft": ttft, "e2e": e2e, "tokens": tokens}


def test_summarize_counts_errors_as_lost_and_keeps_them_out_of_the_latencies():
    records = [record(0, 0.0, TINY.name, 20.0, 21.0), record(1, 1.0, TINY.name, 0.5, 1.5),
               record(2, 2.0, TINY.name, None, None, tokens=0, error="APITimeoutError: Request timed out."),
               record(3, 3.0, SMALL.name, None, None, tokens=0, error="APITimeoutError: Request timed out.")]
    cold = [{"tier": "sharedfs"}, {"tier": "sharedfs"}, {"tier": "dram"}]
    allocations = {"7": {"submitted_at": 100.0, "started_at": 101.0, "last_running": 161.0},
                   "8": {"submitted_at": 100.0, "started_at": None, "last_running": None}}  # never started
    report = summarize("hpcllm", records, cold, allocations, gpus_per_node=2)
    assert (report["served"], report["lost"]) == (2, 2)
    assert report["errors"] == {"APITimeoutError": 2}
    assert report["ttft"]["mean"] == pytest.approx(10.25)
    assert report["ttft"]["p50"] == pytest.approx(10.25)
    assert report["e2e"]["mean"] == pytest.approx(11.25)
    assert report["cold_starts"] == {"dram": 1, "nvme": 0, "sharedfs": 2}
    assert report["slot_seconds"] == pytest.approx(120.0)  # 60 s running x 2 slots; the pending one costs nothing
    assert "hpcllm" in table([report]) and "120" in table([report])


def test_slot_seconds_only_count_allocations_seen_running():
    assert slot_seconds({"1": {"started_at": 10.0, "last_running": None}}, 1) == 0.0
    assert slot_seconds({"1": {"started_at": 10.0, "last_running": 40.0},
                         "2": {"started_at": 20.0, "last_running": 25.0}}, 1) == pytest.approx(35.0)


def test_calibration_takes_decode_rate_from_all_and_prefill_rate_from_the_fastest_quarter():
    # tiny: 9 tokens after the first in 0.9 s -> 0.1 s/token; the fastest quarter of TTFTs (0.5 s, 50 tokens)
    # gives 100 prefill tokens/s; the 30 s TTFT (a cold start) does not lower it.
    records = [record(i, float(i), TINY.name, ttft, ttft + 0.9) for i, ttft in enumerate([0.5, 0.5, 30.0, 1.0])]
    records.append(record(9, 9.0, TINY.name, None, None, tokens=0, error="APIError: x"))
    # Two cold starts waited for a new allocation (30 s and 40 s from request to ready), one found a node up.
    cold = [{"load_seconds": 8.0, "requested_at": 0.0, "ready_at": 30.0},
            {"load_seconds": 12.0, "requested_at": 0.0, "ready_at": 40.0},
            {"load_seconds": None, "requested_at": 0.0, "ready_at": 1.0}]
    allocations = {"a": {"submitted_at": 0.0, "started_at": 2.0}, "b": {"submitted_at": 0.0, "started_at": 4.0},
                   "c": {"submitted_at": 0.0, "started_at": None}}
    cal = calibrate(records, cold, allocations, {TINY.name: "tiny"})
    prefill, tpot = cal["service"]["tiny"]
    assert tpot == pytest.approx(0.1)
    assert prefill == pytest.approx(100.0)
    assert cal["instance_overhead"] == pytest.approx(10.0)
    assert cal["queue_wait"] == pytest.approx(3.0)
    assert cal["agent_start_seconds"] == pytest.approx(35.0 - 3.0 - 10.0)


def test_relative_error_and_comparison_rows():
    assert relative_error(10.0, 12.0) == pytest.approx(0.2)
    assert relative_error(0, 1.0) is None and relative_error(None, 1.0) is None
    measured = {"policy": "hpcllm", "ttft": {"mean": 2.0, "p50": 1.0, "p99": 10.0},
                "e2e": {"mean": 4.0, "p50": 3.0, "p99": 12.0}, "cold_starts": {"dram": 1, "nvme": 0, "sharedfs": 3},
                "gpu_slot_hours": 0.1, "lost": 0}
    simulated = {**measured, "ttft": {"mean": 3.0, "p50": 1.0, "p99": 5.0}, "gpu_slot_hours": 0.05, "lost": 1}
    rows = {r["metric"]: r for r in comparison_rows([measured], [simulated, {**simulated, "policy": "random"}])}
    assert rows["TTFT mean"]["error"] == pytest.approx(0.5)
    assert rows["TTFT p99"]["error"] == pytest.approx(-0.5)
    assert rows["cold starts"]["measured"] == 4 and rows["cold starts"]["error"] == 0
    assert rows["slot-seconds"]["measured"] == pytest.approx(360.0)
    assert rows["lost"]["error"] is None  # nothing measured lost: no ratio
    assert "+50%" in comparison_table([measured], [simulated])


def replay_result(requests: list[Request]) -> dict:
    """A bench/replay.py result as it writes it, with hand-made measurements."""
    reports = []
    for policy in ("hpcllm", "no-locality"):
        records = [record(r.id, r.t, r.model, 5.0, 6.0) for r in requests]
        report = summarize(policy, records, [{"tier": "sharedfs"}], {}, 1)
        report["replay_seconds"] = 100.0
        reports.append(report)
    return {"workload": {"seed": 0}, "models": [asdict(TINY), asdict(SMALL)],
            "requests": [asdict(r) for r in requests], "reports": reports,
            "calibration": {"service": {"tiny": [1000.0, 0.02], "small": [500.0, 0.05]}, "instance_overhead": 5.0,
                            "queue_wait": 2.0},
            "walltime": "00:30:00", "drain": 120.0, "max_instances": 2}


def test_compare_simulates_the_replayed_trace_at_dev_cluster_size():
    requests = [Request(0, 0.0, TINY.name, 50, 10), Request(1, 30.0, TINY.name, 50, 10),
                Request(2, 40.0, SMALL.name, 60, 20)]
    simulated = compare_with_replay(replay_result(requests))
    assert [s["policy"] for s in simulated] == ["hpcllm", "no-locality"]
    for s in simulated:
        assert s["served"] == 3 and s["lost"] == 0
        # The first request of each model waits for an allocation (queue wait + agent start) and the instance start.
        assert s["ttft"]["p99"] > 5.0
        # Held slots count to the replay's end (100 s), on at most 4 nodes.
        assert 0 < s["gpu_slot_hours"] * 3600 <= 4 * 100.0


def test_compare_command_prints_the_table_and_refuses_a_file_that_is_not_a_result(tmp_path):
    good = tmp_path / "replay.json"
    good.write_text(json.dumps(replay_result([Request(0, 0.0, TINY.name, 50, 10)])))
    run = subprocess.run([sys.executable, str(BENCH / "simulate.py"), "--compare", str(good)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "TTFT mean" in run.stdout and "no-locality" in run.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('{"reports": []}')
    run = subprocess.run([sys.executable, str(BENCH / "simulate.py"), "--compare", str(bad)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "not a readable bench/replay.py result" in run.stderr


def test_compare_injects_the_replays_preemption_in_the_busiest_node():
    # A long request on the tiny model is running at 40 s: the preemption injected there ends its node's job, and
    # the request still finishes (resumed or live-migrated elsewhere).
    requests = [Request(0, 0.0, TINY.name, 50, 10), Request(1, 30.0, TINY.name, 50, 400)]
    result = replay_result(requests)
    preempted = {**result, "reports": [{**r, "preemption": {"node": "n1", "preemptor_job": "9", "at": 40.0}}
                                       for r in result["reports"]]}
    simulated = compare_with_replay(preempted)
    assert [s["preemptions"] for s in simulated] == [1, 1]
    assert all(s["served"] == 2 for s in simulated)
    assert [s["preemptions"] for s in compare_with_replay(result)] == [0, 0]
    # A preemption the replay could not make (no node served anything only of its own) is not simulated either.
    failed = {**result, "reports": [{**r, "preemption": {"error": "no node", "at": 89.0}} for r in result["reports"]]}
    assert [s["preemptions"] for s in compare_with_replay(failed)] == [0, 0]
