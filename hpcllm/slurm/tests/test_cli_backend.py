"""CLI backend against stand-in Slurm commands (no cluster needed): what it runs, how it parses, how it fails."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from pathlib import Path

import pytest

from hpcllm.config import SlurmConfig
from hpcllm.procs import pid_alive
from hpcllm.slurm.base import JobState, make_job_spec
from hpcllm.slurm.factory import get_backend
from hpcllm.slurm.cli_backend import SACCT_UNREACHABLE_GRACE_SECONDS, CliBackend, parse_parsable
from hpcllm.slurm.errors import SlurmError, SlurmUnavailable
from hpcllm.slurm.templates import render_batch_script, sbatch_directives
from hpcllm.slurm.tests.fake_slurm import FakeSlurm

FIXTURES = Path(__file__).parent / "fixtures"
ACCOUNTING_OFF = "Slurm accounting storage is disabled\n"


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeSlurm:
    fake = FakeSlurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", fake.path_env())
    yield fake
    for pid in fake.lingering():  # what a test's commands left in the background
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def backend() -> CliBackend:
    return CliBackend(SlurmConfig(), command_timeout=10)


@pytest.mark.parametrize("stdout, job_id", [
    ("1234\n", "1234"),
    ("1234;hpcllm-dev\n", "1234"),
    ("sbatch: warning: something\n99;c\n\n", "99"),
    ("123\nNOTICE: your project has 10 hours left\n", "123"),  # a site wrapper's notice after the id
    ("Submitted batch job 123\n", "123"),  # a site wrapper that drops --parsable
    ("Submitted batch job 124 on cluster c2\n", "124"),
    ("  \n 42;c2 \n", "42"),
])
def test_parse_parsable(stdout, job_id):
    assert parse_parsable(stdout) == job_id


@pytest.mark.parametrize("stdout", ["", "NOTICE: your project has 10 hours left\n", "123+0\n"])
def test_submitted_without_a_readable_id_is_a_lost_answer_not_a_refusal(stdout):
    # SlurmUnavailable: the controller keeps the allocation intent and adopts the job by its comment, where a
    # SlurmError would drop it as "refused: nothing was submitted" and leave the job running untracked.
    with pytest.raises(SlurmUnavailable, match="succeeded but printed no job id"):
        parse_parsable(stdout)


def test_submit_reads_the_id_before_a_site_notice(fake, backend):
    fake.on("sbatch", "--parsable", stdout="123\nNOTICE: your project has 10 hours left\n")
    assert backend.submit(make_job_spec(name="t", script="true")) == "123"


def test_sbatchs_warnings_on_an_accepted_job_reach_the_log(fake, backend, caplog):
    # Exit 0, and the job is not quite what was asked for: the admin has to be able to see why.
    warning = ("sbatch: warning: can't honor --ntasks-per-node set to 2 which doesn't match the requested tasks 1 "
               "with the number of requested nodes 1. Ignoring --ntasks-per-node.\n")
    fake.on("sbatch", "--parsable", stdout="88\n", stderr=warning)
    with caplog.at_level(logging.WARNING, logger="hpcllm.slurm.cli_backend"):
        assert backend.submit(make_job_spec(name="t", script="true")) == "88"
    accepted = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sbatch accepted")]
    assert accepted == [f"sbatch accepted job 88 (t) with: {warning.strip()}"]


def test_a_killed_sbatch_is_a_lost_answer_not_a_refusal(tmp_path, monkeypatch, backend):
    # Killed after sending the job (the OOM killer, a site wrapper's CPU limit): the job may exist, so the
    # controller must keep its intent (SlurmUnavailable), not drop it as refused (SlurmError).
    (tmp_path / "sbatch").write_text("#!/bin/sh\ncat >/dev/null\nkill -KILL $$\n")
    (tmp_path / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(SlurmUnavailable, match="sbatch --parsable was killed by SIGKILL before it answered"):
        backend.submit(make_job_spec(name="t", script="true"))


def test_get_backend_default_is_cli():
    assert isinstance(get_backend(SlurmConfig()), CliBackend)


def test_submit_feeds_the_rendered_script_and_env(fake, backend):
    fake.on("sbatch", "--parsable", stdout="77;hpcllm-dev\n")
    spec = make_job_spec(name="t", script="echo hi", gpus_per_node=1, signal="USR1@60", env={"HPCLLM_X": "a,b=c"})
    assert backend.submit(spec) == "77"
    (call,) = fake.calls("sbatch")
    assert call["args"] == ["--parsable", *sbatch_directives(spec)]
    assert call["stdin"] == render_batch_script(spec)
    assert "#SBATCH --signal=B:USR1@60" in call["stdin"] and "#SBATCH --gres=gpu:1" in call["stdin"]
    assert call["env"]["HPCLLM_X"] == "a,b=c"  # reaches the job through --export=ALL


def test_a_node_agents_job_gets_only_the_variables_the_agent_needs(fake, backend, monkeypatch):
    """sbatch ran with the controller's whole environment and --export=ALL: the cluster secret, SLURM_JWT and
    anything else the service was started with reached every job (Slurm logs and may store a job's environment)."""
    from hpcllm.config import Config
    from hpcllm.slurm.templates import node_agent_job_spec

    for name, value in {"HPCLLM_SHARED_SECRET": "s3cret", "SLURM_JWT": "jwt", "AWS_SECRET_ACCESS_KEY": "aws",
                        "LC_ALL": "C.UTF-8", "SBATCH_ACCOUNT": "lab",
                        "SITE_SCRATCH": "/scratch", "SITE_LICENSE": "x", "HF_TOKEN": "hf",
                        "OMP_NUM_THREADS": "8", "VLLM_CPU_KVCACHE_SPACE": "40", "NCCL_SOCKET_IFNAME": "ib0"}.items():
        monkeypatch.setenv(name, value)
    fake.on("sbatch", "--parsable", stdout="77\n")
    config = Config.model_validate({"slurm": {"export_variables": ["SITE_SCR*"]}})
    backend.submit(node_agent_job_spec(config, hpcllm="hpcllm", env={"HPCLLM_NODE_TOKEN": "job-token"}))
    env = fake.calls("sbatch")[0]["env"]
    for kept in ("PATH", "LC_ALL", "SITE_SCRATCH", "HPCLLM_NODE_TOKEN", "SBATCH_ACCOUNT",  # sbatch reads SBATCH_*
                 "OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE", "NCCL_SOCKET_IFNAME"):  # the workers' libraries' settings
        assert kept in env, kept
    for left in ("HPCLLM_SHARED_SECRET", "SLURM_JWT", "AWS_SECRET_ACCESS_KEY", "SITE_LICENSE", "HF_TOKEN"):
        assert left not in env, left
    # Any other job (JobSpec.inherit unset) still gets the submitter's environment, as sbatch's --export=ALL does.
    backend.submit(make_job_spec(name="t", script="true"))
    assert fake.calls("sbatch")[1]["env"]["SITE_LICENSE"] == "x"


def test_users_scancel_settings_cannot_make_a_cancel_cancel_nothing(fake, backend, monkeypatch):
    # scancel reads SCANCEL_* as its options: with these a running job would stay (exit 0, nothing said).
    for name, value in {"SCANCEL_STATE": "PENDING", "SCANCEL_NAME": "other", "SCANCEL_INTERACTIVE": "true",
                        "SCANCEL_FULL": "true"}.items():
        monkeypatch.setenv(name, value)
    fake.on("scancel", "")
    backend.cancel("42")
    backend.signal("42", "USR1")
    assert [k for call in fake.calls("scancel") for k in call["env"] if k.startswith("SCANCEL_")] == []


def test_user_format_settings_do_not_reach_the_commands(fake, backend, monkeypatch):
    for name, value in {"SQUEUE_FORMAT": "%i %garbage", "SQUEUE_FORMAT2": "JobID:3", "SINFO_FORMAT": "%N",
                        "SACCT_FORMAT": "jobid", "SLURM_TIME_FORMAT": "relative", "SQUEUE_STATES": "R"}.items():
        monkeypatch.setenv(name, value)
    fake.on("squeue", "--json", stdout=(FIXTURES / "squeue_22.05.json").read_text())
    backend.statuses(["1"])
    env = fake.calls("squeue")[0]["env"]
    assert not [k for k in env if k.startswith(("SQUEUE_", "SINFO_", "SACCT_"))]
    assert env["SLURM_TIME_FORMAT"] == "%s"


def test_statuses_use_one_squeue_call_for_many_jobs(fake, backend):
    fake.on("squeue", "--json", stdout=(FIXTURES / "squeue_22.05.json").read_text())
    fake.on("sacct", "", stderr=ACCOUNTING_OFF, rc=1)
    statuses = backend.statuses(["1", "2", "3", "4", "5", "999"])
    assert [c["command"] for c in fake.calls()] == ["squeue", "sacct"]
    assert fake.calls("squeue")[0]["args"] == ["--json", "--all", "--states=all"]
    assert statuses["1"].state is JobState.COMPLETED and statuses["3"].state is JobState.RUNNING
    gone = statuses["999"]
    assert gone.state is JobState.UNKNOWN and gone.missing and gone.is_terminal
    assert "accounting is off" in gone.reason
    # Accounting is known to be off now: sacct is not asked again.
    backend.statuses(["999"])
    assert len(fake.calls("sacct")) == 1 and len(fake.calls("squeue")) == 2


SLURMDBD_DOWN = ("sacct: error: slurm_persist_conn_open_without_init: failed to open persistent connection to "
                 "host:slurmdbd01:6819: Connection timed out\nsacct: error: Problem talking to the database: "
                 "Connection timed out\n")


def test_slurmdbd_unreachable_for_a_while_does_not_turn_accounting_off(fake, backend):
    fake.on("squeue", "--json", stdout='{"jobs": []}')
    fake.on("sacct", "", stderr=SLURMDBD_DOWN, rc=1)
    status = backend.statuses(["42"])["42"]  # not "missing, accounting is off": its end is only not known yet
    assert status.state is JobState.UNKNOWN and not status.missing and not status.is_terminal
    assert "sacct cannot reach slurmdbd" in status.reason
    fake.rules.clear()  # slurmdbd is back
    fake.on("squeue", "--json", stdout='{"jobs": []}')
    fake.on("sacct", "", stdout="42|COMPLETED|None|n1|1700000000|1700000060|10|0:0|batch|42|old\n")
    assert backend.statuses(["42"])["42"].state is JobState.COMPLETED


def test_slurmdbd_unreachable_keeps_squeues_answers_and_gives_up_on_a_purged_job_after_a_while(fake):
    # One purged job while slurmdbd is down: the running job's status still comes back (the controller's sync and
    # every watcher poll went on failing as a whole before), and the purged one is not waited on forever.
    now = [1000.0]
    backend = CliBackend(SlurmConfig(), command_timeout=10, clock=lambda: now[0])
    fake.on("squeue", "--json", stdout=json.dumps({"jobs": [{"job_id": 7, "job_state": "RUNNING", "nodes": "n1"}]}))
    fake.on("sacct", "", stderr=SLURMDBD_DOWN, rc=1)
    statuses = backend.statuses(["7", "42"])
    assert statuses["7"].state is JobState.RUNNING
    assert statuses["42"].state is JobState.UNKNOWN and not statuses["42"].is_terminal
    now[0] += SACCT_UNREACHABLE_GRACE_SECONDS - 1
    assert not backend.statuses(["7", "42"])["42"].is_terminal
    now[0] += 1
    gone = backend.statuses(["7", "42"])["42"]
    assert gone.missing and gone.is_terminal and "sacct could not tell its end" in gone.reason


def test_sacct_answers_for_jobs_squeue_forgot(fake, backend):
    fake.on("squeue", "--json", stdout='{"jobs": []}')
    fake.on("sacct", "", stdout="42|COMPLETED|None|n[1-2]|1700000000|1700000060|10|0:0|batch|42|old\n")
    status = backend.statuses(["42"])["42"]
    assert status.state is JobState.COMPLETED and status.nodes == ("n1", "n2") and not status.missing
    args = fake.calls("sacct")[0]["args"]
    assert "--jobs=42" in args and "--parsable2" in args
    assert status.name == "old" and status.partition == "batch"
    # JobName asked last: a name holding "|" then cannot shift the fields after it.
    assert [a for a in args if a.startswith("--format=")][0].endswith(",JobName")


def test_array_tasks_and_het_components_are_found_by_the_ids_users_give(fake, backend):
    # `hpcllm slurm jobs 300_2 310+1`: squeue --json lists them by number, with the array / het ids beside it
    # (22.05 shape: 0 for "not an array"; a pending array record holds its unstarted tasks in a string).
    jobs = [{"job_id": 301, "job_state": "RUNNING", "array_job_id": 300, "array_task_id": 2, "nodes": "n1"},
            {"job_id": 300, "job_state": "PENDING", "array_job_id": 300, "array_task_id": None,
             "array_task_string": "3-7:2%1"},
            {"job_id": 311, "job_state": "RUNNING", "array_job_id": 0, "het_job_id": 310, "het_job_offset": 1},
            {"job_id": 320, "job_state": "RUNNING", "array_job_id": 0, "het_job_id": 0, "het_job_offset": 0}]
    fake.on("squeue", "--json", stdout=json.dumps({"jobs": jobs}))
    fake.on("sacct", "", stderr=ACCOUNTING_OFF, rc=1)
    statuses = backend.statuses(["300_2", "300_5", "310+1", "320", "300_4"])
    assert {job_id: s.state for job_id, s in statuses.items()} == {
        "300_2": JobState.RUNNING, "300_5": JobState.PENDING, "310+1": JobState.RUNNING, "320": JobState.RUNNING,
        "300_4": JobState.UNKNOWN}
    assert statuses["300_2"].job_id == "300_2" and statuses["300_2"].nodes == ("n1",)
    assert not statuses["300_5"].missing and statuses["300_4"].missing
    assert sorted(backend.list_jobs()) == ["300", "301", "311", "320"]  # each job once


# What 22.05's squeue --json / sinfo --json print, exit status 0, while slurmctld is down (src/squeue/data.c returns
# success whatever the openapi handler found).
CONTROLLER_DOWN_JSON = {"meta": {}, "errors": [{"description": "Failed while looking for jobs", "error_number": 1007,
                                                "error": "Unable to contact slurm controller (connect failure)",
                                                "source": "slurm_load_jobs"}]}


def test_finished_array_tasks_and_het_components_are_found_in_accounting_by_their_ids(fake, backend):
    fake.on("squeue", "--json", stdout='{"jobs": []}')
    fake.on("sacct", "", stdout="301|COMPLETED|None|n1|1700000000|1700000060|10|0:0|batch|300_2|arr\n"
                                "311|FAILED|None|n2|1700000000|1700000060|10|3:0|batch|310+1|het\n")
    statuses = backend.statuses(["300_2", "310+1"])
    assert (statuses["300_2"].state, statuses["300_2"].job_id) == (JobState.COMPLETED, "300_2")
    assert (statuses["310+1"].state, statuses["310+1"].exit_code) == (JobState.FAILED, 3)
    assert "--jobs=300_2,310+1" in fake.calls("sacct")[0]["args"]


def test_json_errors_with_exit_0_are_slurm_unavailable_not_every_job_gone(fake, backend):
    fake.on("squeue", "--json", stdout=json.dumps({**CONTROLLER_DOWN_JSON, "jobs": []}))
    fake.on("sinfo", "--json", stdout=json.dumps({**CONTROLLER_DOWN_JSON, "nodes": []}))
    fake.on("sacct", "", stderr=ACCOUNTING_OFF, rc=1)
    with pytest.raises(SlurmUnavailable, match="Unable to contact slurm controller"):
        backend.statuses(["42"])  # not "42: missing, no longer listed", which ends its allocation
    with pytest.raises(SlurmUnavailable, match="Unable to contact slurm controller"):
        backend.list_jobs()  # not "no jobs", which drops the controller's unsettled submissions
    with pytest.raises(SlurmUnavailable, match="Unable to contact slurm controller"):
        backend.nodes()  # not "no nodes"


def test_json_errors_of_another_kind_use_the_text_format_for_that_call_only(fake, backend):
    # A passing failure in one --json answer (not Slurm unreachable) must not turn --json off for the process's
    # life: the text format has no comments, so list_jobs() would need a second squeue on every call thereafter.
    passing = {"meta": {}, "errors": [{"error": "Invalid user id", "error_number": 2002}]}
    fake.on("squeue", "--json", stdout=json.dumps({**passing, "jobs": []}))
    fake.on("squeue", "Comment", stdout="4|hpcllm-alloc-1\n")
    fake.on("squeue", "--Format", stdout=(FIXTURES / "squeue_22.05.txt").read_text())
    fake.on("sinfo", "--json", stdout=json.dumps({**passing, "nodes": []}))
    fake.on("scontrol", "show node", stdout="NodeName=n1 State=IDLE CPUTot=8\n")
    assert backend.list_jobs()["4"].comment == "hpcllm-alloc-1"
    assert [n.name for n in backend.nodes()] == ["n1"]
    fake.rules.clear()  # the next answers are whole
    fake.on("squeue", "--json", stdout=(FIXTURES / "squeue_22.05.json").read_text())
    fake.on("sinfo", "--json", stdout=json.dumps({"nodes": [{"name": "n2", "state": "idle"}]}))
    assert backend.list_jobs()["3"].state is JobState.RUNNING
    assert [n.name for n in backend.nodes()] == ["n2"]
    assert [c["args"][0] for c in fake.calls("squeue")][-1] == "--json"


def test_squeue_text_fallback_when_json_fails(fake, backend):
    fake.on("squeue", "--json", stderr="squeue: unrecognized option '--json'\n", rc=1)
    fake.on("squeue", "--Format", stdout=(FIXTURES / "squeue_22.05.txt").read_text())
    fake.on("sacct", "", stderr=ACCOUNTING_OFF, rc=1)
    statuses = backend.statuses(["1", "4"])
    assert statuses["1"].state is JobState.COMPLETED and statuses["1"].nodes == ("n1", "n2")
    assert statuses["4"].state is JobState.PENDING and statuses["4"].reason == "Resources"
    backend.statuses(["1"])
    assert sum("--json" in c["args"] for c in fake.calls("squeue")) == 1  # --json is not retried


def test_list_jobs_carries_comments_from_json(fake, backend):
    payload = json.loads((FIXTURES / "squeue_22.05.json").read_text())
    payload["jobs"][0]["comment"] = "hpcllm-alloc-0123abcd"
    fake.on("squeue", "--json", stdout=json.dumps(payload))
    jobs = backend.list_jobs()
    assert jobs[str(payload["jobs"][0]["job_id"])].comment == "hpcllm-alloc-0123abcd"
    assert len(fake.calls("squeue")) == 1 and sum(1 for s in jobs.values() if s.comment) == 1


def test_list_jobs_text_fallback_asks_for_comments_separately(fake, backend):
    fake.on("squeue", "--json", stderr="squeue: unrecognized option '--json'\n", rc=1)
    fake.on("squeue", "Comment", stdout="1|hpcllm-alloc-0123abcd|\n2|a|b c|\n3|(null)|\n")
    fake.on("squeue", "--Format", stdout=(FIXTURES / "squeue_22.05.txt").read_text())
    jobs = backend.list_jobs()
    assert (jobs["1"].comment, jobs["2"].comment, jobs["3"].comment) == ("hpcllm-alloc-0123abcd", "a|b c", None)
    assert jobs["1"].state is JobState.COMPLETED


def test_refusal_carries_slurms_message(fake, backend):
    message = ("sbatch: error: invalid partition specified: nope\n"
               "sbatch: error: Batch job submission failed: Invalid partition name specified\n")
    fake.on("sbatch", "", stderr=message, rc=1)
    with pytest.raises(SlurmError) as refused:
        backend.submit(make_job_spec(name="t", script="true", partition="nope"))
    assert not isinstance(refused.value, SlurmUnavailable)
    assert "Invalid partition name specified" in str(refused.value)
    assert refused.value.slurm_message == message.strip()


def test_controller_down_is_unavailable(fake, backend):
    fake.on("squeue", "", stderr="slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n",
            rc=1)
    with pytest.raises(SlurmUnavailable, match="not reachable.*scontrol ping"):
        backend.statuses(["1"])


def test_missing_slurm_conf_is_unavailable(fake, backend):
    fake.on("sinfo", "", stderr="sinfo: error: s_p_parse_file: cannot stat file /x: No such file or directory\n"
                                "sinfo: fatal: Unable to process configuration file\n", rc=1)
    with pytest.raises(SlurmUnavailable, match="SLURM_CONF"):
        backend.nodes()


def test_missing_command_is_unavailable(tmp_path, monkeypatch, backend):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm commands at all
    with pytest.raises(SlurmUnavailable, match="sbatch: command not found.*slurm-client"):
        backend.submit(make_job_spec(name="t", script="true"))


def test_a_slurm_command_that_cannot_be_run_is_unavailable_not_a_traceback(backend, tmp_path, monkeypatch):
    (tmp_path / "sbatch").write_text("#!/bin/sh\necho 1\n")  # not executable
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SlurmUnavailable, match="sbatch cannot be run: Permission denied"):
        backend.submit(make_job_spec(name="t", script="true"))


