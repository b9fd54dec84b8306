"""`hpcllm slurm ...` commands."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


def test_render_model_pool_refuses_a_model_name_that_is_not_one(capsys):
    for name in ("x\ntouch /tmp/PWNED", "a b", "-rf", "$(id)"):
        assert main(["slurm", "render", "model-pool", "--model", name]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"error: model {name!r} is not a model name") and captured.out == ""


def test_values_rendered_into_scripts_cannot_add_lines(tmp_path, capsys):
    # Walltimes are checked with fullmatch: "$" alone would let a trailing newline through onto the #SBATCH line.
    assert main(["slurm", "render", "model-pool", "--time", "01:00:00\n"]) == 2
    assert "walltime '01:00:00\\n'" in capsys.readouterr().err
    assert main(["slurm", "render", "model-pool", "--partition", "gpu\ntouch /tmp/x"]) == 2
    assert "partition" in capsys.readouterr().err
    config = tmp_path / "hpcllm.toml"
    config.write_text('[slurm]\nsignal = "USR1\\ntouch /tmp/x"\nsignal_seconds = 0\n')
    assert main(["slurm", "render", "node-agent", "--config", str(config)]) == 2
    assert "slurm.signal" in capsys.readouterr().err


def test_render_to_a_missing_folder_is_one_clear_line(tmp_path, capsys):
    target = tmp_path / "nowhere" / "x.sh"
    assert main(["slurm", "render", "model-pool", "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {target} (No such file or directory)") and "Traceback" not in err


@pytest.mark.parametrize("output", ["", "scripts/"])
def test_render_to_a_name_that_is_no_file_is_one_clear_line(tmp_path, monkeypatch, capsys, output):
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", "render", "model-pool", "-o", output]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: Invalid value for '-o' / '--output': {output!r} names no file") and not \
        list(tmp_path.iterdir())


def test_jobs_refuses_ids_that_are_not_slurm_job_ids(tmp_path, monkeypatch, capsys):
    fake = FakeSlurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", fake.path_env())
    fake.on("squeue", "--json", stdout=(FIXTURES / "squeue_22.05.json").read_text())
    assert main(["slurm", "jobs", "2", "abc", "12_3"]) == 2
    assert "'abc': a Slurm job id is a number" in capsys.readouterr().err
