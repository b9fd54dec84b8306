"""The default backend: Slurm's own commands (sbatch, squeue, sacct, scancel, scontrol, sinfo).

- submit: the rendered batch script on sbatch's stdin, `sbatch --parsable <its #SBATCH options>` (prints `jobid`
  or `jobid;cluster`; the last such line counts). The options go on the command line too because there they beat
  SBATCH_* variables of the controller's environment, which beat #SBATCH lines (sbatch(1));
- statuses: ONE `squeue --json` for all jobs (falling back to a pinned `squeue -O` text format when --json fails),
  then ONE `sacct` for the jobs squeue no longer lists when accounting is on;
- list_jobs: the same squeue call (comments are in the JSON; the text fallback asks a second `squeue -O
  JobID,Comment`);
- nodes: `sinfo --json` (22.05-23.11 shape), `scontrol show nodes --json` (23.02+), else `scontrol -d -o show node`;
- partitions: `scontrol -o show partition`; with SBATCH_RESERVATION set, nodes() reads every reservation with one
  `scontrol -o show reservation` (the service's jobs run on its reservations' nodes only: NodeInfo.available);
- estimate_start: the rendered script on `sbatch --test-only` (prints "Job N to start at T using P processors on
  nodes X in partition Y"; nothing is submitted); pending_start_times: `squeue --start` for our queued jobs;
- job_end (a model pool's agent, of its own job): `squeue --jobs=N` in the same pinned text format.
Every command runs with the user's output-shaping variables removed (SQUEUE_FORMAT, SINFO_FORMAT, SACCT_FORMAT,
SLURM_TIME_FORMAT, ...; and scancel's SCANCEL_*) and SLURM_TIME_FORMAT=%s, so a personal setting cannot break
parsing or what a command does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from hpcllm.errors import ConfigError
from hpcllm.slurm import adapter
from hpcllm.slurm.base import (JobSpec, JobState, JobStatus, NodeInfo, PartitionInfo, ReservationInfo, SlurmBackend,
                               StartEstimate, signal_name)
from hpcllm.slurm.environment import inherited_sbatch_options, run_slurm_command
from hpcllm.slurm.errors import (UNREACHABLE_PATTERNS, SlurmError, SlurmUnavailable, already_done, unreachable,
                                 with_setting_hint)
from hpcllm.slurm.templates import ensure_log_dirs, render_batch_script, sbatch_directives

if TYPE_CHECKING:
    from hpcllm.config import SlurmConfig

log = logging.getLogger(__name__)

# sacct's words for a site without job accounting (AccountingStorageType=accounting_storage/none, or no storage
# plugin), which do not change while slurmctld runs. Not "Problem talking to the database": that is slurmdbd
# unreachable for now (down, restarting, its host timing out), after which sacct answers again.
_ACCOUNTING_OFF = re.compile(r"accounting storage is disabled|unable to initialize storage plugin", re.IGNORECASE)
_ACCOUNTING_UNREACHABLE = re.compile(r"Problem talking to the database", re.IGNORECASE)
# How long a job squeue no longer lists stays UNKNOWN (not ended) while sacct cannot answer for it: squeue forgets
# only ended jobs, so after this it is reported missing (ended, its end state unknown) and its allocation let go.
SACCT_UNREACHABLE_GRACE_SECONDS = 600.0


class CliBackend(SlurmBackend):
    name = "cli"

    def __init__(self, config: SlurmConfig | None = None, *, command_timeout: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._timeout = command_timeout or (getattr(config, "command_timeout_seconds", None) or 60.0)
        self._clock = clock
        # None: not tried yet; False: the site has no accounting (sacct refuses), do not ask again.
        self._accounting: bool | None = None
        # Jobs squeue no longer lists that sacct could not answer for, and since when (cleared once sacct answers).
        self._sacct_unanswered_since: dict[str, float] = {}
        self._squeue_json = True
        self._sinfo_json = True
        self._inherited_logged: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------- commands

    def _run(self, args: list[str], *, stdin: str | None = None, env: dict[str, str] | None = None,
             inherit: tuple[str, ...] | None = None) -> subprocess.CompletedProcess[str]:
        command = " ".join(args[:2])
        try:
            result = run_slurm_command(args, stdin=stdin, env=env, inherit=inherit, timeout=self._timeout)
        except FileNotFoundError:
            raise SlurmUnavailable(
                f"{args[0]}: command not found; install Slurm's client commands (Debian: slurm-client) and put "
                f'them on PATH, or set [slurm] backend = "rest" to use slurmrestd') from None
        except OSError as exc:  # not executable, a broken interpreter line, no memory to start it
            raise SlurmUnavailable(f"{args[0]} cannot be run: {exc.strerror or exc} (check it with: "
                                   f"type {args[0]}; ls -l \"$(command -v {args[0]})\")") from None
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"{command} did not answer within {self._timeout:.0f} s; is slurmctld up? "
                                   f"(check with: scontrol ping)") from None
        if result.returncode < 0:  # killed (the OOM killer, a site wrapper's limit): it may have done its work
            raise SlurmUnavailable(f"{command} was killed by {_signal_text(-result.returncode)} before it "
                                   f"answered; what it did is unknown "
                                   f"({(result.stderr or '').strip()[:200] or 'no message'})")
        if result.returncode != 0:
            message = _message(result)
            if UNREACHABLE_PATTERNS.search(message):
                raise unreachable(command, message)
            raise SlurmError(f"{command} failed: {message}", message)
        return result

    # ------------------------------------------------------------------------------------------ interface

    def submit(self, spec: JobSpec) -> str:
        ensure_log_dirs(spec)
        result = self._sbatch("--parsable", spec)
        job_id = parse_parsable(result.stdout)
        if result.stderr.strip():  # e.g. "Ignoring --ntasks-per-node", a job_submit plugin's notice: the job differs
            log.warning("sbatch accepted job %s (%s) with: %s", job_id, spec.name, " | ".join(
                line.strip() for line in result.stderr.splitlines() if line.strip()))
        return job_id

    def statuses(self, job_ids: list[str] | tuple[str, ...]) -> dict[str, JobStatus]:
        wanted = [str(job_id) for job_id in job_ids]
        if not wanted:
            return {}
        listed = self._squeue_all(wanted)
        answer = {job_id: listed[job_id] for job_id in wanted if job_id in listed}
        missing = [job_id for job_id in wanted if job_id not in listed]
        if missing:
            try:
                from_accounting = self._sacct(missing)
            except SlurmUnavailable as exc:  # squeue's answers for the other jobs still hold
                answer.update(self._unanswered(missing, exc))
                return answer
            self._sacct_unanswered_since.clear()  # sacct answers again
            for job_id in missing:
                answer[job_id] = from_accounting.get(job_id) or adapter.missing_status(
                    job_id, "Slurm no longer lists this job (it ended more than MinJobAge ago)"
                    + ("" if self._accounting else " and job accounting is off, so its end state is unknown"))
        return answer

    def _unanswered(self, job_ids: list[str], exc: SlurmUnavailable) -> dict[str, JobStatus]:
        """Jobs squeue no longer lists while sacct cannot be asked: not ended yet as far as callers know (UNKNOWN,
        not missing), for SACCT_UNREACHABLE_GRACE_SECONDS; then missing, so nobody waits on slurmdbd forever."""
        now = self._clock()
        new = [job_id for job_id in job_ids if job_id not in self._sacct_unanswered_since]
        if new:
            log.warning("squeue no longer lists jobs %s and sacct cannot tell their end for now: %s",
                        ", ".join(new), exc)
        answer = {}
        for job_id in job_ids:
            waited = now - self._sacct_unanswered_since.setdefault(job_id, now)
            if waited >= SACCT_UNREACHABLE_GRACE_SECONDS:
                answer[job_id] = adapter.missing_status(
                    job_id, f"Slurm no longer lists this job and for {waited:.0f} s sacct could not tell its end: "
                            f"{exc}")
            else:
                answer[job_id] = JobStatus(job_id=job_id, state=JobState.UNKNOWN,
                                           reason=f"Slurm no longer lists this job; sacct cannot tell its end yet: "
                                                  f"{exc}")
        return answer

    def list_jobs(self) -> dict[str, JobStatus]:
        listed = self._squeue_from_json()
        if listed is not None:
            return listed  # the JSON carries comments
        listed = self._squeue_text()
        comments = adapter.comments_from_squeue_text(self._run(
            ["squeue", "--noheader", "--all", "--states=all", "--array",
             f"--Format={adapter.SQUEUE_COMMENT_FORMAT}"]).stdout)
        return {job_id: dataclasses.replace(status, comment=comments.get(job_id))
                for job_id, status in listed.items()}

    def cancel(self, job_id: str) -> None:
        try:
            self._run(["scancel", str(job_id)])
        except SlurmError as exc:
            if not already_done(exc):
                raise

    def requeue(self, job_id: str) -> None:
        self._run(["scontrol", "requeue", str(job_id)])

    def signal(self, job_id: str, sig: str, batch_only: bool = True) -> None:
        target = "--batch" if batch_only else "--full"
        self._run(["scancel", f"--signal={signal_name(sig)}", target, str(job_id)])

    def nodes(self) -> list[NodeInfo]:
        return adapter.with_reservations(self._nodes(), self.reservations)

    def _nodes(self) -> list[NodeInfo]:
        if self._sinfo_json:
            with contextlib.suppress(_JsonAnsweredErrors):  # the text format this time only
                payload = self._json(["sinfo", "--json"])
                if payload is not None and "nodes" in payload:
                    return adapter.nodes_from_json(payload)
                if payload is not None:  # 24.05+: sinfo --json groups nodes; scontrol lists them one by one
                    nodes = self._json(["scontrol", "show", "nodes", "--json"])
                    if nodes is not None and "nodes" in nodes:
                        return adapter.nodes_from_json(nodes)
                self._sinfo_json = False
        return adapter.nodes_from_scontrol_text(self._run(["scontrol", "-d", "-o", "show", "node"]).stdout)

    def partitions(self) -> list[PartitionInfo]:
        return adapter.partitions_from_scontrol_text(self._run(["scontrol", "-o", "show", "partition"]).stdout)

    def reservations(self) -> list[ReservationInfo]:
        return adapter.reservations_from_scontrol_text(self._run(["scontrol", "-o", "show", "reservation"]).stdout)

    def estimate_start(self, spec: JobSpec) -> StartEstimate | None:
        result = self._sbatch("--test-only", spec)
        return parse_test_only(result.stderr + "\n" + result.stdout)

    def pending_start_times(self, job_ids: list[str] | tuple[str, ...]) -> dict[str, StartEstimate]:
        if not job_ids:
            return {}
        result = self._run(["squeue", "--start", "--noheader", "--states=PENDING", f"--jobs={','.join(job_ids)}",
                            "--format=%i|%S|%Y|%P"])
        return parse_squeue_start(result.stdout)

    def job_end(self, job_id: str) -> float | None:
        """When one job ends as slurmctld says now (Unix time; `scontrol update TimeLimit=` moves it while the job
        runs, so a model pool's agent asks again and again); None for a job without a time limit. SlurmError when
        squeue does not list the job, SlurmUnavailable (with its hint) when squeue cannot be asked."""
        result = self._run(["squeue", f"--jobs={job_id}", "--noheader", f"--Format={adapter.SQUEUE_TEXT_FORMAT}"])
        status = adapter.jobs_from_squeue_text(result.stdout).get(str(job_id))
        if status is None:
            raise SlurmError(f"squeue does not list job {job_id}")
        return status.end_time if status.time_limit is not None else None

    # ------------------------------------------------------------------------------------------- internals

    def _sbatch(self, mode: str, spec: JobSpec) -> subprocess.CompletedProcess[str]:
        """sbatch with the script on stdin and its #SBATCH options repeated on the command line, where they beat
        the SBATCH_* variables of our environment (an option hpcllm leaves unset may still come from there)."""
        inherited = inherited_sbatch_options()
        if inherited and inherited != self._inherited_logged:
            self._inherited_logged = inherited
            log.warning("sbatch takes %s from hpcllm's environment for every job it submits (where hpcllm sets no "
                        "such option itself); unset them where that is not meant",
                        ", ".join(f"{name}={value}" for name, value in inherited.items()))
        try:
            return self._run(["sbatch", mode, *sbatch_directives(spec)], stdin=render_batch_script(spec),
                             env=dict(spec.env), inherit=spec.inherit)  # --export=ALL: sbatch's environment
        except SlurmError as exc:
            raise with_setting_hint(exc, spec) from None

    def _json(self, args: list[str]) -> dict | None:
        """Run a --json command; None when this Slurm cannot (old version, no data_parser plugin), so the text
        format is used from then on; _JsonAnsweredErrors when it answered errors, for the text format this time."""
        try:
            result = self._run(args)
        except SlurmUnavailable:
            raise
        except SlurmError as exc:
            log.info("%s failed (%s); using the text format instead", " ".join(args), exc.slurm_message)
            return None
        try:
            payload = json.loads(result.stdout)
        except json.JSONDecodeError:
            log.info("%s printed no JSON; using the text format instead", " ".join(args))
            return None
        if not isinstance(payload, dict):
            return None
        # 22.05's --json exits 0 when it could not ask slurmctld: an "errors" list beside an EMPTY job/node list,
        # which must not read as "no jobs" (every job would look gone).
        errors = "; ".join(adapter.errors_from_json(payload))
        if errors and UNREACHABLE_PATTERNS.search(errors):
            raise unreachable(" ".join(args[:2]), errors)
        if errors:
            log.info("%s answered errors (%s); using the text format this time", " ".join(args), errors)
            raise _JsonAnsweredErrors(errors)
        return payload

    def _squeue_all(self, wanted: list[str] | tuple[str, ...] = ()) -> dict[str, JobStatus]:
        """Every job slurmctld still holds (all users, all partitions, all states), in one call; the wanted array
        tasks and heterogeneous components also under "A_T" / "H+O"."""
        listed = self._squeue_from_json(wanted)
        return listed if listed is not None else self._squeue_text(wanted)

    def _squeue_from_json(self, wanted: list[str] | tuple[str, ...] = ()) -> dict[str, JobStatus] | None:
        """_squeue_all() from `squeue --json`; None when the text format is to be used (this time or for good)."""
        if not self._squeue_json:
            return None
        with contextlib.suppress(_JsonAnsweredErrors):
            payload = self._json(["squeue", "--json", "--all", "--states=all"])
            if payload is not None and "jobs" in payload:
                return adapter.jobs_from_json(payload, wanted=wanted)
            self._squeue_json = False
        return None

    def _squeue_text(self, wanted: list[str] | tuple[str, ...] = ()) -> dict[str, JobStatus]:
        result = self._run(["squeue", "--noheader", "--all", "--states=all", "--array",
                            f"--Format={adapter.SQUEUE_TEXT_FORMAT}"])
        return adapter.jobs_from_squeue_text(result.stdout, wanted=wanted)

    def _sacct(self, job_ids: list[str]) -> dict[str, JobStatus]:
        if self._accounting is False:
            return {}
        try:
            result = self._run(["sacct", "--allocations", "--noheader", "--parsable2", "--duplicates",
                                f"--jobs={','.join(job_ids)}", f"--format={','.join(adapter.SACCT_FIELDS)}"])
        except SlurmUnavailable:
            raise
        except SlurmError as exc:
            if _ACCOUNTING_OFF.search(exc.slurm_message):
                log.info("job accounting is off (%s); finished jobs are known only while squeue lists them",
                         exc.slurm_message)
                self._accounting = False
                return {}
            if _ACCOUNTING_UNREACHABLE.search(exc.slurm_message):
                raise SlurmUnavailable(f"sacct cannot reach slurmdbd: {exc.slurm_message} (check with: sacctmgr ping)",
                                       exc.slurm_message) from None
            raise
        self._accounting = True
        return adapter.jobs_from_sacct_text(result.stdout)


# A job id line: "jobid" or "jobid;cluster" (--parsable), or "Submitted batch job N" where a site's sbatch wrapper
# drops --parsable.
_JOB_ID_LINE = re.compile(r"^(\d+(?:_\d+)?)(?:;\S+)?$|^Submitted batch job (\d+)(?: on cluster \S+)?$")


class _JsonAnsweredErrors(Exception):
    """A --json command answered an errors list that does not say Slurm is unreachable (a passing failure): the
    text format is used for this call, --json again for the next."""


def parse_parsable(stdout: str) -> str:
    """What sbatch printed when it exited 0 -> the job id, from the last job id line (site wrappers add notices).

    No such line is SlurmUnavailable, not a refusal: sbatch succeeded, so the job most likely exists and only its
    id is lost; the controller keeps its intent and finds the job by its comment."""
    for line in reversed(stdout.splitlines()):
        match = _JOB_ID_LINE.match(line.strip())
        if match:
            return match[1] or match[2]
    raise SlurmUnavailable(f"sbatch succeeded but printed no job id ({stdout.strip()[:200] or 'nothing'!r}); the "
                           f"job may exist: look for it with squeue --me", stdout)


_TEST_ONLY = re.compile(r"Job (?P<job>\d+) to start at (?P<time>\S+) using (?P<cpus>\d+) processors on nodes? "
                        r"(?P<nodes>\S+)(?: in partition (?P<partition>\S+))?")


def parse_test_only(text: str) -> StartEstimate | None:
    """`sbatch --test-only` output (SLURM_TIME_FORMAT=%s, so the time is epoch seconds) -> StartEstimate; None when
    the line is not there."""
    match = _TEST_ONLY.search(text)
    if match is None:
        return None
    start = _epoch(match["time"])
    if start is None:
        return None
    return StartEstimate(start_time=start, source="test-only", nodes=tuple(adapter.expand_hostlist(match["nodes"])),
                         partition=match["partition"])


def parse_squeue_start(text: str) -> dict[str, StartEstimate]:
    """`squeue --start --format=%i|%S|%Y|%P` -> {job id: StartEstimate} for jobs with an expected start (Slurm
    prints N/A while it has none)."""
    estimates = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 4 or not parts[0]:
            continue
        start = _epoch(parts[1])
        if start is not None:
            nodes = tuple(adapter.expand_hostlist(parts[2])) if parts[2] not in ("", "(null)", "N/A") else ()
            estimates[parts[0]] = StartEstimate(start_time=start, source="squeue-start", nodes=nodes,
                                                partition=parts[3] or None)
    return estimates


def _epoch(text: str) -> float | None:
    """An epoch-seconds time as Slurm prints it with SLURM_TIME_FORMAT=%s; None for N/A, Unknown and the like."""
    return float(text) if text.isdigit() and int(text) > 0 else None


def _signal_text(number: int) -> str:
    try:
        return f"SIG{signal_name(number)}"
    except ConfigError:  # a number no signal has
        return f"signal {number}"


def _message(result: subprocess.CompletedProcess[str]) -> str:
    text = (result.stderr or "").strip() or (result.stdout or "").strip()
    return text or f"exit status {result.returncode} without a message"