def test_hung_command_times_out_as_unavailable(fake):
    fake.on("squeue", "", sleep=5)
    with pytest.raises(SlurmUnavailable, match="did not answer within 1 s"):
        CliBackend(SlurmConfig(), command_timeout=1).statuses(["1"])


# Slurm 22.05's words (slurm_errno.c) for a job refused over a setting hpcllm chose, as sbatch prints them.
SETTING_REFUSALS = [
    ("Invalid partition name specified", {"partition": "nope"}, "[slurm] partition", "partition 'nope'"),
    ("Invalid account or account/partition combination specified", {"account": "other", "partition": "p"},
     "[slurm] account and [slurm] partition", "account 'other', partition 'p'"),
    ("Invalid qos specification", {"qos": "fast"}, "[slurm] qos", "qos 'fast'"),
    ("Invalid generic resource (gres) specification", {"gpus_per_node": 8}, "[slurm] gpus_per_node",
     "gpus_per_node 'gpu:8'"),
    ("Requested time limit is invalid (missing or exceeds some limit)", {"time": "99:00:00"}, "[slurm] time",
     "time '99:00:00'"),
    ("Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)",
     {"qos": "short", "time": "08:00:00", "gpus_per_node": 4},
     "[slurm] qos and [slurm] time and [slurm] gpus_per_node", "qos 'short', time '08:00:00', gpus_per_node 'gpu:4'"),
    ("Requested node configuration is not available", {"gpus_per_node": 16, "partition": "gpu"},
     "[slurm] gpus_per_node and [slurm] partition", "gpus_per_node 'gpu:16', partition 'gpu'"),
]


