"""`hpcllm slurm ...` commands."""

from __future__ import annotations

import os
from pathlib import Path

from hpcllm.cli.main import main
from hpcllm.slurm.templates import render_model_pool
from hpcllm.slurm.tests.fake_slurm import FakeSlurm

FIXTURES = Path(__file__).parent / "fixtures"


def test_render_model_pool_to_a_file(tmp_path, capsys):
    out = tmp_path / "pool.sbatch"
    assert main(["slurm", "render", "model-pool", "--model", "llama", "--gpus", "4", "--time", "12:00:00",
                 "-o", str(out)]) == 0
    assert out.read_text() == render_model_pool(model="llama", gpus=4, time="12:00:00")
    assert os.access(out, os.X_OK)


def test_bad_walltime_is_one_clear_line(capsys):
    assert main(["slurm", "render", "model-pool", "--time", "soon"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "walltime 'soon'" in err and "Traceback" not in err


def test_nodes_and_jobs_tables(tmp_path, monkeypatch, capsys):
    fake = FakeSlurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", fake.path_env())
    fake.on("sinfo", "--json", stdout=(FIXTURES / "sinfo_22.05.json").read_text())
    fake.on("squeue", "--json", stdout=(FIXTURES / "squeue_22.05.json").read_text())
    assert main(["slurm", "nodes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "NODE" and lines[1].split()[:4] == ["n1", "MIXED", "batch,high", "1/2"]
    assert main(["slurm", "jobs", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:4] == ["2", "FAILED", "FAILED", "n1"]


def test_slurm_down_is_one_clear_line(tmp_path, monkeypatch, capsys):
    fake = FakeSlurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", fake.path_env())
    fake.on("sinfo", "", stderr="sinfo: error: Unable to contact slurm controller (connect failure)\n", rc=1)
    assert main(["slurm", "nodes"]) == 5
    err = capsys.readouterr().err
    assert err.startswith("error: sinfo --json: Slurm is not reachable") and "Traceback" not in err
