import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcllm.cli.main", *args], capture_output=True, text=True)


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "dev" in result.stdout


def test_unknown_command_is_a_clear_error_not_a_traceback():
    result = run_cli("no-such-command")
    assert result.returncode != 0
    assert "No such command" in result.stderr
    assert "Traceback" not in result.stderr


def _console_script() -> str:
    """The installed `hpcllm` console script of this Python (its venv's bin/), else the one on PATH."""
    beside = Path(sys.executable).parent / "hpcllm"
    found = str(beside) if beside.exists() else shutil.which("hpcllm")
    if found is None:
        pytest.skip("the hpcllm console script is not installed (pip install -e .)")
    return found


@pytest.mark.parametrize("args", [("--help",), ("slurm", "render", "model-pool", "--gpus", "2"),
                                  ("slurm", "render", "model-pool", "--gpus", "x")],
                         ids=["help", "subcommand", "bad-option"])
def test_python_dash_m_hpcllm_behaves_as_the_hpcllm_command(args):
    as_module = subprocess.run([sys.executable, "-m", "hpcllm", *args], capture_output=True, text=True, timeout=60)
    as_command = subprocess.run([_console_script(), *args], capture_output=True, text=True, timeout=60)
    assert (as_module.returncode, as_module.stdout, as_module.stderr) == \
        (as_command.returncode, as_command.stdout, as_command.stderr)
    assert as_module.stdout or as_module.stderr
    assert "Traceback" not in as_module.stderr


@pytest.mark.parametrize("args, says", [
    (("deploy",), "error: Missing argument 'MODEL_FILE' (see 'hpcllm deploy --help')"),
    (("deploy", "--no-such-option", "x"), "error: No such option '--no-such-option' (see 'hpcllm deploy --help')"),
    (("no-such-command",), "error: No such command 'no-such-command' (see 'hpcllm --help')"),
    (("slurm", "render", "model-pool", "--gpus", "x"), "error: Invalid value for '--gpus': 'x' is not a valid "
                                                       "integer range (see 'hpcllm slurm render model-pool --help')"),
])
def test_a_usage_error_is_one_error_line_like_the_clis_other_errors(capsys, args, says):
    from hpcllm.cli.main import main

    assert main(list(args)) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [says] and captured.out == ""


def test_help_still_shows_usage(capsys):
    from hpcllm.cli.main import main

    assert main(["deploy", "--help"]) == 0
    assert capsys.readouterr().out.startswith("Usage: hpcllm deploy [OPTIONS] MODEL_FILE")
