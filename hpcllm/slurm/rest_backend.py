"""slurmrestd backend (openapi v0.0.38, the REST API of Slurm 22.05; JWT auth).

Every request carries X-SLURM-USER-NAME and X-SLURM-USER-TOKEN. The token comes from, in order:
`[slurm] rest_token_file`, the SLURM_JWT environment variable (what `scontrol token` prints), or
`scontrol token lifespan=...` run by this backend (renewed before it expires).

Endpoints: POST /slurm/v0.0.38/job/submit {script, job}, GET /slurm/v0.0.38/jobs (the same JSON as
`squeue --json`, parsed by the same adapter), DELETE /slurm/v0.0.38/job/{id}[?signal=NAME], GET .../nodes,
GET .../partitions, GET .../reservations (with SBATCH_RESERVATION set, for the nodes of its reservations). Node
lists go in the undocumented keys `nodelist` / `exclude_nodes` (see submission_body).
Limits of v0.0.38, reported as errors rather than ignored: no requeue; a signal reaches every step of the job and
its batch shell (no batch-only choice); the signal on submit has no "B:" prefix.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import json
import logging
import math
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from hpcllm.config import HEADER_TOKEN
from hpcllm.slurm import adapter
from hpcllm.slurm.base import (JobSpec, JobStatus, NodeInfo, PartitionInfo, ReservationInfo, SlurmBackend,
                               service_reservations, signal_name)
from hpcllm.slurm.environment import job_environment, run_slurm_command
from hpcllm.slurm.errors import (UNREACHABLE_PATTERNS, SlurmError, SlurmUnavailable, already_done, unreachable,
                                 with_setting_hint)
from hpcllm.slurm.templates import ensure_log_dirs, render_batch_script

if TYPE_CHECKING:
    from hpcllm.config import SlurmConfig

log = logging.getLogger(__name__)

SUPPORTED_API_VERSIONS = ("v0.0.38",)
_TOKEN_LIFESPAN_S = 3600
# slurmrestd's answer (HTTP 404) for a path none of its loaded openapi plugins serves.
_NO_SUCH_URL = "Unable find requested URL"
# What slurmrestd 22.05 answers a GET (slurm_load_*: HTTP 500, "Unspecified error", error -1) when slurmctld refuses
# the request's JWT (not one it signed, or another user's), measured on the dev cluster; what to check then. Error
# -1 is Slurm's generic one: other failures give it too, so the hint says so.
_REFUSED_JWT_ERROR = -1
_REFUSED_JWT_HINT = (" (slurmrestd answers so, among other failures, when slurmctld refuses the JWT: one it did not "
                     "sign, or not user {user!r}'s ([slurm] rest_user); check where the token comes from: [slurm] "
                     "rest_token_file, $SLURM_JWT, else scontrol token)")
# Signal names the v0.0.38 schema accepts in DELETE /job/{id}?signal=.
_REST_SIGNALS = {"HUP", "INT", "QUIT", "ABRT", "KILL", "ALRM", "TERM", "USR1", "USR2", "URG", "CONT", "STOP", "TSTP",
                 "TTIN", "TTOU"}


WHAT_A_JWT_SOURCE_HOLDS = "it must hold what `scontrol token` prints, once"


def _one_jwt(token: str, where: str, fix: str = WHAT_A_JWT_SOURCE_HOLDS) -> str:
    """`token` when it can be a JWT (HEADER_TOKEN); else SlurmError naming `where` and saying `fix`, never showing
    what it holds."""
    if not token:
        raise SlurmError(f"{where} is empty; {fix}")
    if not HEADER_TOKEN.fullmatch(token):
        raise SlurmError(f"{where} holds more than a JWT: spaces, line breaks or characters other than printable "
                         f"ASCII, which no JWT has; {fix}")
    return token


def jwt_expiry(token: str) -> float | None:
    """The "exp" claim of a JWT (epoch seconds), read without checking its signature (slurmctld does that); None
    for a token without one or that is no JWT (slurmrestd judges it)."""
    try:
        claims = token.split(".")[1]
        exp = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4))).get("exp")
    except (IndexError, ValueError, AttributeError, binascii.Error):
        return None
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        return None
    try:
        expiry = float(exp)
    except OverflowError:  # an integer past float's range: no expiry we could reach
        return None
    return expiry if math.isfinite(expiry) else None  # NaN, Infinity (json reads them): no usable expiry


def _unexpired(token: str, where: str) -> float | None:
    """The token's "exp" (jwt_expiry), unless it is past: slurmrestd 22.05 answers such a token with HTTP 500
    "Unspecified error" (GET /jobs) or "Zero Bytes were transmitted or received" (a submit: it would read as Slurm
    unreachable), never saying why. A SlurmError naming `where`, never showing the token."""
    expiry = jwt_expiry(token)
    if expiry is not None and time.time() >= expiry:
        try:
            when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(expiry))
        except (OverflowError, OSError, ValueError):  # an exp far out of the calendar's range
            when = f"exp {expiry:.0f} (epoch seconds)"
        raise SlurmError(f"{where} holds a JWT that expired at {when}, which slurmrestd refuses: put a new one there "
                         f"(`scontrol token lifespan=SECONDS`; [slurm] rest_token_file is reread every minute), or "
                         f"set neither so hpcllm gets its own from scontrol token and renews it")
    return expiry


class RestBackend(SlurmBackend):
    name = "rest"

    def __init__(self, config: SlurmConfig, *, transport: httpx.BaseTransport | None = None,
                 timeout: float | None = None):
        if config.rest_api_version not in SUPPORTED_API_VERSIONS:
            raise SlurmError(f"[slurm] rest_api_version = {config.rest_api_version!r} is not supported by this "
                             f"backend (supported: {', '.join(SUPPORTED_API_VERSIONS)}); use backend = \"cli\"")
        self.base_url = config.rest_url.rstrip("/")
        self.api_version = config.rest_api_version
        self.api = f"/slurm/{self.api_version}"
        self.user = getattr(config, "rest_user", None) or getpass.getuser()
        self._token_file: Path | None = getattr(config, "rest_token_file", None)
        self._token: str | None = None
        self._token_expires = 0.0  # monotonic: when the token is read again (or renewed)
        self._token_exp: float | None = None  # the token's own "exp" (epoch seconds), read once with the token
        self._token_lock = threading.Lock()
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout or getattr(config, "command_timeout_seconds", None) or 60.0,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    # ----------------------------------------------------------------------------------------------- tokens

    def _auth_headers(self) -> dict[str, str]:
        return {"X-SLURM-USER-NAME": self.user, "X-SLURM-USER-TOKEN": self._current_token()}

    def _current_token(self) -> str:
        with self._token_lock:
            if (self._token and time.monotonic() < self._token_expires
                    and (self._token_exp is None or time.time() < self._token_exp)):
                return self._token
            if self._token_file is not None:
                where = f"[slurm] rest_token_file {self._token_file}"
                try:  # not UTF-8: refused by _one_jwt like any other non-ASCII character
                    token = Path(self._token_file).read_text(errors="replace").strip().removeprefix("SLURM_JWT=")
                except OSError as exc:
                    raise SlurmError(f"{where}: {exc.strerror}") from None
                token = _one_jwt(token, where)
                self._token_exp = _unexpired(token, where)
                self._token, self._token_expires = token, time.monotonic() + 60  # reread: it may be rotated
            elif os.environ.get("SLURM_JWT"):
                token = _one_jwt(os.environ["SLURM_JWT"].strip(), "$SLURM_JWT")
                self._token_exp = _unexpired(token, "$SLURM_JWT")
                self._token, self._token_expires = token, time.monotonic() + 60
            else:
                self._token = _scontrol_token(_TOKEN_LIFESPAN_S)
                self._token_exp = jwt_expiry(self._token)
                self._token_expires = time.monotonic() + _TOKEN_LIFESPAN_S / 2
            return self._token

    # ---------------------------------------------------------------------------------------------- requests

    def _request(self, method: str, path: str, *, json: Any = None, params: dict | None = None,
                 done: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """The answer's JSON; SlurmError (SlurmUnavailable) for an error. done: whether an answer with errors
        beside it still did the work (a submit with its job id): then it is returned, errors and all."""
        url = f"{self.api}{path}"
        try:
            response = self._http.request(method, url, json=json, params=params, headers=self._auth_headers())
        except httpx.TimeoutException:
            raise SlurmUnavailable(f"slurmrestd at {self.base_url} did not answer {method} {url} in time") from None
        except httpx.HTTPError as exc:
            raise SlurmUnavailable(f"slurmrestd at {self.base_url} is not reachable ({type(exc).__name__}: {exc}); "
                                   f"is it running? ([slurm] rest_url)") from None
        payload = _json_body(response)
        errors = adapter.errors_from_json(payload) if payload is not None else []
        if response.status_code in (401, 403):
            raise SlurmError(f"slurmrestd refused the credentials of user {self.user!r} (HTTP "
                             f"{response.status_code}): check [slurm] rest_user and the JWT (scontrol token)",
                             "; ".join(errors) or response.text[:200])
        if response.status_code == 404 and _NO_SUCH_URL in response.text:
            raise SlurmError(f"slurmrestd at {self.base_url} does not serve openapi {self.api_version} "
                             f"({method} {url}: {response.text[:200].strip()}): it serves only the versions of its "
                             f"Slurm release it was started with (-s openapi/{self.api_version}; Slurm 24.05 and "
                             f"later have none this backend speaks); start it so, or set [slurm] backend = \"cli\"",
                             response.text[:300])
        if response.status_code < 400 and errors and done is not None and payload is not None and done(payload):
            return payload
        if response.status_code >= 400 or errors:
            message = "; ".join(errors) or f"HTTP {response.status_code}: {response.text[:300].strip()}"
            if response.status_code in (502, 503, 504) or UNREACHABLE_PATTERNS.search(message):
                raise unreachable(f"slurmrestd {method} {url}", message)
            jwt_refused = method == "GET" and payload is not None and any(
                isinstance(error, dict) and error.get("error_number") == _REFUSED_JWT_ERROR
                for error in payload.get("errors") or ())
            hint = _REFUSED_JWT_HINT.format(user=self.user) if jwt_refused else ""
            raise SlurmError(f"slurmrestd {method} {url}: {message}{hint}", message)
        if payload is None:
            # A POST or DELETE may have taken effect before its answer was garbled: its answer is lost, as after
            # a timeout (a submitting caller keeps its intent and finds the job by its comment).
            lost = SlurmError if method == "GET" else SlurmUnavailable
            raise lost(f"slurmrestd {method} {url} answered HTTP {response.status_code} without JSON: "
                       f"{response.text[:200]!r}")
        return payload

    # ------------------------------------------------------------------------------------------- interface

    def submit(self, spec: JobSpec) -> str:
        body = submission_body(spec)
        ensure_log_dirs(spec)  # slurmrestd's jobs usually share this filesystem; Slurm creates no folders
        try:
            # HTTP 200 with a job id beside errors is a job Slurm queued (22.05: "Requested reservation not usable
            # now" for a reservation that starts later); a refusal is HTTP 500 without one.
            payload = self._request("POST", "/job/submit", json=body, done=lambda answer: _submitted_id(answer) > 0)
        except SlurmError as exc:
            raise with_setting_hint(exc, spec) from None
        job_id = _submitted_id(payload)
        if job_id <= 0:  # accepted, so the job likely exists: its answer is lost, not refused
            raise SlurmUnavailable(f"slurmrestd accepted the job but returned no job_id: {str(payload)[:300]}")
        said = adapter.errors_from_json(payload)
        if said:  # as sbatch's stderr for a job it accepted: the job may differ from what was asked
            log.warning("slurmrestd accepted job %s (%s) with: %s", job_id, spec.name, "; ".join(said))
        return str(job_id)

    def statuses(self, job_ids: list[str] | tuple[str, ...]) -> dict[str, JobStatus]:
        wanted = [str(job_id) for job_id in job_ids]
        if not wanted:
            return {}
        listed = self._jobs(wanted)
        return {
            job_id: listed.get(job_id) or adapter.missing_status(
                job_id, "Slurm no longer lists this job (it ended more than MinJobAge ago)")
            for job_id in wanted
        }

    def list_jobs(self) -> dict[str, JobStatus]:
        return self._jobs()

    def _jobs(self, wanted: list[str] | tuple[str, ...] = ()) -> dict[str, JobStatus]:
        """GET /jobs: every job slurmctld holds; the wanted array tasks / het components also by those ids."""
        return adapter.jobs_from_json(self._request("GET", "/jobs"), wanted=wanted)

    def cancel(self, job_id: str) -> None:
        try:
            self._request("DELETE", f"/job/{job_id}")
        except SlurmError as exc:
            if not already_done(exc):
                raise

    def requeue(self, job_id: str) -> None:
        raise SlurmError(
            f"cannot requeue job {job_id}: slurmrestd's openapi {self.api_version} (Slurm 22.05) has "
            f"no requeue operation; use backend = \"cli\" (scontrol requeue) for requeues")

    def signal(self, job_id: str, sig: str, batch_only: bool = True) -> None:
        name = signal_name(sig)
        if name not in _REST_SIGNALS:
            raise SlurmError(f"slurmrestd {self.api} cannot send SIG{name} (it accepts {', '.join(sorted(_REST_SIGNALS))})")
        # v0.0.38 signals the batch shell and every step alike; batch_only cannot be honoured, and the node
        # agent template drains on the signal wherever it arrives.
        self._request("DELETE", f"/job/{job_id}", params={"signal": name})

    def nodes(self) -> list[NodeInfo]:
        return adapter.with_reservations(adapter.nodes_from_json(self._request("GET", "/nodes")), self.reservations)

    def reservations(self) -> list[ReservationInfo]:
        return adapter.reservations_from_json(self._request("GET", "/reservations"))

    def partitions(self) -> list[PartitionInfo]:
        return adapter.partitions_from_json(self._request("GET", "/partitions"))


def _submitted_id(payload: dict[str, Any]) -> int:
    """The job id of a submit's answer; 0 for none."""
    job_id = adapter.number(payload.get("job_id"))
    return job_id if isinstance(job_id, int) and not isinstance(job_id, bool) else 0


