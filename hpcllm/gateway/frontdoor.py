"""The gateway's front door: nginx with TLS, request buffering, timeouts and size limits (conf/nginx/hpcllm.conf).

`python -m hpcllm.gateway.frontdoor start --run-dir DIR --listen 127.0.0.1:8443` (what `make up` runs) renders
the template for this config's gateway, makes a self-signed certificate authority and a server certificate for
localhost when DIR holds none (clients verify with DIR/ca.pem), and starts nginx as its own process; `stop` ends
it. Sites with their own certificates put cert.pem / key.pem in DIR first.
"""

from __future__ import annotations

import getpass
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import click

from hpcllm.config import Config, load_config
from hpcllm.errors import ConfigError
from hpcllm.gateway.files import MULTIPART_OVERHEAD

TEMPLATE = Path(__file__).resolve().parents[2] / "conf" / "nginx" / "hpcllm.conf"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
CERT_DAYS = 365

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrontDoor:
    run_dir: Path

    @property
    def ca(self) -> Path:
        return self.run_dir / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.run_dir / "cert.pem"

    @property
    def key(self) -> Path:
        return self.run_dir / "key.pem"

    @property
    def conf(self) -> Path:
        return self.run_dir / "nginx.conf"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "nginx.pid"


def render(config: Config, door: FrontDoor, listen: str, upstream: str | None = None) -> str:
    gw = config.gateway
    values = {
        "user": getpass.getuser(),
        "run_dir": str(door.run_dir),
        "max_body_bytes": str(gw.max_request_bytes),
        "files_max_body_bytes": str(gw.files_max_bytes + MULTIPART_OVERHEAD),
        "files_max_bytes": str(gw.files_max_bytes),
        "upstream": upstream or f"{gw.host}:{gw.port}",
        "listen": listen,
        "cert": str(door.cert),
        "key": str(door.key),
        "read_timeout_seconds": str(math.ceil(max(gw.upstream_read_timeout_seconds, gw.route_timeout_seconds))),
    }
    text = TEMPLATE.read_text()
    missing = set(PLACEHOLDER.findall(text)) - set(values)
    if missing:
        raise ConfigError(f"{TEMPLATE} has placeholders nobody fills: {', '.join(sorted(missing))}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def make_self_signed(door: FrontDoor, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> None:
    """A private CA (door.ca, what clients verify against) and a server certificate it signed for `hosts`."""
    if shutil.which("openssl") is None:
        raise ConfigError("openssl is not installed: run `make host` (slurm/install-host.sh) as root")
    ca_key = door.run_dir / "ca-key.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(ca_key), "-out", str(door.ca), "-days", str(CERT_DAYS), "-subj", "/CN=hpcllm dev CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    csr = door.run_dir / "cert.csr"
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             str(door.key), "-out", str(csr), "-subj", f"/CN={hosts[0]}")
    san = ",".join(f"IP:{h}" if re.fullmatch(r"[\d.]+|[0-9a-fA-F:]+:[0-9a-fA-F:]*", h) else f"DNS:{h}"
                   for h in hosts)
    ext = door.run_dir / "cert.ext"
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                   f"extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(door.ca), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(door.cert), "-days", str(CERT_DAYS), "-extfile", str(ext))
    for leftover in (csr, ext):
        leftover.unlink()


def start(config: Config, run_dir: Path, listen: str, upstream: str | None = None,
          timeout_s: float = 15.0) -> FrontDoor:
    """Render the config, make certificates if run_dir has none, start nginx (it daemonizes) and wait for it. When
    this run folder's nginx is already running, leave it as it is."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        raise ConfigError("nginx is not installed: run `make host` (slurm/install-host.sh) as root")
    door = FrontDoor(Path(run_dir).absolute())
    if running_pid(door) is not None:  # idempotent; a stale pid file is removed, so the wait below waits for nginx's
        return door
    door.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not (door.cert.exists() and door.key.exists()):
        make_self_signed(door)
    door.conf.write_text(render(config, door, listen, upstream))
    result = subprocess.run([nginx, "-c", str(door.conf), "-p", str(door.run_dir)], capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"nginx did not start: {result.stderr.strip()}")
    deadline = time.monotonic() + timeout_s
    while not door.pid_file.exists():
        if time.monotonic() > deadline:
            raise ConfigError(f"nginx did not write {door.pid_file}; see {door.run_dir / 'nginx-error.log'}")
        time.sleep(0.05)
    return door


def _config_of_nginx(pid: int) -> Path | None:
    """The nginx.conf the live nginx `pid` was started with (its master shows `nginx: master process NGINX -c CONF
    -p DIR`); None when pid is not a live nginx."""
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() != "nginx":
            return None
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split()
    except OSError:
        return None
    return Path(words[words.index("-c") + 1]) if "-c" in words[:-1] else None


def running_pid(door: FrontDoor) -> int | None:
    """The PID in door's pid file when it is the nginx started with door's nginx.conf. A pid file naming anything else
    (left by a crash or a reboot: its PID may be another process's now, a system nginx's too) is removed, saying so,
    and that process left alone."""
    try:
        text = door.pid_file.read_text().strip()
    except FileNotFoundError:
        return None
    conf = _config_of_nginx(int(text)) if text.isdigit() else None
    if conf is not None and conf.resolve() == door.conf.resolve():
        return int(text)
    door.pid_file.unlink(missing_ok=True)
    log.warning("%s names pid %s, which is not the nginx of %s: left alone, file removed", door.pid_file,
                text[:20], door.conf)
    return None


def stop(run_dir: Path, timeout_s: float = 10.0) -> bool:
    """Stop the nginx started in run_dir (graceful: running streams finish; after timeout_s a fast stop). False when
    none was running (a stale pid file is removed, see running_pid)."""
    pid = running_pid(FrontDoor(Path(run_dir).absolute()))
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGQUIT)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    os.kill(pid, signal.SIGTERM)
    return True


@click.group()
def cli() -> None:
    """nginx in front of the gateway (conf/nginx/hpcllm.conf)."""


@cli.command("start")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None)
@click.option("--run-dir", type=click.Path(path_type=Path), required=True,
              help="Rendered nginx.conf, certificates (ca.pem for clients), pid and logs.")
@click.option("--listen", default="127.0.0.1:8443", show_default=True, help="Address nginx serves TLS on.")
def start_command(config_path: Path | None, run_dir: Path, listen: str) -> None:
    pid = running_pid(FrontDoor(run_dir.absolute()))
    if pid is not None:
        click.echo(f"nginx already running (pid {pid})", err=True)
        return
    door = start(load_config(config_path), run_dir, listen)
    click.echo(f"nginx on https://{listen} (clients verify with {door.ca})", err=True)


@cli.command("stop")
@click.option("--run-dir", type=click.Path(path_type=Path), required=True)
@click.option("--timeout-s", type=float, default=10.0, show_default=True,
              help="Seconds running streams get to finish before nginx is stopped at once.")
def stop_command(run_dir: Path, timeout_s: float) -> None:
    pid = running_pid(FrontDoor(run_dir.absolute()))
    if pid is None:
        click.echo("no nginx was running", err=True)
        return
    click.echo(f"stopping nginx (pid {pid})", err=True)
    click.echo("nginx stopped" if stop(run_dir, timeout_s) else "no nginx was running", err=True)


if __name__ == "__main__":
    from hpcllm.errors import HpcllmError

    try:
        cli.main(standalone_mode=False)
    except HpcllmError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
