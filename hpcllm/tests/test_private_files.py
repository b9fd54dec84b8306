"""Files (issue 15): config files with secrets are the service user's alone, state is created 0700/0600."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcllm.cli.main import main
from hpcllm.config import load_config
from hpcllm.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
WITH_SECRETS = '[cluster]\nshared_secret = "s3cret-for-tests"\n[controller]\nadmin_key = "adm1n-for-tests"\n'


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("file_mode", [0o644, 0o640, 0o604, 0o660])
def test_a_config_with_secrets_others_can_read_is_refused_with_the_fix(tmp_path, file_mode):
    path = tmp_path / "hpcllm.toml"
    path.write_text(WITH_SECRETS)
    path.chmod(file_mode)
    with pytest.raises(ConfigError) as exc:
        load_config(path, private=True)
    assert f"`chmod 600 {path}`" in str(exc.value)
    assert "cluster.shared_secret, controller.admin_key" in str(exc.value)
    load_config(path)  # the admin CLIs and tests may still read it; the services may not
    path.chmod(0o600)
    assert load_config(path, private=True).controller.admin_key == "adm1n-for-tests"


def test_a_database_password_in_either_url_is_a_secret(tmp_path):
    path = tmp_path / "hpcllm.toml"
    path.write_text('[controller]\ndatabase_url = "postgresql://hpcllm:pw@db/hpcllm"\n'
                    '[gateway]\nlimits_db = "postgresql://gateway:pw@db/limits"\n')
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"holds secrets \(controller.database_url, gateway.limits_db\)"):
        load_config(path, private=True)


def test_configs_without_secrets_and_the_dev_config_may_be_readable(tmp_path):
    plain = tmp_path / "plain.toml"
    plain.write_text('[gateway]\nport = 8001\n')
    plain.chmod(0o644)
    load_config(plain, private=True)
    dev = REPO / "conf" / "dev.toml"  # readable as git checked it out: its secrets are public, it says dev = true
    assert load_config(dev, private=True).cluster.dev


def test_a_service_command_refuses_it(tmp_path, capsys):
    path = tmp_path / "hpcllm.toml"
    path.write_text(WITH_SECRETS)
    path.chmod(0o644)
    assert main(["controller", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"run `chmod 600 {path}`" in err and "Traceback" not in err


def test_the_controller_keeps_its_state_private(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)  # an existing state folder made readable by an older version
    config = tmp_path / "hpcllm.toml"
    config.write_text(WITH_SECRETS + f'port = 1\nallocate_on_demand = false\n[paths]\nstate_dir = "{state}"\n')
    config.chmod(0o600)
    ready = tmp_path / "ready"
    log = open(tmp_path / "controller.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "hpcllm.cli.main", "controller", "--config", str(config),
                             "--port", "0", "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "controller.log").read_text()
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert mode(state) == 0o700
    created = [p for p in state.rglob("*")]
    assert any(p.name == "controller.db" for p in created)
    for path in created:
        assert mode(path) == (0o700 if path.is_dir() else 0o600), (path, oct(mode(path)))


def test_a_state_folder_of_another_user_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    if os.getuid() == 0:
        os.chown(theirs, 65534, 65534)  # nobody's
    else:
        theirs = Path("/")  # root's
    # In a child process: private_state_dir sets the process umask.
    code = ("from hpcllm.config import parse_config, private_state_dir\n"
            f"private_state_dir(parse_config({{'paths': {{'state_dir': {str(theirs)!r}}}}}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode != 0 and f"the state folder {theirs} belongs to another user" in result.stderr


def _state_dir_error(state_dir: Path) -> subprocess.CompletedProcess:
    """private_state_dir for that folder, in a child process (it sets the process umask)."""
    code = ("from hpcllm.config import parse_config, private_state_dir\n"
            f"private_state_dir(parse_config({{'paths': {{'state_dir': {str(state_dir)!r}}}}}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("parent_mode", [0o777, 0o775, 0o757], ids=oct)
def test_a_state_folder_in_a_folder_others_may_write_to_is_refused(tmp_path, parent_mode):
    """Another user who may write to a folder above the state (not sticky) can rename it away and put a folder of
    theirs in its place, between two starts or while the service runs: refused with the fix, as OpenSSH refuses
    a key file below such a folder."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(parent_mode)
    state = shared / "deeper" / "state"
    result = _state_dir_error(state)
    assert result.returncode != 0
    assert f"the state folder {state} lies in {shared}, which other users may write to" in result.stderr
    assert f"chmod go-w {shared}" in result.stderr and "paths.state_dir" in result.stderr


def test_a_state_folder_reached_through_a_link_in_a_folder_others_may_write_to_is_refused(tmp_path):
    """/shared (0777, not sticky) holds a link to a private folder of ours: the real path's folders are all ours,
    but another user may replace the link by one to a folder of theirs: refused, naming /shared."""
    from hpcllm.privatefs import NotPrivate, private_dir

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "me").symlink_to(private)
    state = shared / "me" / "state"
    with pytest.raises(NotPrivate, match=f"{state} lies in {shared}, which other users may write to"):
        private_dir(state, "the state folder", "choose a paths.state_dir of your own")


def test_a_state_folder_reached_through_a_link_of_another_user_is_refused(tmp_path):
    """A link in a sticky folder (/tmp) that another user made: they may replace it (it is their entry)."""
    from hpcllm.privatefs import NotPrivate, private_dir

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    link = shared / "theirs"
    link.symlink_to(private)
    os.lchown(link, 65534, 65534)  # nobody's
    state = link / "state"
    with pytest.raises(NotPrivate, match=f"{state} lies in {link}, which belongs to another user \\(uid 65534\\)"):
        private_dir(state, "the state folder", "choose a paths.state_dir of your own")


def test_a_state_folder_in_a_sticky_shared_folder_is_accepted(tmp_path):
    """A sticky folder that everyone may write to (/tmp, /var/tmp, /dev/shm) lets no one rename another's entry."""
    from hpcllm.privatefs import private_dir

    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    state = private_dir(shared / "state", "the state folder", "choose a paths.state_dir of your own")
    assert mode(state) == 0o700


def test_a_state_folder_in_a_folder_of_another_user_is_refused(tmp_path):
    """The owner of a folder above the state (neither root nor the service user) may rename it away: refused."""
    from hpcllm.privatefs import NotPrivate, private_dir

    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    state = theirs / "state"
    state.mkdir(mode=0o700)  # ours, as an admin may have made it
    os.chown(theirs, 65534, 65534)  # nobody's
    with pytest.raises(NotPrivate, match=f"{state} lies in {theirs}, which belongs to another user \\(uid 65534\\)"):
        private_dir(state, "the state folder", "choose a paths.state_dir of your own")
