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

from calibration import calibrate, fit_decode, fit_start_capacity  # noqa: E402
from replay import plot, slot_seconds, summarize, table  # noqa: E402
from simulate import compare_with_replay, comparison_rows, comparison_table, error_bound, relative_error  # noqa: E402
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


def measurements(records, cold, allocations, agents_seen, t0=1000.0):
    return {"records": records, "cold_starts": cold, "allocations": allocations, "agents_seen": agents_seen,
            "t0_epoch": t0}


def test_calibration_measures_each_step_of_a_cold_start_and_the_service_rates():
    t0 = 1000.0
    # Allocation a: queued 2 s, its agent up 12 s after the job started; b: 4 s and 20 s; c never started.
    allocations = {"a": {"submitted_at": t0, "started_at": t0 + 2}, "b": {"submitted_at": t0, "started_at": t0 + 4},
                   "c": {"submitted_at": t0, "started_at": None}}
    agents_seen = {"a": t0 + 14, "b": t0 + 24}
    # Cold starts on registered agents: 30 s (1 s of it loading the weights) and 10 s, one after the other.
    cold = [{"model": TINY.name, "requested_at": t0 + 14, "ready_at": t0 + 44, "load_seconds": 1.0},
            {"model": TINY.name, "requested_at": t0 + 50, "ready_at": t0 + 60, "load_seconds": None}]
    # Requests: two waited for the cold start (arrived before the instance was ready at 44 s), two did not; the
    # warm ones prefilled 50 tokens in 0.5 s (100 tokens/s). Each decodes 9 tokens after the first.
    records = [record(0, 0.0, TINY.name, 44.0, 44.9), record(1, 10.0, TINY.name, 34.0, 34.9),
               record(2, 50.0, TINY.name, 0.5, 1.4), record(3, 70.0, TINY.name, 0.5, 1.4),
               record(4, 80.0, TINY.name, None, None, tokens=0, error="APIError: x")]
    cal = calibrate({"hpcllm": measurements(records, cold, allocations, agents_seen, t0)}, {TINY.name: "tiny"})
    assert cal["queue_waits"] == [2.0, 4.0]
    assert cal["agent_starts"] == [12.0, 20.0]
    assert cal["instance_starts"] == [10.0, 29.0]  # less the weights' load
    tiny = cal["service"]["tiny"]
    assert tiny["prefill_tokens_per_second"] == pytest.approx(100.0)  # the cold-start waits do not lower it
    assert tiny["decode"]["base"] == pytest.approx(0.1)
    # A replay that did not record the cold-start phases is refused with what to do.
    with pytest.raises(ValueError, match="run it again"):
        calibrate({"hpcllm": {"records": records}}, {TINY.name: "tiny"})


def test_decode_slows_with_the_requests_decoding_beside_it():
    # 10 ms per token alone, +5 ms per other request decoding on the host.
    fit = fit_decode([(n, 0.010 + 0.005 * (n - 1)) for n in (1, 2, 4, 8)])
    assert fit["base"] == pytest.approx(0.010) and fit["per_request"] == pytest.approx(0.005)
    assert fit_decode([(3.0, 0.02), (3.0, 0.04)])["per_request"] == 0.0  # n never varied: a flat median


def test_start_capacity_explains_starts_slowed_by_each_other():
    # Each start takes 10 s alone; the host runs 2 at full pace: 4 at once take 20 s each, 1 alone 10 s.
    capacity, alone = fit_start_capacity([(20.0, 4.0)] * 4 + [(10.0, 1.0), (10.0, 2.0)])
    assert capacity == pytest.approx(2.0, abs=0.06)
    assert alone == pytest.approx([10.0] * 6, rel=0.03)


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
    assert error_bound([measured], [simulated])["TTFT mean"] == pytest.approx(0.5)


