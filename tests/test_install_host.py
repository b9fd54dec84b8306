"""slurm/install-host.sh: the already-installed fast path on this host, and its install branch (what a fresh machine
runs) driven end to end with stand-ins for dpkg-query, apt-get and apt-cache on PATH.

The stand-ins keep their state in one folder: `installed` lists the packages dpkg-query reports installed (the fake
apt-get install adds its arguments to it), `apt-get.log` records each apt-get call with the exit status the
policy-rc.d in force returned at that moment. HPCLLM_POLICY_RC_D points the script at a scratch policy-rc.d, so no
test touches /usr/sbin.
"""

from __future__ import annotations

import os
import pwd
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "slurm" / "install-host.sh"
RUNTIME_PACKAGES = ["python3.11", "python3.11-venv", "curl", "munge", "slurmctld", "slurmd", "slurm-client",
                    "openmpi-bin", "libopenmpi-dev", "libpmix2", "slurmrestd", "slurm-wlm-jwt-plugin",
                    "nginx", "openssl", "libpq5"]
TEST_PACKAGES = ["shellcheck", "postgresql", "chromium"]

FAKE_DPKG_QUERY = r"""#!/bin/bash
# dpkg-query -W -f='${Status}' PACKAGE: installed when listed in $FAKE_APT/installed.
package=${!#}
if grep -qxF -- "$package" "$FAKE_APT/installed" 2>/dev/null; then
    printf 'install ok installed'
else
    echo "dpkg-query: no packages found matching $package" >&2
    exit 1
fi
"""

FAKE_APT_GET = r"""#!/bin/bash
# Records "ARGS | policy-rc.d=STATUS | DEBIAN_FRONTEND=..."; `install` marks its package arguments installed.
policy=absent
if [[ -x $HPCLLM_POLICY_RC_D ]]; then "$HPCLLM_POLICY_RC_D" slurmctld start; policy=$?; fi
echo "$* | policy-rc.d=$policy | DEBIAN_FRONTEND=${DEBIAN_FRONTEND:-}" >>"$FAKE_APT/apt-get.log"
for arg in "$@"; do
    case $arg in
    update) sleep "${FAKE_APT_UPDATE_SECONDS:-0}"; exit "${FAKE_APT_UPDATE_STATUS:-0}" ;;
    install) installing=1 ;;
    -*) ;;
    *) if [[ -n ${installing:-} && ${FAKE_APT_INSTALL_STATUS:-0} == 0 && " ${FAKE_APT_NOT_INSTALLING:-} " != *" $arg "* ]]; then
           echo "$arg" >>"$FAKE_APT/installed"
       fi ;;
    esac
done
exit "${FAKE_APT_INSTALL_STATUS:-0}"
"""

FAKE_APT_CACHE = r"""#!/bin/bash
# apt-cache policy PACKAGE: a candidate unless PACKAGE is in $FAKE_APT_UNAVAILABLE.
package=${!#}
candidate=1.0-1
if [[ " ${FAKE_APT_UNAVAILABLE:-} " == *" $package "* ]]; then candidate='(none)'; fi
printf '%s:\n  Installed: (none)\n  Candidate: %s\n' "$package" "$candidate"
"""


@dataclass
class FakeApt:
    state: Path
    policy_rc_d: Path
    env: dict[str, str]

    def mark_installed(self, *packages: str) -> None:
        with open(self.state / "installed", "a") as listed:
            listed.writelines(f"{package}\n" for package in packages)

    def installed(self) -> list[str]:
        path = self.state / "installed"
        return path.read_text().split() if path.exists() else []

    def apt_get_calls(self) -> list[str]:
        path = self.state / "apt-get.log"
        return path.read_text().splitlines() if path.exists() else []

    def start(self, *args: str, **env: str) -> subprocess.Popen[str]:
        """The script in its own process group, as a terminal runs it (Ctrl-C signals the whole group)."""
        return subprocess.Popen(["bash", str(SCRIPT), *args], env={**self.env, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(SCRIPT), *args], env={**self.env, **env}, capture_output=True, text=True,
                              timeout=60)