@pytest.mark.parametrize("words, fields, keys, asked", SETTING_REFUSALS)
def test_a_refusal_over_a_setting_names_its_config_key_after_slurms_words(fake, backend, words, fields, keys, asked):
    stderr = f"sbatch: error: Batch job submission failed: {words}\n"
    fake.on("sbatch", "", stderr=stderr, rc=1)
    for mode, option in (("submit", "--parsable"), ("estimate_start", "--test-only")):
        with pytest.raises(SlurmError) as refused:
            getattr(backend, mode)(make_job_spec(name="t", script="true", **fields))
        assert not isinstance(refused.value, SlurmUnavailable)
        message = str(refused.value)
        assert message.startswith(f"sbatch {option} failed: {stderr.strip()}")
        assert f"set {keys}" in message and f"asked for {asked}:" in message
        assert refused.value.slurm_message == stderr.strip()


def test_a_refusal_over_nothing_hpcllm_chose_is_slurms_words_alone(fake, backend):
    stderr = "sbatch: error: Batch job submission failed: Job dependency problem\n"
    fake.on("sbatch", "", stderr=stderr, rc=1)
    with pytest.raises(SlurmError) as refused:
        backend.submit(make_job_spec(name="t", script="true"))
    assert str(refused.value) == f"sbatch --parsable failed: {stderr.strip()}"


