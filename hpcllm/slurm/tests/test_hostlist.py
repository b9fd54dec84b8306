"""Slurm hostlist expansion: the pure-Python fallback, and agreement with `scontrol show hostnames`."""

from __future__ import annotations

import subprocess

import pytest

from hpcllm.slurm.hostlist import MAX_RANGE, HostlistError, expand_hostlist, expand_nodes


@pytest.mark.parametrize("expr, names", [
    ("n1", ["n1"]),
    ("n[1-4]", ["n1", "n2", "n3", "n4"]),
    ("n[1-4,7]", ["n1", "n2", "n3", "n4", "n7"]),
    ("a[01-03]b", ["a01b", "a02b", "a03b"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("gpu[1-2]-[3,5]", ["gpu1-3", "gpu1-5", "gpu2-3", "gpu2-5"]),
    ("n1,n3,x[9-10]", ["n1", "n3", "x9", "x10"]),
    # As `scontrol show hostnames`: order and repeats kept (a per-task list names a node once per task).
    ("n[1-2],n[2-3]", ["n1", "n2", "n2", "n3"]),
    ("n[1,1]", ["n1", "n1"]),
    ("n[2,1]", ["n2", "n1"]),
    ("node-a.b", ["node-a.b"]),
])
def test_expands(expr, names):
    assert expand_hostlist(expr) == names


@pytest.mark.parametrize("expr, message", [
    ("", "empty"),
    ("n[1-", "without a matching ']'"),
    ("n]", "without a matching '['"),
    ("n[]", "empty []"),
    ("n[4-1]", "goes backwards; write it 1-4"),
    ("n[a-b]", "numbers or ranges"),
    ("n1,,n2", "empty item"),
    ("n1,", "empty item"),
    ("n[[1]]", "nested"),
    ("n1 n2", "spaces"),
    ("n[1-1000000]", "too large"),
    ("n[1-100000]", "100000 names, and Slurm takes at most 65536 in one range"),
    ("n[0-65536]", "too large"),
])
def test_rejects_with_a_clear_message(expr, message):
    with pytest.raises(HostlistError, match=message.replace("[", r"\[").replace("]", r"\]")):
        expand_hostlist(expr)


def test_a_range_as_large_as_slurm_takes_expands():
    names = expand_hostlist("n[1-65536]")
    assert len(names) == MAX_RANGE == 65536 and names[-1] == "n65536"


def test_expand_nodes_validates_even_when_slurm_would_answer():
    with pytest.raises(HostlistError):
        expand_nodes("n[4-1]")


def test_falls_back_when_scontrol_has_no_configuration(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "absent.conf"))
    # scontrol without a configuration retries for a minute: the expander's timeout, short here, ends it.
    assert expand_nodes("a[01-02]b,c", timeout=0.5) == ["a01b", "a02b", "c"]


@pytest.mark.slurm
# Slurm 22.05 refuses a suffix after the last bracket ("a[01-03]b": Invalid hostlist, empty output); newer Slurm
# and the fallback expand it, and expand_nodes falls back when scontrol prints nothing.
@pytest.mark.parametrize("expr", ["n[1-4,7]", "a[01-02]b[1-2]", "n1,n3,x[9-10]", "gpu[1-2]-[3,5]", "n[1,1]",
                                  "n[1-2],n[2-3]", "n[2,1]"])
def test_agrees_with_scontrol(expr, slurm_cluster):
    result = subprocess.run(["scontrol", "show", "hostnames", expr], capture_output=True, text=True, timeout=30,
                            env=slurm_cluster.env)
    assert result.returncode == 0, result.stderr
    assert expand_hostlist(expr) == result.stdout.split()
    assert expand_nodes(expr) == result.stdout.split()


@pytest.mark.slurm
def test_suffix_after_brackets_expands_even_where_slurm_refuses_it(slurm_cluster):
    assert expand_nodes("a[01-03]b") == ["a01b", "a02b", "a03b"]