def submission_body(spec: JobSpec) -> dict[str, Any]:
    """JobSpec -> the v0.0.38 POST /job/submit body (script + job properties).

    `nodelist` and `exclude_nodes` are not in v0.0.38's published schema, but 22.05's slurmrestd passes keys it does
    not list to Slurm's own option parser, which knows them (sbatch's --nodelist and --exclude): measured on
    22.05.8, the job gets ReqNodeList / ExcNodeList and runs there. The schema's own names are refused ("Disabled
    key: required_nodes", "Disabled key: excluded_nodes"), and #SBATCH lines in the script are ignored.
    """
    job: dict[str, Any] = {
        "name": spec.name,
        "nodes": [spec.nodes, spec.nodes],
        "requeue": spec.requeue,
        "environment": job_environment(spec.env, spec.inherit),
        "current_working_directory": spec.chdir or os.getcwd(),
    }
    optional = {
        "partition": spec.partition,
        "account": spec.account,
        "qos": spec.qos,
        "time_limit": spec.time_minutes,
        "tasks": spec.ntasks,
        "tasks_per_node": spec.ntasks_per_node,
        "cpus_per_task": spec.cpus_per_task,
        "gres": spec.gres_request,
        "memory_per_node": spec.mem_mb,
        "constraints": spec.constraint,
        "prefer": spec.prefer,
        "nodelist": ",".join(spec.nodelist) or None,
        "exclude_nodes": ",".join(spec.exclude) or None,
        "signal": spec.signal,  # "USR1@60": v0.0.38 takes no "B:" prefix
        "standard_output": spec.output,
        "standard_error": spec.error,
        "open_mode": "append" if spec.open_mode_append else None,
        "comment": spec.comment,
        # sbatch reads SBATCH_RESERVATION itself, slurmrestd not from the job's environment: nodes() offers only
        # the nodes of the service's reservations, so its jobs must ask for them.
        "reservation": ",".join(service_reservations()) or None,
    }
    job.update({key: value for key, value in optional.items() if value is not None})
    if spec.ntasks is None and spec.ntasks_per_node is not None:
        job["tasks"] = spec.ntasks_per_node * spec.nodes
    return {"script": render_batch_script(spec), "job": job}


