"""Every shell script of the repository parses (`bash -n`) and is shellcheck-clean at every severity: the tracked
scripts (*.sh, *.sbatch, golden sbatch files, .ci/run, any file with a sh/bash shebang) and each sbatch template of
slurm/templates rendered the ways hpcllm renders it.

A script can hide a syntax error in a branch only some machines reach (install-host.sh once did: bash parses a
script as it runs it), so parsing every file up front is the check that sees it. shellcheck comes from Debian's
`shellcheck` package, which `make test` installs (slurm/install-host.sh --test-tools). Without it these tests fail
under CI (the CI variable is set, as .ci/run does) and skip elsewhere, saying how to install it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hpcllm.config import Config
from hpcllm.slurm.templates import (
    TEMPLATE_SUFFIX,
    available_templates,
    node_agent_job_spec,
    render_batch_script,
    render_model_pool,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHELL_SUFFIXES = (".sh", ".sbatch")
SHELLS = ("sh", "bash", "dash")
# Walked when the tree is not a git checkout (a tarball); git ls-files is used otherwise.
UNTRACKED_DIRS = {".git", ".venv", "node_modules", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist"}


def _candidate_files() -> list[Path]:
    listed = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "-z"], capture_output=True, timeout=30) \
        if shutil.which("git") and (REPO_ROOT / ".git").exists() else None
    if listed is not None and listed.returncode == 0:
        return [REPO_ROOT / name for name in listed.stdout.decode().split("\0") if name]
    found = []
    for folder, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = [d for d in dirs if d not in UNTRACKED_DIRS and not d.endswith(".egg-info")]
        found += [Path(folder) / name for name in files]
    return found


def _has_shell_shebang(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            first = handle.readline(200).decode("utf-8", "replace").strip()
    except OSError:
        return False
    if not first.startswith("#!"):
        return False
    words = first[2:].split()
    interpreter = words[1] if words and words[0].endswith("/env") and len(words) > 1 else (words or [""])[0]
    return Path(interpreter).name in SHELLS


def shell_scripts() -> list[Path]:
    """The repository's shell scripts; templates (*.sbatch.in, Jinja2) are checked rendered, not as files."""
    scripts = [path for path in _candidate_files()
               if path.is_file() and not path.name.endswith(TEMPLATE_SUFFIX)
               and (path.suffix in SHELL_SUFFIXES or _has_shell_shebang(path))]
    return sorted(scripts)


def _rendering_config() -> Config:
    return Config.model_validate({"paths": {"state_dir": "/srv/hpcllm"},
                                  "slurm": {"partition": "gpu", "account": "ml-lab", "time": "08:00:00",
                                            "gpus_per_node": 2, "signal": "USR1", "signal_seconds": 60}})


def rendered_templates() -> dict[str, str]:
    """Each template rendered with representative values: both branches of every `{% if %}` in it."""
    config = _rendering_config()
    agent_args = ["--listen-host", "0.0.0.0", "--model", "my model's name"]
    rendered = {}
    for nodes in (1, 2):
        for signal in ("USR1", "TERM"):
            config.slurm.signal = signal
            spec = node_agent_job_spec(config, nodes=nodes, agent_args=agent_args,
                                       hpcllm="/opt/hpc llm/.venv/bin/hpcllm")
            rendered[f"node-agent nodes={nodes} signal={signal}"] = render_batch_script(spec)
    rendered["model-pool defaults"] = render_model_pool()
    rendered["model-pool partition signal=TERM"] = render_model_pool(model="my.model_2-a", partition="high",
                                                                     signal="TERM", gpus=4, nodes=2)
    return rendered


def _shellcheck() -> str:
    found = shutil.which("shellcheck")
    if found:
        return found
    reason = ("shellcheck is not installed: `make test` installs it (slurm/install-host.sh --test-tools, as root), "
              "or apt-get install shellcheck")
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the shell checks: {reason}", pytrace=False)
    pytest.skip(reason)


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


SCRIPTS = shell_scripts()
RENDERED = rendered_templates()


def test_the_scripts_found_include_every_kind():
    names = {_relative(path) for path in SCRIPTS}
    assert {".ci/run", "slurm/install-host.sh", "slurm/up.sh", "slurm/devcluster.sh", "slurm/model-pool.sbatch",
            "bench/gpu_check.sh"} <= names, names
    assert any(name.startswith("hpcllm/slurm/tests/golden/") for name in names)
    # Every template is rendered below, so a new template cannot slip past the checks.
    assert {key.split()[0] for key in RENDERED} == set(available_templates())


@pytest.mark.parametrize("script", SCRIPTS, ids=_relative)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"bash -n {_relative(script)}:\n{result.stderr}"


@pytest.mark.parametrize("script", SCRIPTS, ids=_relative)
def test_script_is_shellcheck_clean(script):
    shellcheck = _shellcheck()
    result = subprocess.run([shellcheck, "--external-sources", _relative(script)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"shellcheck {_relative(script)}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("name", RENDERED)
def test_rendered_template_parses_and_is_shellcheck_clean(name):
    script = RENDERED[name]
    parsed = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert parsed.returncode == 0, f"bash -n on {name}:\n{parsed.stderr}"
    checked = subprocess.run([_shellcheck(), "-"], input=script, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, f"shellcheck on {name}:\n{checked.stdout}{checked.stderr}\n--- script:\n{script}"


def test_shellcheck_absence_fails_under_ci(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI must run the shell checks"):
        _shellcheck()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="make test"):
        _shellcheck()
