"""`make venv` and `make vllm-venv` (slurm/make-venv.sh): without a usable Python 3.11 it says what to install; a
venv left without pip by an interrupted run is created afresh; a working venv is left alone.

Stand-in Pythons (small bash scripts) play the broken cases: one of another version, and one whose `-m venv` fails
as Debian's python3.11 does without the python3.11-venv package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "slurm" / "make-venv.sh"

# Answers `-c ...` (the version probe) with $FAKE_VERSION; `-m venv --clear DIR` fails like Debian's python3.11
# without python3.11-venv, or, with FAKE_VENV_WORKS=1, (re)makes DIR/bin/{python,pip}; either way it logs the call.
# Run as a venv's pip it logs "pip ARGS" and succeeds.
FAKE_PYTHON = r"""#!/bin/bash
if [[ ${0##*/} == pip ]]; then echo "pip $*" >>"$FAKE_LOG"; exit 0; fi
if [[ $1 == -c ]]; then echo "$FAKE_VERSION"; exit 0; fi
if [[ $1 == -m && $2 == venv ]]; then
    echo "$*" >>"$FAKE_LOG"
    if [[ ${FAKE_VENV_WORKS:-0} == 1 ]]; then
        rm -rf "${!#}" && mkdir -p "${!#}/bin" && cp "$0" "${!#}/bin/python" && cp "$0" "${!#}/bin/pip"
        exit 0
    fi
    echo "The virtual environment was not created successfully because ensurepip is not available." >&2
    exit 1
fi
exit 2
"""


@pytest.fixture
def fake_python(tmp_path) -> Path:
    path = tmp_path / "python3.11"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


def _make_venv(python: str | Path, venv: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), str(python), str(venv)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


def test_make_without_python_3_11_says_what_to_install(tmp_path):
    venv = tmp_path / "venv"
    result = subprocess.run(["make", "-C", str(REPO_ROOT), "venv", "PYTHON=/nonexistent/python3.11", f"VENV={venv}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "error: /nonexistent/python3.11 not found; hpcllm needs Python 3.11" in result.stderr
    assert "make host" in result.stderr and "python3.11-venv" in result.stderr
    assert "PYTHON=/path/to/python3.11" in result.stderr
    assert not venv.exists()


def test_another_python_version_is_named(fake_python, tmp_path):
    result = _make_venv(fake_python, tmp_path / "venv", FAKE_VERSION="3.12", FAKE_LOG=str(tmp_path / "log"))
    assert result.returncode == 1
    assert f"{fake_python} is Python 3.12; hpcllm needs Python 3.11" in result.stderr
    assert not (tmp_path / "log").exists()  # no venv attempted


def test_python_without_venv_support_names_python3_11_venv(fake_python, tmp_path):
    result = _make_venv(fake_python, tmp_path / "venv", FAKE_VERSION="3.11", FAKE_LOG=str(tmp_path / "log"))
    assert result.returncode == 1
    assert "ensurepip is not available" in result.stderr  # Python's own words stay visible
    assert "the package python3.11-venv" in result.stderr and "make host" in result.stderr


def test_a_venv_without_pip_is_created_afresh_and_a_working_one_left_alone(fake_python, tmp_path):
    venv, log = tmp_path / "venv", tmp_path / "log"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(fake_python)  # what a failed `python3.11 -m venv` leaves: no pip
    env = dict(FAKE_VERSION="3.11", FAKE_LOG=str(log), FAKE_VENV_WORKS="1")
    result = _make_venv(fake_python, venv, **env)
    assert result.returncode == 0, result.stderr
    assert "has no working pip" in result.stderr
    assert log.read_text().splitlines() == [f"-m venv --clear {venv}"]
    assert (venv / "bin" / "pip").exists()
    again = _make_venv(fake_python, venv, **env)
    assert again.returncode == 0, again.stderr
    assert len(log.read_text().splitlines()) == 1  # nothing redone


def test_an_existing_venv_of_another_python_is_refused(fake_python, tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "pip"):
        (venv / "bin" / name).symlink_to(fake_python)
    result = _make_venv(fake_python, venv, FAKE_VERSION="3.10", FAKE_LOG=str(tmp_path / "log"))
    assert result.returncode == 1
    assert f"the venv {venv} has Python 3.10" in result.stderr and f"rm -rf {venv}" in result.stderr


def _make_vllm_venv(python: Path, venv: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(REPO_ROOT), "vllm-venv", f"PYTHON={python}", f"VLLM_VENV={venv}"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_make_vllm_venv_recreates_a_venv_an_earlier_run_left_without_pip(fake_python, tmp_path):
    """`make vllm-venv` without python3.11-venv leaves bin/python and no pip; after `make host` it must recover."""
    venv, log = tmp_path / "vllm-venv", tmp_path / "log"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(fake_python)
    result = _make_vllm_venv(fake_python, venv, FAKE_VERSION="3.11", FAKE_LOG=str(log), FAKE_VENV_WORKS="1")
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == f"-m venv --clear {venv}"
    assert calls[1].startswith("pip install") and (venv / ".installed").exists()


def test_make_vllm_venv_refuses_another_python_version(fake_python, tmp_path):
    venv, log = tmp_path / "vllm-venv", tmp_path / "log"
    result = _make_vllm_venv(fake_python, venv, FAKE_VERSION="3.12", FAKE_LOG=str(log), FAKE_VENV_WORKS="1")
    assert result.returncode != 0
    assert f"{fake_python} is Python 3.12; hpcllm needs Python 3.11" in result.stderr
    assert not log.exists() and not (venv / ".installed").exists()


@pytest.mark.slow  # ensurepip installs pip: 4 s on an idle machine, 20 s on a busy one
@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="needs the Python 3.11 this suite runs on")
def test_a_real_python_3_11_makes_a_venv_with_pip(tmp_path):
    venv = tmp_path / "venv"
    result = _make_venv(sys.executable, venv)
    assert result.returncode == 0, result.stderr
    pip = subprocess.run([str(venv / "bin" / "pip"), "--version"], capture_output=True, text=True, timeout=60)
    assert pip.returncode == 0 and "python 3.11" in pip.stdout
