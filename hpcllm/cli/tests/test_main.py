import subprocess
import sys


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
