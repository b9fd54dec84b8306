"""slurm/install-host.sh: the already-installed fast path, the not-root error and a failing install."""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "install-host.sh"
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def _install(packages: str | None = None, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if packages is not None:
        env["HPCLLM_HOST_PACKAGES"] = packages
    command = ["bash", str(SCRIPT)]
    if as_nobody:
        nobody = pwd.getpwnam("nobody")
        command = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_installed_host_is_a_quick_no_op_for_any_user():
    for as_nobody in (False, True):
        started = time.monotonic()
        result = _install(as_nobody=as_nobody)
        assert result.returncode == 0, result.stderr
        assert "already installed" in result.stderr
        assert "slurmctld" in result.stderr
        assert time.monotonic() - started < 10  # dpkg-query only, no apt


def test_missing_packages_need_root():
    result = _install("munge hpcllm-no-such-package", as_nobody=True)
    assert result.returncode == 1
    assert "error: run as root" in result.stderr
    assert "hpcllm-no-such-package" in result.stderr
    assert "munge" not in result.stderr.split("install:", 1)[1]  # only what is missing is listed


@pytest.mark.slow  # runs apt-get update
def test_unavailable_package_fails_naming_it_and_restores_policy_rc_d():
    before = POLICY_RC_D.read_bytes() if POLICY_RC_D.exists() else None
    result = _install("munge hpcllm-no-such-package")
    assert result.returncode == 1
    # Offline hosts fail one step earlier, at apt-get update; both errors say what to fix.
    assert (
        "not available from the configured apt sources: hpcllm-no-such-package" in result.stderr
        or "apt-get update failed" in result.stderr
    ), result.stderr
    after = POLICY_RC_D.read_bytes() if POLICY_RC_D.exists() else None
    assert after == before