@pytest.fixture
def fake_apt(tmp_path) -> FakeApt:
    if os.geteuid() != 0:
        pytest.skip("the install branch needs root (it checks EUID before calling apt-get)")
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in (("dpkg-query", FAKE_DPKG_QUERY), ("apt-get", FAKE_APT_GET), ("apt-cache", FAKE_APT_CACHE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    policy_rc_d = tmp_path / "sbin" / "policy-rc.d"
    policy_rc_d.parent.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HPCLLM_", "FAKE_APT"))}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_APT=str(state), HPCLLM_POLICY_RC_D=str(policy_rc_d))
    return FakeApt(state, policy_rc_d, env)


# ------------------------------------------------------------------ this host (real dpkg-query, nothing installed)


def _real_install(packages: str | None = None, as_nobody: bool = False,
                  args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HPCLLM_")}
    if packages is not None:
        env["HPCLLM_HOST_PACKAGES"] = packages
    command = ["bash", str(SCRIPT), *args]
    if as_nobody:
        nobody = pwd.getpwnam("nobody")
        command = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_installed_host_is_a_quick_no_op_for_any_user():
    for as_nobody in (False, True):
        started = time.monotonic()
        result = _real_install(as_nobody=as_nobody)
        assert result.returncode == 0, result.stderr
        assert "already installed" in result.stderr
        assert "slurmctld" in result.stderr and "python3.11-venv" in result.stderr
        assert time.monotonic() - started < 10  # dpkg-query only, no apt


def _package_owning(path: str) -> str:
    owner = subprocess.run(["dpkg-query", "-S", os.path.realpath(path)], capture_output=True, text=True, timeout=30)
    assert owner.returncode == 0, owner.stderr
    return owner.stdout.split(":", 1)[0]


def test_the_host_packages_include_the_libpq_the_venvs_psycopg_loads():
    """`make venv` installs psycopg (hpcllm[postgres]), whose pure-Python driver loads the system's libpq: without
    it a PostgreSQL controller.database_url or gateway.limits_db fails with 'no pq wrapper available'."""
    # hpcllm[postgres] installs plain psycopg (pyproject.toml), whose driver is the pure-Python one; a site adding
    # psycopg[binary] gets a bundled libpq, but the python driver is the one `make venv` leaves: ask for it.
    probe = ("import psycopg.pq as pq; assert pq.__impl__ == 'python', pq.__impl__; "
             "print(next(line.split()[-1] for line in open('/proc/self/maps') if '/libpq.so' in line))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PSYCOPG_IMPL": "python"})
    assert loaded.returncode == 0, loaded.stderr
    libpq = loaded.stdout.strip()
    result = _real_install()
    assert result.returncode == 0, result.stderr
    listed = result.stderr.split("already installed (", 1)[1].split(")", 1)[0].split()
    assert _package_owning(libpq) in listed, f"{libpq} comes from no package of {listed}"


def test_missing_packages_need_root():
    result = _real_install("munge hpcllm-no-such-package", as_nobody=True)
    assert result.returncode == 1
    assert "error: run as root" in result.stderr
    assert "hpcllm-no-such-package" in result.stderr
    assert "munge" not in result.stderr.split("install:", 1)[1]  # only what is missing is listed


def test_missing_packages_of_make_test_name_the_target_that_installs_them():
    """`make test` runs install-host.sh --test-tools: its hint must be `make test-host` (`make host` would say
    'already installed' when only the test tools are missing, and make test would fail again)."""
    result = _real_install("munge hpcllm-no-such-package", as_nobody=True, args=("--test-tools",))
    assert result.returncode == 1
    assert "error: run as root" in result.stderr and "(try: sudo make test-host)" in result.stderr


def test_unknown_argument_is_refused():
    result = subprocess.run(["bash", str(SCRIPT), "--tests"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "unknown argument '--tests'" in result.stderr and "--test-tools" in result.stderr


# ------------------------------------------------------------------ the install branch, with stand-ins for apt


def test_fresh_host_installs_every_missing_package_with_services_held_back(fake_apt):
    fake_apt.mark_installed("munge", "curl")  # partly set up already: only the rest is installed
    result = fake_apt.run()
    assert result.returncode == 0, result.stderr
    expected = [p for p in RUNTIME_PACKAGES if p not in ("munge", "curl")]
    update, install = fake_apt.apt_get_calls()
    assert update.startswith("-q -o DPkg::Lock::Timeout=120 update |")
    assert install == (f"-q -o DPkg::Lock::Timeout=120 install -y {' '.join(expected)} | policy-rc.d=101 | "
                       f"DEBIAN_FRONTEND=noninteractive")
    assert sorted(fake_apt.installed()) == sorted(RUNTIME_PACKAGES)
    assert f"installed: {' '.join(expected)}" in result.stderr
    assert not fake_apt.policy_rc_d.exists()  # none before, none after
    # Run again: everything is installed now, so apt is not called.
    again = fake_apt.run()
    assert again.returncode == 0 and "already installed" in again.stderr
    assert len(fake_apt.apt_get_calls()) == 2


def test_test_tools_adds_shellcheck_postgresql_and_chromium(fake_apt):
    fake_apt.mark_installed(*RUNTIME_PACKAGES)
    result = fake_apt.run("--test-tools")
    assert result.returncode == 0, result.stderr
    assert f"install -y {' '.join(TEST_PACKAGES)} |" in fake_apt.apt_get_calls()[-1]
    assert fake_apt.run("--test-tools").stderr.count("already installed") == 1


def test_an_existing_policy_rc_d_is_set_aside_and_restored(fake_apt):
    original = b"#!/bin/sh\n# the site's own policy\nexit 0\n"
    fake_apt.policy_rc_d.write_bytes(original)
    fake_apt.policy_rc_d.chmod(0o700)
    result = fake_apt.run(HPCLLM_HOST_PACKAGES="munge")
    assert result.returncode == 0, result.stderr
    assert fake_apt.apt_get_calls()[-1].endswith("| policy-rc.d=101 | DEBIAN_FRONTEND=noninteractive")
    assert fake_apt.policy_rc_d.read_bytes() == original
    assert stat.S_IMODE(fake_apt.policy_rc_d.stat().st_mode) == 0o700
    assert not Path(f"{fake_apt.policy_rc_d}.hpcllm-saved").exists()


def test_a_policy_rc_d_left_by_an_interrupted_run_is_replaced_by_the_saved_original(fake_apt):
    original = b"#!/bin/sh\nexit 0\n"
    Path(f"{fake_apt.policy_rc_d}.hpcllm-saved").write_bytes(original)
    fake_apt.policy_rc_d.write_text("#!/bin/sh\n# Written by hpcllm slurm/install-host.sh for the duration of an "
                                    "install.\nexit 101\n")
    result = fake_apt.run(HPCLLM_HOST_PACKAGES="munge")
    assert result.returncode == 0, result.stderr
    assert "interrupted earlier run" in result.stderr
    assert fake_apt.policy_rc_d.read_bytes() == original
    assert not Path(f"{fake_apt.policy_rc_d}.hpcllm-saved").exists()


@pytest.mark.parametrize("policy_before", [None, b"#!/bin/sh\nexit 0\n"], ids=["no-policy", "own-policy"])
def test_failed_apt_get_update_names_the_packages_and_restores_policy_rc_d(fake_apt, policy_before):
    if policy_before is not None:
        fake_apt.policy_rc_d.write_bytes(policy_before)
    result = fake_apt.run(HPCLLM_HOST_PACKAGES="munge slurmd", FAKE_APT_UPDATE_STATUS="100")
    assert result.returncode == 1
    assert "error: apt-get update failed" in result.stderr
    assert "missing: munge slurmd" in result.stderr
    assert len(fake_apt.apt_get_calls()) == 1  # no install after a failed update
    assert (fake_apt.policy_rc_d.read_bytes() if fake_apt.policy_rc_d.exists() else None) == policy_before


@pytest.mark.parametrize("policy_before", [None, b"#!/bin/sh\nexit 0\n"], ids=["no-policy", "own-policy"])
def test_failed_apt_get_install_names_what_is_still_missing_and_restores_policy_rc_d(fake_apt, policy_before):
    if policy_before is not None:
        fake_apt.policy_rc_d.write_bytes(policy_before)
    fake_apt.mark_installed("munge")
    result = fake_apt.run(HPCLLM_HOST_PACKAGES="munge slurmd slurmctld", FAKE_APT_INSTALL_STATUS="100")
    assert result.returncode == 1
    assert "error: apt-get install failed; not installed: slurmd slurmctld" in result.stderr
    assert (fake_apt.policy_rc_d.read_bytes() if fake_apt.policy_rc_d.exists() else None) == policy_before


def test_install_that_leaves_a_package_missing_names_it(fake_apt):
    result = fake_apt.run(HPCLLM_HOST_PACKAGES="munge slurmd", FAKE_APT_NOT_INSTALLING="slurmd")
    assert result.returncode == 1
    assert "after apt-get install these are still not installed: slurmd" in result.stderr
    assert not fake_apt.policy_rc_d.exists()


def test_unavailable_package_is_named_before_anything_is_installed(fake_apt):
    result = fake_apt.run(HPCLLM_HOST_PACKAGES="munge hpcllm-no-such-package",
                          FAKE_APT_UNAVAILABLE="hpcllm-no-such-package")
    assert result.returncode == 1
    assert "not available from the configured apt sources: hpcllm-no-such-package" in result.stderr
    assert [call.split(" | ")[0] for call in fake_apt.apt_get_calls()] == ["-q -o DPkg::Lock::Timeout=120 update"]
    assert fake_apt.installed() == []
    assert not fake_apt.policy_rc_d.exists()


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_install_restores_policy_rc_d(fake_apt, signal_number):
    original = b"#!/bin/sh\nexit 0\n"
    fake_apt.policy_rc_d.write_bytes(original)
    process = fake_apt.start(HPCLLM_HOST_PACKAGES="munge", FAKE_APT_UPDATE_SECONDS="30")
    try:
        deadline = time.monotonic() + 20
        while not fake_apt.apt_get_calls():  # apt-get update is running (and sleeping)
            assert time.monotonic() < deadline and process.poll() is None, process.communicate()
            time.sleep(0.05)
        os.killpg(process.pid, signal_number)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signal_number, stderr
    assert fake_apt.policy_rc_d.read_bytes() == original
    assert not Path(f"{fake_apt.policy_rc_d}.hpcllm-saved").exists()