def replay_result(requests: list[Request]) -> dict:
    """A bench/replay.py result as it writes it, with hand-made measurements."""
    t0 = 1000.0
    reports, raw = [], {}
    for policy in ("hpcllm", "no-locality"):
        records = [record(r.id, r.t, r.model, 5.0, 6.0) for r in requests]
        report = summarize(policy, records, [{"tier": "sharedfs"}], {}, 1)
        report["replay_seconds"] = 100.0
        reports.append(report)
        raw[policy] = measurements(
            records, [{"model": TINY.name, "requested_at": t0 + 3, "ready_at": t0 + 8, "load_seconds": 0.5}],
            {"1": {"submitted_at": t0, "started_at": t0 + 1}}, {"1": t0 + 3}, t0)
    return {"workload": {"seed": 0}, "models": [asdict(TINY), asdict(SMALL)],
            "requests": [asdict(r) for r in requests], "reports": reports, "raw": raw,
            "walltime": "00:30:00", "drain": 120.0, "max_instances": 2}


def test_compare_simulates_the_replayed_trace_at_dev_cluster_size():
    requests = [Request(0, 0.0, TINY.name, 50, 10), Request(1, 30.0, TINY.name, 50, 10),
                Request(2, 40.0, SMALL.name, 60, 20)]
    simulated = compare_with_replay(replay_result(requests))
    assert [s["policy"] for s in simulated] == ["hpcllm", "no-locality"]
    for s in simulated:
        assert s["served"] == 3 and s["lost"] == 0
        # The first request of each model waits for an allocation (1 s queue wait + 2 s agent start) and the
        # instance start (4.5 s) as measured.
        assert s["ttft"]["p99"] > 1.0 + 2.0 + 4.5
        # Held slots count to the replay's end (100 s), on at most 4 nodes.
        assert 0 < s["gpu_slot_hours"] * 3600 <= 4 * 100.0


def test_compare_command_prints_the_table_and_refuses_a_file_that_is_not_a_result(tmp_path):
    good = tmp_path / "replay.json"
    good.write_text(json.dumps(replay_result([Request(0, 0.0, TINY.name, 50, 10)])))
    command = [sys.executable, str(BENCH / "simulate.py"), "--seeds", "2", "--out", str(tmp_path), "--calibrate-from"]
    run = subprocess.run(command + [str(good)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "TTFT mean" in run.stdout and "no-locality" in run.stdout
    assert "job start to registered agent: median 2.0 s" in run.stdout  # the costs it used, printed
    written = json.loads((tmp_path / "calibration-latest.json").read_text())
    assert {r["policy"] for r in written["rows"]} == {"hpcllm", "no-locality"} and "TTFT p99" in written["error_bound"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"reports": []}')
    run = subprocess.run(command + [str(bad)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "not a usable bench/replay.py result" in run.stderr


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


def test_the_plot_has_the_cdfs_and_latency_over_time(tmp_path):
    import matplotlib.image

    reports = [{"policy": policy, "ttft_by_arrival": [[t, 0.5 + t / 10] for t in range(5)],
                "e2e_by_arrival": [[t, 1.0 + t / 10] for t in range(5)]} for policy in ("hpcllm", "per-model")]
    path = tmp_path / "replay.png"
    plot(reports, path, "two policies")
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width >= 3.5 * height  # three panels side by side: TTFT CDF, E2E CDF, TTFT over time


def test_a_run_copies_exactly_its_own_results_to_latest(tmp_path, monkeypatch):
    # Results were stamped to the second and every replay-<time>.* copied to replay-latest.*: a second run in the
    # same second overwrote the first's files, and any other file named from that stamp became a 'latest' one.
    from bench import benchkit
    from replay import write_results

    class OneSecond:
        @staticmethod
        def now():
            from datetime import datetime

            return datetime(2026, 12, 7, 11, 30, 0)

    monkeypatch.setattr(benchkit, "datetime", OneSecond)
    reports = [{"policy": "hpcllm", "ttft_by_arrival": [[0, 0.5]], "e2e_by_arrival": [[0, 1.0]]}]
    for seed in (1, 2):
        stem = benchkit.new_result_stem(tmp_path, "replay")
        (tmp_path / f"{stem.name}.notes").write_text("not a result")
        write_results(stem, {"seed": seed, "reports": reports}, "one policy")
    seeds = {p.name: json.loads(p.read_text())["seed"] for p in tmp_path.glob("replay-*.json")}
    assert seeds == {"replay-20261207-113000.json": 1, "replay-20261207-113000-2.json": 2, "replay-latest.json": 2}
    assert sorted(p.name for p in tmp_path.glob("replay-latest.*")) == ["replay-latest.json", "replay-latest.png"]