def _json_body(response: httpx.Response) -> dict[str, Any] | None:
    """The answer's JSON object; None when there is none. Undecodable bytes become U+FFFD: GET /jobs lists every
    user's job names, in whatever encoding each was submitted with, and one must not hide all the others."""
    try:
        payload = json.loads(response.content.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def _scontrol_token(lifespan: int) -> str:
    try:
        result = run_slurm_command(["scontrol", "token", f"lifespan={lifespan}"], timeout=30)
    except FileNotFoundError:
        raise SlurmUnavailable("no JWT for slurmrestd: set SLURM_JWT or [slurm] rest_token_file (scontrol, which "
                               "could make one, is not installed here)") from None
    except OSError as exc:  # not executable, a broken interpreter line
        raise SlurmUnavailable(f"no JWT for slurmrestd: scontrol, which would make one, cannot be run "
                               f"({exc.strerror or exc}); set SLURM_JWT or [slurm] rest_token_file") from None
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable("scontrol token did not answer within 30 s; is slurmctld up?") from None
    out = result.stdout.strip()
    said = result.stderr.strip() or out
    if result.returncode != 0 and UNREACHABLE_PATTERNS.search(said):  # slurmctld, which signs tokens, is down
        raise unreachable("no JWT for slurmrestd: scontrol token", said)
    if result.returncode != 0 or not out.startswith("SLURM_JWT="):
        raise SlurmError(f"could not get a JWT for slurmrestd with scontrol token: "
                         f"{result.stderr.strip() or out or 'no output'} (is AuthAltTypes=auth/jwt set?)")
    return _one_jwt(out.removeprefix("SLURM_JWT=").strip(), "what `scontrol token` printed after SLURM_JWT=",
                    "the scontrol on PATH may be a site's wrapper: set SLURM_JWT or [slurm] rest_token_file to the "
                    "JWT alone")