def test_a_child_left_holding_the_output_does_not_hold_the_answer(fake, backend):
    # A site's sbatch wrapper that starts a logger in the background: sbatch itself answered at once.
    fake.on("sbatch", "--parsable", stdout="77\n", linger=60)
    assert backend.submit(make_job_spec(name="t", script="true")) == "77"
    assert [pid_alive(pid) for pid in fake.lingering()] == [True]  # left alone: it is not ours to end


def test_a_command_past_its_timeout_is_ended_with_what_it_started(fake):
    fake.on("squeue", "", sleep=30, linger=60)
    with pytest.raises(SlurmUnavailable, match="did not answer within 1 s"):
        CliBackend(SlurmConfig(), command_timeout=1).statuses(["1"])
    lingering = fake.lingering()
    assert len(lingering) == 1
    deadline = time.monotonic() + 30  # SIGKILL is sent; the orphan is reaped by init a moment later
    while pid_alive(lingering[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(lingering[0])


def test_job_end_is_one_squeue_call_for_the_job_as_slurm_says_it_now(fake, backend):
    # A model pool's agent asks for its own job's end (hpcllm.node.job_end): start + time limit, none when unlimited.
    fake.on("squeue", "--jobs=77", stdout="77|RUNNING|None|n8|1899996400|1900000000|1:00:00|0|debug|77|pool|\n")
    assert backend.job_end("77") == 1_900_000_000
    [call] = fake.calls("squeue")
    assert call["args"][:2] == ["--jobs=77", "--noheader"] and call["env"]["SLURM_TIME_FORMAT"] == "%s"
    fake.rules.clear()
    fake.on("squeue", "--jobs=77", stdout="77|RUNNING|None|n8|1899996400|1931536000|UNLIMITED|0|debug|77|pool|\n")
    assert backend.job_end("77") is None


def test_job_end_of_a_job_squeue_does_not_list_is_a_refusal(fake, backend):
    fake.on("squeue", "--jobs=77", stdout="")
    with pytest.raises(SlurmError, match="squeue does not list job 77") as refused:
        backend.job_end("77")
    assert not isinstance(refused.value, SlurmUnavailable)


def test_job_end_without_squeue_or_slurmctld_says_what_to_check(fake, backend, tmp_path, monkeypatch):
    fake.on("squeue", "--jobs=77", stderr="slurm_load_jobs error: Unable to contact slurm controller\n", rc=1)
    with pytest.raises(SlurmUnavailable, match=r"squeue --jobs=77: Slurm is not reachable: .*scontrol ping"):
        backend.job_end("77")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no Slurm commands at all
    with pytest.raises(SlurmUnavailable, match="squeue: command not found.*slurm-client"):
        backend.job_end("77")


def test_cancel_of_a_finished_job_is_not_an_error(fake, backend):
    fake.on("scancel", "5", stderr="scancel: error: Kill job error on job id 5: Job/step already completing or "
                                   "completed\n", rc=1)
    backend.cancel("5")
    fake.on("scancel", "", stderr="scancel: error: Unable to contact slurm controller\n", rc=1)
    with pytest.raises(SlurmUnavailable):
        backend.cancel("6")


def test_signal_and_requeue_commands(fake, backend):
    fake.on("scancel", "").on("scontrol", "requeue")
    backend.signal("8", "SIGUSR1")
    backend.signal("8", 15, batch_only=False)
    backend.requeue("8")
    assert [c["args"] for c in fake.calls()] == [
        ["--signal=USR1", "--batch", "8"], ["--signal=TERM", "--full", "8"], ["requeue", "8"]]


def test_nodes_from_sinfo_json(fake, backend):
    fake.on("sinfo", "--json", stdout=(FIXTURES / "sinfo_22.05.json").read_text())
    nodes = backend.nodes()
    assert [n.name for n in nodes] == ["n1", "n2", "n3", "n4"] and nodes[0].gpus_used == 1


def test_nodes_on_24_05_ask_scontrol_for_per_node_json(fake, backend):
    fake.on("sinfo", "--json", stdout=(FIXTURES / "sinfo_24.05.json").read_text())
    fake.on("scontrol", "show nodes --json", stdout=(FIXTURES / "nodes_23.11.json").read_text())
    nodes = {n.name: n for n in backend.nodes()}
    assert nodes["gpu01"].gpus_total == 4 and not nodes["gpu02"].available


RESERVED_NODES = """\
NodeName=n1 CPUTot=4 Gres=gpu:2 GresUsed=gpu:0 State=IDLE+RESERVED Partitions=batch
NodeName=n2 CPUTot=4 Gres=gpu:2 GresUsed=gpu:0 State=IDLE+RESERVED Partitions=batch
NodeName=n3 CPUTot=4 Gres=gpu:2 GresUsed=gpu:0 State=IDLE+RESERVED Partitions=batch
NodeName=n4 CPUTot=4 Gres=gpu:2 GresUsed=gpu:0 State=IDLE Partitions=batch
"""


def reservation_line(name: str, nodes: str, flags: str = "SPEC_NODES") -> str:
    """One reservation as `scontrol -o show reservation` prints it (Slurm 22.05)."""
    return (f"ReservationName={name} StartTime=2025-01-01T00:00:00 EndTime=2026-01-01T00:00:00 "
            f"Duration=365-00:00:00 Nodes={nodes} NodeCnt=2 CoreCnt=8 Features=(null) PartitionName=batch "
            f"Flags={flags} TRES=cpu=8 Users=hpcllm Groups=(null) Accounts=(null) Licenses=(null) State=ACTIVE "
            f"BurstBuffer=(null) Watts=n/a MaxStartDelay=(null)\n")


def reserved_nodes(fake, *reservations: str) -> None:
    fake.on("sinfo", "--json", stderr="sinfo: unrecognized option '--json'\n", rc=1)
    fake.on("scontrol", "-d -o show node", stdout=RESERVED_NODES)
    fake.on("scontrol", "-o show reservation", stdout="".join(reservations) or "No reservations in the system\n")


def test_where_the_service_runs_in_a_reservation_only_that_reservations_nodes_are_available(fake, backend,
                                                                                             monkeypatch):
    """SBATCH_RESERVATION=hpcllm: n1 and n2 are that reservation's, n3 a class's reservation's (RESERVED as well),
    n4 in none. Only n1 and n2 take the service's jobs: one sent to n3 by name would wait for the class to end."""
    monkeypatch.setenv("SBATCH_RESERVATION", "hpcllm")
    reserved_nodes(fake, reservation_line("hpcllm", "n[1-2]"), reservation_line("class", "n3"))
    assert {n.name: n.available for n in backend.nodes()} == {"n1": True, "n2": True, "n3": False, "n4": False}
    monkeypatch.delenv("SBATCH_RESERVATION")  # no reservation of its own: the reserved nodes are closed to it
    assert {n.name: n.available for n in backend.nodes()} == {"n1": False, "n2": False, "n3": False, "n4": True}
    assert len(fake.calls("scontrol")) == 3  # the reservations were read once, while one was named


def test_a_flex_or_node_less_reservations_jobs_may_run_on_the_nodes_in_no_reservation(fake, backend, monkeypatch):
    """A FLEX reservation's jobs run on its nodes and on nodes in no reservation; a reservation of licences only
    (ANY_NODES, no nodes of its own) on any node in no reservation. Never on another reservation's nodes. One
    `scontrol show reservation` reads them both."""
    monkeypatch.setenv("SBATCH_RESERVATION", "flex,licences")
    reserved_nodes(fake, reservation_line("flex", "n1", "FLEX,SPEC_NODES"), reservation_line("class", "n[2-3]"),
                   reservation_line("licences", "(null)", "ANY_NODES"))
    assert {n.name: n.reservations for n in backend.nodes()} == {
        "n1": ("flex",), "n2": (), "n3": (), "n4": ("flex", "licences")}
    monkeypatch.setenv("SBATCH_RESERVATION", "licences")
    assert {n.name: n.available for n in backend.nodes()} == {"n1": False, "n2": False, "n3": False, "n4": True}
    assert len(fake.calls("scontrol")) == 4  # each listing: the nodes and one read of the reservations


def test_a_reservation_slurm_does_not_show_is_an_error_saying_what_to_set(fake, backend, monkeypatch):
    monkeypatch.setenv("SBATCH_RESERVATION", "ended")
    reserved_nodes(fake, reservation_line("hpcllm", "n[1-2]"))
    with pytest.raises(SlurmError, match=r"Slurm shows no reservation 'ended', which SBATCH_RESERVATION \(the "
                                         r"service's environment\) names for the service's jobs \(sbatch refuses "
                                         r"them\): set SBATCH_RESERVATION to the service's current reservation") \
            as refused:
        backend.nodes()
    assert not isinstance(refused.value, SlurmUnavailable)


def test_reservations_scontrol_cannot_read_are_an_error_naming_them_without_the_advice_to_unset(fake, backend,
                                                                                                monkeypatch):
    """scontrol failing says so (Slurm's own words): the reservation may well exist, unsetting it is no fix."""
    monkeypatch.setenv("SBATCH_RESERVATION", "hpcllm")
    fake.on("sinfo", "--json", stderr="sinfo: unrecognized option '--json'\n", rc=1)
    fake.on("scontrol", "-d -o show node", stdout=RESERVED_NODES)
    fake.on("scontrol", "-o show reservation", stderr="slurm_load_reservations error: Access/permission denied\n",
            rc=1)
    with pytest.raises(SlurmError, match=r"cannot read Slurm's reservations, for the nodes of 'hpcllm', which "
                                         r"SBATCH_RESERVATION .* names for the service's jobs: .*Access/permission "
                                         r"denied") as refused:
        backend.nodes()
    assert "unset" not in str(refused.value)


def test_nodes_fall_back_to_scontrol_text(fake, backend):
    fake.on("sinfo", "--json", stderr="sinfo: unrecognized option '--json'\n", rc=1)
    fake.on("scontrol", "-d -o show node", stdout=(FIXTURES / "scontrol_nodes_22.05.txt").read_text())
    fake.on("scontrol", "-o show partition", stdout=(FIXTURES / "scontrol_partitions_22.05.txt").read_text())
    assert [n.gpus_total for n in backend.nodes()] == [2, 2, 2, 2]
    assert [p.name for p in backend.partitions()] == ["batch", "high"]


# -------------------------------------------------------------------- output that is not UTF-8 (Latin-1 names)


def test_a_latin1_job_name_in_squeue_does_not_break_statuses(fake, backend):
    # squeue --all lists every user's jobs: one job name written in Latin-1 must not hide the others.
    fake.on("squeue", "--json", encoding="latin-1",
            stdout='{"jobs":[{"job_id":1,"job_state":"RUNNING","name":"caf\xe9","nodes":"n1"},'
                   '{"job_id":2,"job_state":"PENDING","name":"ours"}]}')
    statuses = backend.statuses(["1", "2"])
    assert statuses["1"].name == "caf\ufffd" and statuses["1"].nodes == ("n1",)
    assert statuses["2"].state is JobState.PENDING


def test_a_latin1_warning_of_sbatch_does_not_break_submit(fake, backend):
    fake.on("sbatch", "--parsable", stdout="123\n", stderr="sbatch: warning: caf\xe9\n", encoding="latin-1")
    assert backend.submit(make_job_spec(name="t", script="true")) == "123"


def test_a_latin1_refusal_keeps_slurms_message(fake, backend):
    fake.on("sbatch", "", stderr="sbatch: error: invalid partition specified: caf\xe9\n", rc=1, encoding="latin-1")
    with pytest.raises(SlurmError, match="invalid partition specified: caf\ufffd") as refused:
        backend.submit(make_job_spec(name="t", script="true"))
    assert not isinstance(refused.value, SlurmUnavailable)


# --------------------------------------------------------------------------- SBATCH_* of the controller's env

# The audit's environment (/tmp/audit-wk/s5.py): each of these changed what sbatch submitted, or hung it.
AUDIT_ENVIRONMENT = {"SBATCH_EXPORT": "NONE", "SBATCH_WAIT": "1", "SLURM_CLUSTERS": "other",
                     "SBATCH_PARTITION": "debug", "SBATCH_ARRAY_INX": "0-3", "SBATCH_CLUSTERS": "other",
                     "SBATCH_JOB_NAME": "theirs", "SBATCH_OUTPUT": "/dev/null", "SBATCH_TIMELIMIT": "1"}
# sbatch(1) options named by the SBATCH_* variables above.
_ENV_OPTION = {"SBATCH_EXPORT": "export", "SBATCH_WAIT": "wait", "SBATCH_PARTITION": "partition",
               "SBATCH_ARRAY_INX": "array", "SBATCH_CLUSTERS": "clusters", "SLURM_CLUSTERS": "clusters",
               "SBATCH_JOB_NAME": "job-name", "SBATCH_OUTPUT": "output", "SBATCH_TIMELIMIT": "time",
               "SBATCH_GRES": "gres"}


def effective_options(call: dict) -> dict[str, str]:
    """The options sbatch applies, by sbatch(1)'s precedence: #SBATCH lines < environment < command line."""
    options = dict(re.findall(r"^#SBATCH --([a-z-]+)=?(\S*)", call["stdin"], re.MULTILINE))
    options.update({option: call["env"][name] for name, option in _ENV_OPTION.items() if name in call["env"]})
    options.update(re.findall(r"^--([a-z-]+)=?(\S*)", "\n".join(call["args"]), re.MULTILINE))
    return options


def test_sbatch_environment_cannot_change_what_hpcllm_submits(fake, backend, monkeypatch, caplog):
    for name, value in {**AUDIT_ENVIRONMENT, "SBATCH_GRES": "gpu:2"}.items():
        monkeypatch.setenv(name, value)
    fake.on("sbatch", "--parsable", stdout="123\n")
    spec = make_job_spec(name="hpcllm-node", script="true", partition="gpu", time="01:00:00",
                         output="/tmp/hpcllm-%j.out", env={"HPCLLM_CONFIG": "/etc/hpcllm.toml"})
    with caplog.at_level(logging.WARNING, logger="hpcllm.slurm.cli_backend"):
        assert backend.submit(spec) == "123"
    options = effective_options(fake.calls("sbatch")[0])
    assert (options["export"], options["partition"], options["job-name"], options["time"], options["output"]) == (
        "ALL", "gpu", "hpcllm-node", "01:00:00", "/tmp/hpcllm-%j.out")
    assert not {"wait", "array", "clusters"} & set(options)  # no hang, one job, this cluster
    # An option hpcllm leaves open still comes from the environment (bench/replay.py relies on SBATCH_GRES),
    # and the admin is told which.
    assert options["gres"] == "gpu:2"
    (warning,) = [r.getMessage() for r in caplog.records if "hpcllm's environment" in r.getMessage()]
    assert "SBATCH_GRES=gpu:2" in warning and "SBATCH_PARTITION=debug" in warning and "SBATCH_WAIT" not in warning


def test_cluster_choice_reaches_no_slurm_command(fake, backend, monkeypatch):
    monkeypatch.setenv("SLURM_CLUSTERS", "other")  # squeue and scancel read it too
    fake.on("squeue", "--json", stdout='{"jobs": []}').on("scancel", "")
    backend.list_jobs()
    backend.cancel("5")
    assert not [c for c in fake.calls() if "SLURM_CLUSTERS" in c["env"]]
