"""The JSON/text adapter against recorded outputs of each Slurm shape.

*_22.05.* fixtures were captured from the dev cluster (Slurm 22.05.8); the 23.02/23.11/24.05 ones are written by
hand from the documented shapes (each says so in its _comment).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hpcllm.slurm import adapter
from hpcllm.slurm.base import JobState

FIXTURES = Path(__file__).parent / "fixtures"


def load(name: str):
    path = FIXTURES / name
    return json.loads(path.read_text()) if name.endswith(".json") else path.read_text()


# ------------------------------------------------------------------------------------------------------ jobs


def test_real_22_05_squeue_json():
    jobs = adapter.jobs_from_json(load("squeue_22.05.json"))
    by_name = {s.name: s for s in jobs.values()}
    assert set(by_name) == {"cap-done", "cap-fail", "cap-run", "cap-pend", "cap-cancel"}

    done = by_name["cap-done"]
    assert done.state is JobState.COMPLETED and done.is_terminal
    assert done.nodes == ("n1", "n2")  # "n[1-2]" expanded
    assert done.exit_code == 0 and done.time_limit == 300

    failed = by_name["cap-fail"]
    assert failed.state is JobState.FAILED and failed.exit_code == 3  # wait status 768 -> exit code 3
    assert failed.reason == "NonZeroExitCode"

    running = by_name["cap-run"]
    assert running.state is JobState.RUNNING and not running.is_terminal
    assert running.nodes == ("n1",) and running.partition == "batch"
    assert running.start_time is not None and running.end_time == running.start_time + 300

    pending = by_name["cap-pend"]
    assert pending.state is JobState.PENDING and pending.reason == "Resources"
    assert pending.nodes == () and pending.start_time is None

    cancelled = by_name["cap-cancel"]
    assert cancelled.state is JobState.CANCELLED and cancelled.restart_count == 0


def test_23_02_numbers_as_objects():
    jobs = adapter.jobs_from_json(load("squeue_23.02.json"))
    running, pending, oom = jobs["201"], jobs["202"], jobs["203"]
    assert running.state is JobState.RUNNING and running.nodes == ("gpu01", "gpu02")
    assert running.start_time == 1700000000 and running.end_time == 1700003600 and running.time_limit == 3600
    assert pending.time_limit is None  # infinite
    assert pending.start_time is None  # number 0 means not yet
    assert pending.reason == "Priority"
    assert oom.state is JobState.FAILED and oom.raw_state == "OUT_OF_MEMORY"


def test_23_11_state_lists_and_flags():
    jobs = adapter.jobs_from_json(load("squeue_23.11.json"))
    assert jobs["301"].state is JobState.COMPLETING  # the COMPLETING flag wins, as in Slurm's state string
    requeued = jobs["302"]
    assert requeued.state is JobState.REQUEUED and requeued.restart_count == 1
    failed = jobs["303"]
    assert failed.state is JobState.FAILED and failed.exit_code == 3
    assert failed.nodes == ("gpu02", "gpu04", "gpu05") and failed.time_limit is None
    assert jobs["304"].state is JobState.NODE_FAIL and jobs["304"].is_terminal


def test_24_05_node_structures():
    jobs = adapter.jobs_from_json(load("squeue_24.05.json"))
    assert jobs["401"].nodes == ("gpu01", "gpu02") and jobs["401"].restart_count == 2
    assert jobs["402"].nodes == ("gpu07",)  # only job_resources.nodes.allocation names it
    assert jobs["403"].state is JobState.TIMEOUT


def test_real_22_05_squeue_text_fallback_matches_json():
    # squeue_22.05.txt was recorded on the 22.05 dev cluster with the pinned format of its day, alongside
    # squeue_22.05.json (same jobs). The JobArrayID column (10th) was added to it by hand later: each job's own id,
    # as 22.05 prints it for a job in no array (recorded then for other jobs: test_slurm_answers.py's array/het test).
    # It cannot be recorded again as it was: these jobs and their times are gone.
    text_jobs = adapter.jobs_from_squeue_text(load("squeue_22.05.txt"))
    json_jobs = {s.job_id: s for s in adapter.jobs_from_json(load("squeue_22.05.json")).values()}
    assert set(text_jobs) == set(json_jobs)
    for job_id, from_text in text_jobs.items():
        from_json = json_jobs[job_id]
        assert (from_text.state, from_text.nodes, from_text.name, from_text.time_limit, from_text.partition) == (
            from_json.state, from_json.nodes, from_json.name, from_json.time_limit, from_json.partition)
        assert from_text.start_time == from_json.start_time


def test_squeue_text_name_may_hold_the_separator():
    line = "7|RUNNING|None|n[3-4]|1700000000|1700000600|10:00|1|batch|7|odd|name|\n"
    status = adapter.jobs_from_squeue_text(line)["7"]
    assert status.name == "odd|name" and status.nodes == ("n3", "n4") and status.restart_count == 1
    assert status.time_limit == 600


def test_sacct_text_counts_requeued_runs_and_reads_states():
    text = (
        "55|REQUEUED|None|n1|1700000000|1700000100|60|0:0|batch|55|pool\n"
        "55|RUNNING|None|n2|1700000200|Unknown|60|0:0|batch|55|pool\n"
        "56|CANCELLED by 1000|None|None assigned|Unknown|1700000300|UNLIMITED|0:0|batch|56|x\n"
        "57|FAILED|NonZeroExitCode|n3|1700000000|1700000010|5|2:0|batch|57|y\n"
    )
    jobs = adapter.jobs_from_sacct_text(text)
    assert jobs["55"].state is JobState.RUNNING and jobs["55"].restart_count == 1 and jobs["55"].nodes == ("n2",)
    assert jobs["55"].end_time is None and jobs["55"].time_limit == 3600
    assert jobs["56"].state is JobState.CANCELLED and jobs["56"].nodes == () and jobs["56"].time_limit is None
    assert jobs["57"].exit_code == 2 and jobs["57"].name == "y" and jobs["57"].partition == "batch"


def test_sacct_job_name_may_hold_the_separator():
    status = adapter.jobs_from_sacct_text("7|FAILED|None|n1|1|2|60|1:0|gpu|7|my|name\n")["7"]
    assert (status.name, status.partition, status.exit_code, status.nodes) == ("my|name", "gpu", 1, ("n1",))


@pytest.mark.parametrize("exit_code", [
    9,  # 22.05: the wait status of a job killed by SIGKILL
    {"status": ["SIGNALED"], "return_code": {"set": True, "infinite": False, "number": 0},
     "signal": {"id": {"set": True, "number": 9}, "name": "KILL"}},  # 24.05
])
def test_a_job_killed_by_a_signal_reports_128_plus_the_signal(exit_code):
    status = adapter.jobs_from_json({"jobs": [{"job_id": 1, "job_state": "FAILED", "exit_code": exit_code}]})["1"]
    assert status.exit_code == 137  # as a shell reports it; not 9 (an exit code) nor 0 (success)


def test_sacct_signal_deaths_report_128_plus_the_signal():
    jobs = adapter.jobs_from_sacct_text("7|FAILED|None|n1|1|2|60|0:9|gpu|7|x\n"
                                        "8|CANCELLED by 0|None|n1|1|2|60|0:15|gpu|8|y\n")
    assert (jobs["7"].exit_code, jobs["8"].exit_code) == (137, 143)


@pytest.mark.parametrize("value, expected", [
    ("RUNNING", JobState.RUNNING),
    (["RUNNING"], JobState.RUNNING),
    (["PENDING", "REQUEUED"], JobState.REQUEUED),
    ("CONFIGURING", JobState.PENDING),
    ("R", JobState.RUNNING),
    ("CG", JobState.COMPLETING),
    ("CANCELLED by 0", JobState.CANCELLED),
    ("BOOT_FAIL", JobState.NODE_FAIL),
    ("DEADLINE", JobState.TIMEOUT),
    ("PREEMPTED", JobState.PREEMPTED),
    ("SOMETHING_NEW", JobState.UNKNOWN),
    (None, JobState.UNKNOWN),
])
def test_state_normalization(value, expected):
    assert adapter.normalize_state(value) is expected


# ----------------------------------------------------------------------------------------------------- nodes


def test_real_22_05_sinfo_json():
    nodes = {n.name: n for n in adapter.nodes_from_json(load("sinfo_22.05.json"))}
    assert sorted(nodes) == ["n1", "n2", "n3", "n4"]
    n1 = nodes["n1"]
    assert n1.state == "MIXED" and n1.available
    assert (n1.gpus_total, n1.gpus_used, n1.gpus_free) == (2, 1, 1)
    assert n1.partitions == ("batch", "high") and n1.cpus_total == 4 and n1.memory_mb == 4096
    assert all(nodes[n].gpus_total == 2 and nodes[n].gpus_used == 0 for n in ("n2", "n3", "n4"))


def test_real_22_05_scontrol_text_matches_json():
    text_nodes = {n.name: n for n in adapter.nodes_from_scontrol_text(load("scontrol_nodes_22.05.txt"))}
    json_nodes = {n.name: n for n in adapter.nodes_from_json(load("sinfo_22.05.json"))}
    assert set(text_nodes) == set(json_nodes)
    for name, node in text_nodes.items():
        other = json_nodes[name]
        assert (node.state, node.partitions, node.gpus_total, node.gpus_used, node.cpus_total, node.memory_mb) == (
            other.state, other.partitions, other.gpus_total, other.gpus_used, other.cpus_total, other.memory_mb)


def test_23_11_node_state_lists_and_typed_gres():
    nodes = {n.name: n for n in adapter.nodes_from_json(load("nodes_23.11.json"))}
    gpu01, gpu02, cpu01, mix01 = nodes["gpu01"], nodes["gpu02"], nodes["cpu01"], nodes["mix01"]
    assert (gpu01.gpus_total, gpu01.gpus_used, gpu01.features) == (4, 2, ("a100", "ib"))
    assert gpu02.state == "IDLE" and gpu02.state_flags == ("DRAIN",) and not gpu02.available
    assert gpu02.gpus_used == 0 and gpu02.reason == "bad gpu"
    assert cpu01.state == "DOWN" and not cpu01.available and cpu01.gpus_total == 0
    assert (mix01.gpus_total, mix01.gpus_used) == (3, 3)  # two GPU types; nvme is not a GPU


def test_scontrol_text_states_and_values_with_spaces():
    line = ("NodeName=g1 Arch=x86_64 CPUAlloc=2 CPUTot=8 State=IDLE+DRAIN Gres=gpu:4 GresUsed=gpu:1(IDX:0) "
            "RealMemory=1000 AllocMem=10 Partitions=a,b OS=Linux 6.1.0 #1 SMP PREEMPT Reason=fan broken [root@10:00]")
    node, g2 = adapter.nodes_from_scontrol_text(line + "\nNodeName=g2 State=DOWN* Gres=(null)\n")
    assert node.state == "IDLE" and node.state_flags == ("DRAIN",) and node.reason == "fan broken [root@10:00]"
    assert (node.gpus_total, node.gpus_used, node.partitions) == (4, 1, ("a", "b"))
    assert g2.state == "DOWN" and "NOT_RESPONDING" in g2.state_flags and g2.gpus_total == 0


@pytest.mark.parametrize("gres, count", [
    ("gpu:2", 2), ("gpu:a100:4(S:0-1)", 4), ("gpu:a100:2,gpu:v100:1", 3), ("gpu:4(IDX:0,2-3)", 4),
    ("gres/gpu=2", 2), ("gres/gpu=2,gres/gpu:a100=2", 2), ("(null)", 0), ("", 0), ("mps:100", 0), ("gpu", 1),
])
def test_count_gpus(gres, count):
    assert adapter.count_gpus(gres) == count


# ------------------------------------------------------------------------------------------------ partitions


def test_real_partitions_text_and_rest_json():
    text = {p.name: p for p in adapter.partitions_from_scontrol_text(load("scontrol_partitions_22.05.txt"))}
    rest = {p.name: p for p in adapter.partitions_from_json(load("rest_partitions_v0.0.38.json"))}
    assert set(text) == set(rest) == {"batch", "high"}
    for name in text:
        assert text[name] == rest[name]
    batch = text["batch"]
    assert batch.is_default and batch.nodes == ("n1", "n2", "n3", "n4") and batch.max_time is None
    assert (batch.priority_tier, text["high"].priority_tier, batch.total_cpus) == (1, 10, 16)


# ------------------------------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("hostlist, names", [
    ("n[1-3,7]", ["n1", "n2", "n3", "n7"]),
    ("gpu[01-02]-x,login", ["gpu01-x", "gpu02-x", "login"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("node009,node[010-011]", ["node009", "node010", "node011"]),
    ("", []),
    ("(null)", []),
    # Unreadable ranges stay as Slurm printed them (the audit's inputs): never an exception through statuses().
    ("n[a-c]", ["n[a-c]"]),
    ("n[]", ["n[]"]),
    ("n[1-2,,4],m1", ["n[1-2,,4]", "m1"]),
    # What Slurm's own hostlist refuses (hostlist.c: "Invalid range", "Too many hosts in range") is no list of names
    # either: not nothing (a job on no node), not 100,000 names.
    ("n[3-1],m1", ["n[3-1]", "m1"]),
    ("n[1-100000]", ["n[1-100000]"]),
    ("n[1-2", ["n[1-2"]),
])
def test_expand_hostlist(hostlist, names):
    assert adapter.expand_hostlist(hostlist) == names


def test_an_unreadable_hostlist_does_not_break_the_job_list(caplog):
    adapter._log_unreadable_hostlist.cache_clear()
    jobs = adapter.jobs_from_json({"jobs": [{"job_id": 1, "job_state": "RUNNING", "nodes": "n[a-b]"},
                                            {"job_id": 2, "job_state": "RUNNING", "nodes": "n[1-2]"}]})
    assert jobs["1"].nodes == ("n[a-b]",) and jobs["2"].nodes == ("n1", "n2")
    adapter.jobs_from_json({"jobs": [{"job_id": 1, "job_state": "RUNNING", "nodes": "n[a-b]"}]})
    assert sum("n[a-b]" in r.getMessage() for r in caplog.records) == 1  # logged once, not every poll


def test_json_errors_are_read_in_both_shapes():
    payload = {"errors": [{"error_code": 2000, "error": "Invalid partition name specified"},
                          {"error_number": 2015, "description": "x", "error": "Invalid account"}]}
    assert adapter.errors_from_json(payload) == ["Invalid partition name specified (error 2000)",
                                                 "Invalid account (error 2015)"]


# Captured on the dev cluster (22.05.8): jobs 11 (--comment=hpcllm-alloc-0123abcd), 12 (--comment='a|b c'), 13 (none).
SQUEUE_COMMENTS_22_05 = "11|hpcllm-alloc-0123abcd|\n12|a|b c|\n13|(null)|\n"


def test_comments_from_the_text_fallback_may_hold_the_separator():
    assert adapter.comments_from_squeue_text(SQUEUE_COMMENTS_22_05) == {"11": "hpcllm-alloc-0123abcd",
                                                                        "12": "a|b c"}


def test_comment_from_squeue_json_and_sacct_json_shapes():
    job = load("squeue_22.05.json")["jobs"][0]
    assert adapter.job_status_from_json(job).comment is None  # "" in 22.05: no comment
    assert adapter.job_status_from_json({**job, "comment": "hpcllm-alloc-1"}).comment == "hpcllm-alloc-1"
    assert adapter.job_status_from_json({**job, "comment": {"job": "hpcllm-alloc-2", "administrator": None}}
                                        ).comment == "hpcllm-alloc-2"


def test_array_and_het_aliases_from_23_02_number_objects():
    def num(n, is_set=True):
        return {"set": is_set, "infinite": False, "number": n}

    jobs = adapter.jobs_from_json({"jobs": [
        {"job_id": 501, "job_state": ["RUNNING"], "array_job_id": num(500), "array_task_id": num(4)},
        {"job_id": 511, "job_state": ["RUNNING"], "array_job_id": num(0), "array_task_id": num(0, False),
         "het_job_id": num(510), "het_job_offset": num(1)},
        {"job_id": 520, "job_state": ["PENDING"], "array_job_id": num(0), "array_task_id": num(0, False),
         "het_job_id": num(0), "het_job_offset": num(0), "array_task_string": ""},
    ]}, wanted=["500_4", "510+1", "520", "500_5", "510+0"])
    assert sorted(jobs) == ["500_4", "501", "510+1", "511", "520"]
    assert jobs["500_4"].job_id == "500_4" and jobs["510+1"].state is JobState.RUNNING


def test_hostlists_slurm_prints_read_as_the_hostlist_rule_reads_them():
    # One rule (hpcllm.slurm.hostlist): order and repeats as Slurm's; only what it refuses is read item by item.
    from hpcllm.slurm.hostlist import expand_hostlist

    for text in ("n[1,1]", "n[1-2],n[2-3]", "n[2,1],gpu[01-02]-x"):
        assert adapter.expand_hostlist(text) == expand_hostlist(text)
    assert adapter.expand_hostlist("n[1,1],n[3-1]") == ["n1", "n1", "n[3-1]"]


def test_a_node_in_a_reservation_is_not_available_for_hpcllms_jobs(monkeypatch):
    # A class's or a project's reservation (not a maintenance one): hpcllm's jobs name no reservation.
    monkeypatch.delenv("SBATCH_RESERVATION", raising=False)
    (text,) = adapter.nodes_from_scontrol_text("NodeName=n5 State=IDLE+RESERVED CPUTot=8 Gres=gpu:2\n")
    json_node = adapter.node_from_json({"name": "n5", "state": "idle", "state_flags": ["RESERVED"], "gres": "gpu:2"})
    assert not text.available and not json_node.available


def test_where_the_service_runs_in_a_reservation_only_that_reservations_nodes_are_available(monkeypatch):
    # The site gives the service its own reservation (SBATCH_RESERVATION, which sbatch reads): its nodes (as the
    # backend read them: NodeInfo.reservations) are the ones to place on. A node another reservation holds (a class's)
    # is RESERVED too but takes none of the service's jobs, and neither does one in no reservation.
    monkeypatch.setenv("SBATCH_RESERVATION", "hpcllm")
    (text,) = adapter.nodes_from_scontrol_text("NodeName=n5 State=IDLE+RESERVED CPUTot=8 Gres=gpu:2\n")
    json_node = adapter.node_from_json({"name": "n5", "state": "idle", "state_flags": ["RESERVED"], "gres": "gpu:2"})
    assert dataclasses.replace(text, reservations=("hpcllm",)).available
    assert dataclasses.replace(json_node, reservations=("hpcllm",)).available
    assert not text.available and not json_node.available  # RESERVED by another reservation
    (free,) = adapter.nodes_from_scontrol_text("NodeName=n7 State=IDLE CPUTot=8 Gres=gpu:2\n")
    assert not free.available
    (drained,) = adapter.nodes_from_scontrol_text("NodeName=n6 State=IDLE+DRAIN+RESERVED CPUTot=8 Gres=gpu:2\n")
    assert not dataclasses.replace(drained, reservations=("hpcllm",)).available
