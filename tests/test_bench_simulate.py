"""bench/simulate.py: the simulation drives the real controller, so each policy's configuration must show the
behaviour it stands for (small clusters, hand-made traces; seconds each)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from simulate import SimParams, Simulation  # noqa: E402
from workload import ModelInfo, Request  # noqa: E402

GB = 10**9
SMALL = ModelInfo("m000-7b", int(13.5 * GB), 1, "7b", 1, 0.5)
OTHER = ModelInfo("m001-7b", int(13.5 * GB), 1, "7b", 2, 0.5)


def run(policy, requests, tmp_path, models=(SMALL, OTHER), **params):
    settings = {"nodes": 4, "queue_wait": 30.0, "preempt_rate": 0.0, "tail": 600.0, **params}
    sim = Simulation(policy, list(models), requests, SimParams(**settings), tmp_path / policy)
    try:
        return sim.run()
    finally:
        sim.registry.close()


def spaced(model, times, prompt=500, output=50):
    return [Request(i, t, model.name, prompt, output) for i, t in enumerate(times)]


def test_a_model_back_after_scale_to_zero_loads_from_the_node_cache_unless_locality_is_off(tmp_path):
    # Requests 20 minutes apart: the instance (keep-alive 300 s) and the allocation (600 s) are gone in between,
    # the second cold start is on a new allocation. hpcllm asks for the node whose NVMe holds the checkpoint.
    requests = spaced(SMALL, [0.0, 1200.0])
    hpcllm = run("hpcllm", requests, tmp_path)
    blind = run("no-locality", requests, tmp_path)
    assert hpcllm["served"] == blind["served"] == 2
    assert hpcllm["cold_starts"] == {"dram": 0, "nvme": 1, "sharedfs": 1}
    assert blind["cold_starts"] == {"dram": 0, "nvme": 0, "sharedfs": 2}
    assert blind["ttft"]["mean"] > hpcllm["ttft"]["mean"]


def test_per_model_keeps_an_allocation_per_model_alive_and_pays_for_it(tmp_path):
    # A long idle gap (both allocations released after their keep-alive under hpcllm, held under per-model) makes
    # the cost difference: with 1500 s it rested on hpcllm packing both first instances onto one allocation, which
    # placement's tie-break by node name did only while Slurm happened to start the second job on the first node.
    requests = sorted(spaced(SMALL, [0.0, 3000.0]) + spaced(OTHER, [10.0, 3010.0]), key=lambda r: r.t)
    requests = [Request(i, r.t, r.model, r.prompt_tokens, r.output_tokens) for i, r in enumerate(requests)]
    shared = run("hpcllm", requests, tmp_path)
    per_model = run("per-model", requests, tmp_path)
    assert per_model["allocations"] == 2  # one each, never released
    assert per_model["gpu_slot_hours"] > 1.5 * shared["gpu_slot_hours"]
    assert per_model["ttft"]["p50"] < shared["ttft"]["p50"]  # the second requests find their instance warm


def test_preemption_live_migrates_with_migrate_and_restarts_with_restart(tmp_path):
    # A steady stream on one model at a high preemption rate; one GPU per node, so its two instances run on two
    # allocations and a preempted one has a target on the other.
    requests = spaced(SMALL, [i * 0.5 for i in range(1200)], prompt=2000, output=400)
    params = {"preempt_rate": 20.0, "max_instances": 2, "seed": 2, "tail": 300.0, "gpus_per_node": 1}
    migrate = run("hpcllm", requests, tmp_path, models=(SMALL,), **params)
    restart = run("restart", requests, tmp_path, models=(SMALL,), **params)
    assert migrate["preemptions"] > 0 and restart["preemptions"] > 0
    assert migrate["live_migrated_on_preemption"] > 0
    assert restart["live_migrated_on_preemption"] == 0 and restart["resumed_requests"] > 0
    assert restart["resumed_requests"] > migrate["resumed_requests"]


def test_same_inputs_same_report(tmp_path):
    requests = spaced(SMALL, [0.0, 5.0, 400.0, 401.0])
    first, second = run("random", requests, tmp_path / "a"), run("random", requests, tmp_path / "b")
    for report in (first, second):
        report.pop("wall_seconds"), report.pop("cpu_seconds")
    assert first == second


def test_a_requeued_allocation_queues_again_and_its_requests_resume(tmp_path):
    # A long request runs on an allocation that Slurm requeues (as `scontrol requeue`): the agent goes, the job keeps
    # its id and starts again after a new queue wait; the controller sees it pending then running; the request
    # resumes from its tokens and finishes; the first run's held time still counts.
    requests = spaced(SMALL, [0.0], prompt=500, output=3000)
    sim = Simulation("hpcllm", [SMALL], requests, SimParams(nodes=2, queue_wait=10.0, preempt_rate=0.0, tail=600.0),
                     tmp_path / "requeue")
    try:
        def requeue_the_running_job():
            (job,) = [j for j in sim.slurm.jobs.values() if j.state.value == "RUNNING"]
            sim.slurm.requeue(job.job_id)
            assert sim.slurm.statuses([job.job_id])[job.job_id].state.value == "PENDING"

        sim.loop.at(sim.start + 60.0, requeue_the_running_job)
        report = sim.run()
        (job,) = sim.slurm.jobs.values()
        assert job.restarts == 1 and job.state.value == "RUNNING"
        assert sim.registry.get_allocation(job.job_id).state == "running"
        assert report["served"] == 1 and report["resumed_requests"] == 1
        assert report["allocations"] == 1
        assert report["gpu_slot_hours"] * 3600 > 4 * (60.0 - 10.0)  # the first run (started by 60 s) is counted
        with pytest.raises(Exception, match="unknown job"):
            sim.slurm.requeue("999")
    finally:
        sim.registry.close()


def test_instance_starts_sharing_the_host_take_longer_together(tmp_path):
    # start_capacity 1 (the dev cluster's shared cores): four models cold-starting at once each need 10 s alone, so
    # the last is ready after ~40 s; one model alone is ready after its 10 s.
    models = [ModelInfo(f"m{i:03d}-7b", 1000, 1, "7b", 1, 0.25) for i in range(4)]
    params = {"queue_wait": 0.0, "instance_start_samples": [10.0], "start_capacity": 1.0, "agent_start_samples": [1.0],
              "gpus_per_node": 4, "nodes": 1}
    together = run("hpcllm", [Request(i, 0.0, m.name, 10, 2) for i, m in enumerate(models)], tmp_path / "a",
                   models=models, **params)
    alone = run("hpcllm", [Request(0, 0.0, models[0].name, 10, 2)], tmp_path / "b", models=models, **params)
    assert alone["ttft"]["p99"] == pytest.approx(1.0 + 10.0, abs=1.5)
    assert together["ttft"]["p99"] == pytest.approx(1.0 + 40.0, abs=2.0)


def load_report(size, rows):
    return {"size": size, "rows": [{"method": m, "state": st, "gbps": g} for m, st, g in rows]}


@pytest.mark.parametrize("rows, expected", [
    # a CPU-only run: its hpcllm DRAM tier and cold disk rows
    ([("hpcllm_dram", "shm", 9.6), ("hpcllm_disk", "cold", 0.8)], {"dram": 9.6, "nvme": 0.8}),
    # a GPU run: the loads onto the GPU, which is what a simulated instance does
    ([("hpcllm_dram", "shm", 9.6), ("hpcllm_disk", "cold", 0.8), ("hpcllm_gpu_dram", "shm", 8.0),
      ("hpcllm_gpu_disk", "cold", 2.2)], {"dram": 8.0, "nvme": 2.2}),
])
def test_tier_bandwidths_come_from_a_full_size_load_run(tmp_path, rows, expected):
    import json

    from simulate import DEFAULT_BANDWIDTH, measured_inputs

    (tmp_path / "load-latest.json").write_text(json.dumps(load_report("bench", rows)))
    params = measured_inputs(SimParams(), tmp_path)
    assert params.bandwidth == {**DEFAULT_BANDWIDTH, **expected}


def test_a_quick_load_run_does_not_set_the_tier_bandwidths(tmp_path):
    # `bench/load.py --quick` (tens of MB: fixed costs, not bandwidth) writes the same load-latest.json
    import json

    from simulate import DEFAULT_BANDWIDTH, measured_inputs

    quick = load_report("small", [("hpcllm_dram", "shm", 0.4), ("hpcllm_disk", "cold", 0.05)])
    (tmp_path / "load-latest.json").write_text(json.dumps(quick))
    params = measured_inputs(SimParams(), tmp_path)
    assert params.bandwidth == DEFAULT_BANDWIDTH
    assert "not used" in params.bandwidth_source


@pytest.mark.parametrize("residency, nvme", [
    ({"max_residency_before": 0.5}, None),  # a run from before load.py left not-cold runs out of the median
    ({"max_residency_before": 0.5, "max_residency_in_median": 0.6}, None),  # no cold run at all
    ({"max_residency_before": 0.5, "max_residency_in_median": 0.0}, 3.0),  # the not-cold run left out
])
def test_a_cold_row_timed_with_the_files_in_the_page_cache_does_not_set_the_nvme_bandwidth(tmp_path, residency,
                                                                                           nvme):
    import json

    from simulate import DEFAULT_BANDWIDTH, measured_inputs

    report = load_report("bench", [("hpcllm_dram", "shm", 9.6), ("hpcllm_disk", "cold", 3.0)])
    report["rows"][1].update(residency)
    (tmp_path / "load-latest.json").write_text(json.dumps(report))
    params = measured_inputs(SimParams(), tmp_path)
    assert params.bandwidth == {**DEFAULT_BANDWIDTH, "dram": 9.6, "nvme": nvme or DEFAULT_BANDWIDTH["nvme"]}
    assert ("hpcllm_disk cold was not cold" in params.bandwidth_source) == (nvme is None)


@pytest.mark.parametrize("outcome, used", [
    ({"passed": True, "all_texts_match_uninterrupted": True, "failed_runs": []}, True),
    ({"all_texts_match_uninterrupted": True, "failed_runs": []}, True),  # written before "passed" existed
    ({"passed": False, "all_texts_match_uninterrupted": True, "failed_runs": ["live 2"]}, False),
    ({"all_texts_match_uninterrupted": False, "failed_runs": []}, False),  # a failing run from before the fix
    ({"all_texts_match_uninterrupted": True, "failed_runs": ["live 2"]}, False),
])
def test_only_a_passing_migration_run_sets_the_handover_pause(tmp_path, outcome, used):
    # A failing bench/migration.py run written to migration-latest.json before it stopped doing so was still taken
    # as the measured live-migration pause.
    import json

    from simulate import measured_inputs

    (tmp_path / "migration-latest.json").write_text(json.dumps({"median_pause_seconds": {"live": 0.25}, **outcome}))
    params = measured_inputs(SimParams(), tmp_path)
    assert (params.handover == 0.25) == used
    assert (params.handover_source == str(tmp_path / "migration-latest.json")) == used


@pytest.mark.parametrize("sweep", [["--sweep-nodes", "100,x"], ["--sweep-loads", "1,three"],
                                   ["--sweep-nodes", "0"]])
def test_a_bad_sweep_list_is_refused_before_anything_is_simulated(tmp_path, monkeypatch, capsys, sweep):
    # Before, it was parsed after the main simulations: minutes of them, then a ValueError traceback and no results.
    import simulate

    ran = []
    monkeypatch.setattr(simulate, "simulate", lambda policies, *a, **k: ran.append(policies) or [])
    monkeypatch.setattr(sys, "argv", ["simulate.py", "--sweep", *sweep, "--nodes", "2", "--models", "1",
                                      "--duration", "5", "--policies", "hpcllm", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        simulate.main()
    assert exit_.value.code == 2 and "--sweep-" in capsys.readouterr().err
    assert ran == []


class _OneSecond:
    """datetime whose now() is always the same second: two runs 'in one second'."""

    @staticmethod
    def now():
        from datetime import datetime

        return datetime(2026, 12, 7, 11, 30, 0)


def test_two_runs_in_one_second_keep_both_results(tmp_path, monkeypatch):
    # simulate-<time>.json was stamped to the second: a second run in the same second overwrote the first's.
    import json

    import simulate
    from bench import benchkit

    monkeypatch.setattr(benchkit, "datetime", _OneSecond)
    argv = ["simulate.py", "--models", "2", "--rate", "0.05", "--duration", "60", "--nodes", "2",
            "--gpus-per-node", "1", "--policies", "hpcllm", "--jobs", "1", "--out", str(tmp_path)]
    for seed in ("1", "2"):
        monkeypatch.setattr(sys, "argv", argv + ["--seed", seed])
        assert simulate.main() == 0
    results = tmp_path.glob("simulate-20261207-113000*.json")
    assert sorted(json.loads(p.read_text())["workload"]["seed"] for p in results) == [1, 2]
    assert json.loads((tmp_path / "simulate-latest.json").read_text())["workload"]["seed"] == 2
    assert len(list(tmp_path.glob("simulate-20261207-113000*.png"))) == 2
