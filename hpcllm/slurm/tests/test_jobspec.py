"""JobSpec: bad job descriptions are refused before anything reaches Slurm, with the field named."""

from __future__ import annotations

import pytest

from hpcllm.errors import ConfigError
from hpcllm.slurm.base import JobState, make_job_spec, parse_walltime, signal_name


@pytest.mark.parametrize("fields, complaint", [
    ({"signal": "USR1"}, "NAME@SECONDS"),
    ({"signal": "USR1@soon"}, "NAME@SECONDS"),
    ({"signal": "USR1@70000"}, "at most 65535 s"),  # sbatch: only "Invalid --signal specification"
    ({"signal": "USR3@60"}, "not a known signal"),
    ({"mem": "4 GB"}, "mem"),
    ({"time": "2 hours"}, "time"),
    ({"partition": "gpu\n#SBATCH --qos=high"}, "partition"),
    ({"output": "/my logs/x.out"}, "must not be empty or hold spaces"),
    ({"env": {"1BAD": "x"}}, "not a valid shell name"),
    ({"gres": "gpu:2", "gpus_per_node": 1}, "either gpus_per_node or gres"),
    ({"nodes": 0}, "nodes"),
    ({"nodelist": ("n1 n2",)}, "node name"),
    ({"template": "node-agent"}, "exactly one of script"),
])
def test_bad_fields_are_refused(fields, complaint):
    with pytest.raises(ConfigError, match=complaint):
        make_job_spec(name="j", script="true", **fields)


def test_name_is_required_and_checked():
    with pytest.raises(ConfigError, match="name"):
        make_job_spec(name="has space", script="true")


def test_derived_values():
    spec = make_job_spec(name="j", script="true", time="1-00:00:30", signal="sigusr2@90", mem="512M",
                         gpus_per_node=2)
    assert spec.time_minutes == 24 * 60 + 1  # rounded up
    assert spec.signal == "USR2@90" and spec.batch_signal == "B:USR2@90" and spec.signal_name == "USR2"
    assert spec.mem_mb == 512 and spec.gres_request == "gpu:2"
    assert make_job_spec(name="j", script="true", mem="2G").mem_mb == 2048
    assert make_job_spec(name="j", script="true").gres_request is None


@pytest.mark.parametrize("text, seconds", [
    ("30", 1800), ("5:00", 300), ("01:02:03", 3723), ("2-00", 172800), ("1-01:30", 91800), ("1-00:00:01", 86401),
])
def test_parse_walltime(text, seconds):
    assert parse_walltime(text) == seconds


@pytest.mark.parametrize("given, name", [("SIGUSR1", "USR1"), ("usr2", "USR2"), (15, "TERM"), ("10", "USR1")])
def test_signal_names(given, name):
    assert signal_name(given) == name


def test_unknown_signal_is_refused():
    with pytest.raises(ConfigError, match="not a known signal"):
        signal_name("SIGBOGUS")


def test_terminal_states():
    assert {s for s in JobState if s.is_terminal} == {
        JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.PREEMPTED, JobState.TIMEOUT,
        JobState.NODE_FAIL}
