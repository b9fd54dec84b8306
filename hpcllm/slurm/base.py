"""The one interface every Slurm backend implements, and its typed inputs and results.

Modelled on submitit (one backend per way of talking to the scheduler, a job description rendered to a batch
script, a batched status watcher) and dask-jobqueue (a declarative job description). The controller only sees
`SlurmBackend`; `get_backend(config.slurm)` (hpcllm.slurm.factory) picks the CLI, slurmrestd or pyslurm
implementation.

Results are frozen dataclasses; the job description (user input, partly from config files) is a pydantic model
so a bad value is refused with a message that names the field before anything reaches Slurm.
"""

from __future__ import annotations

import abc
import enum
import functools
import re
import signal as signal_module  # not `signal`: JobSpec and SlurmBackend have members of that name
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hpcllm.config import SLURM_MAX_SIGNAL_SECONDS, WALLTIME_PATTERN, Config, signal_name
from hpcllm.errors import ConfigError
from hpcllm.slurm.environment import service_reservations

# Values that end up on an `#SBATCH` line or in a REST field: no whitespace, no newline, nothing a shell or the
# directive parser would split.
SLURM_TOKEN_PATTERN = r"^[A-Za-z0-9_.,:+@%/=-]+$"
# A Slurm job id as programs see it: a number, an array task (12_3) or a heterogeneous component (12+1).
JOB_ID_PATTERN = r"^\d+([_+]\d+)?$"
_SIGNAL = re.compile(r"^(?:SIG)?([A-Z0-9]+)@(\d+)$")
_MEMORY = re.compile(r"^(\d+)([KMGT]?)$", re.IGNORECASE)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class JobState(str, enum.Enum):
    """A job's state, normalized across Slurm versions and backends (Slurm's finer states map onto these)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETING = "COMPLETING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    PREEMPTED = "PREEMPTED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    REQUEUED = "REQUEUED"
    UNKNOWN = "UNKNOWN"

    @property
    def is_terminal(self) -> bool:
        """The job will not run (again): its allocation is gone for good."""
        return self in _TERMINAL_STATES

    @property
    def is_active(self) -> bool:
        """The job holds (or is about to hold) its allocation."""
        return self in (JobState.RUNNING, JobState.COMPLETING)


_TERMINAL_STATES = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.PREEMPTED, JobState.TIMEOUT,
     JobState.NODE_FAIL}
)


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: JobState
    # Slurm's own state word (e.g. "CONFIGURING", "OUT_OF_MEMORY", "REQUEUE_HOLD") before normalization.
    raw_state: str = ""
    nodes: tuple[str, ...] = ()
    reason: str | None = None
    name: str | None = None
    partition: str | None = None
    # Epoch seconds; None when unknown or not yet set (pending jobs have no start time).
    start_time: float | None = None
    # For running jobs Slurm's expected end (start + time limit); for finished jobs the real end.
    end_time: float | None = None
    # Seconds; None for no limit.
    time_limit: int | None = None
    # How often Slurm requeued the job (preemption, `scontrol requeue`); the job keeps its id.
    restart_count: int = 0
    exit_code: int | None = None
    # True when Slurm no longer knows the job (purged after MinJobAge and no accounting to ask).
    missing: bool = False
    # The job's --comment (the controller tags its allocations with one); None when unset or not asked for.
    comment: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.missing or self.state.is_terminal

    @property
    def held(self) -> bool:
        """Queued but held: it starts only when someone releases it (`scontrol release`), never by itself."""
        return self.state in (JobState.PENDING, JobState.REQUEUED) and (
            self.raw_state == "REQUEUE_HOLD" or bool(_HELD_REASON.search(self.reason or "")))

    @property
    def held_after_failed_launch(self) -> bool:
        """Held by Slurm itself, after its launch failed (a node's prolog, a node dying as the job started), not by
        anyone who meant to hold it."""
        return self.held and LAUNCH_FAILED_HELD in (self.reason or "")


# Slurm's reason for a job whose launch failed and that it requeued held.
LAUNCH_FAILED_HELD = "launch failed requeued held"
# Slurm's reasons for a held job: that one, and `scontrol hold` by an admin or by the job's user (also `scontrol
# requeuehold`; a site's job_submit plugin may hold new jobs too).
_HELD_REASON = re.compile(rf"JobHeldAdmin|JobHeldUser|{LAUNCH_FAILED_HELD}")


@dataclass(frozen=True)
class StartEstimate:
    """When Slurm expects a job to start (epoch seconds), where, and how it knows: "test-only" (`sbatch
    --test-only`: the scheduler placing a job of that shape now, without submitting it) or "squeue-start" (`squeue
    --start`: the expected start of a job already queued)."""

    start_time: float
    source: str
    nodes: tuple[str, ...] = ()
    partition: str | None = None


@dataclass(frozen=True)
class NodeInfo:
    name: str
    # Base state in capitals (IDLE, MIXED, ALLOCATED, DOWN, ...), and flags (DRAIN, NOT_RESPONDING, ...).
    state: str
    state_flags: tuple[str, ...] = ()
    partitions: tuple[str, ...] = ()
    # Slurm's GRES strings as configured and as in use, e.g. "gpu:a100:4(S:0-1)".
    gres: str = ""
    gres_used: str = ""
    gpus_total: int = 0
    gpus_used: int = 0
    cpus_total: int = 0
    cpus_allocated: int = 0
    memory_mb: int = 0
    memory_allocated_mb: int = 0
    features: tuple[str, ...] = ()
    reason: str | None = None
    # The service's reservations (service_reservations()) whose jobs may run on this node, as its backend read them
    # (adapter.with_reservations): those that hold it, and, for a node in no reservation, a FLEX or node-less one
    # (ReservationInfo.takes_unreserved_nodes); () without SBATCH_RESERVATION.
    reservations: tuple[str, ...] = ()

    @property
    def gpus_free(self) -> int:
        return max(self.gpus_total - self.gpus_used, 0)

    @property
    def available(self) -> bool:
        """The node can take the service's new jobs (up, not draining, not failing, responding; not in an active
        reservation, or where the service's jobs run in reservations - SBATCH_RESERVATION in its environment - in
        one of those)."""
        if self.state in _UNAVAILABLE_NODE_STATES or set(self.state_flags) & _UNAVAILABLE_NODE_FLAGS:
            return False
        wanted = service_reservations()
        if wanted:
            return bool(set(self.reservations) & set(wanted))
        return "RESERVED" not in self.state_flags


_UNAVAILABLE_NODE_STATES = frozenset(
    {"DOWN", "FUTURE", "UNKNOWN", "DRAIN", "DRAINED", "DRAINING", "FAIL", "FAILING", "INVAL", "ERROR"}
)
_UNAVAILABLE_NODE_FLAGS = frozenset(
    {"DRAIN", "DRAINED", "DRAINING", "FAIL", "NOT_RESPONDING", "MAINTENANCE", "POWERED_DOWN", "POWERING_DOWN",
     "REBOOT_ISSUED", "INVALID_REG"}
)
# And RESERVED (in an active advanced reservation) where hpcllm's jobs name none: a job sent there by name waits
# (ReqNodeNotAvail) until the reservation ends. A site that gives the service a reservation of its own does so
# with SBATCH_RESERVATION (sbatch reads it; hpcllm passes SBATCH_* on), and then the nodes that reservation's jobs
# may run on are the ones to place on (NodeInfo.reservations): its own, and the nodes in no reservation only for a
# FLEX or node-less one (ReservationInfo.takes_unreserved_nodes); a node RESERVED by another reservation is as
# closed to the service's jobs as ever.


@dataclass(frozen=True)
class ReservationInfo:
    """A Slurm reservation as a backend reads it: its nodes, and its flags as Slurm names them (FLEX, ANY_NODES,
    MAINT, ...)."""

    name: str
    nodes: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()

    @property
    def takes_unreserved_nodes(self) -> bool:
        """Its jobs may also run on nodes in no reservation: FLEX (its own nodes and others), ANY_NODES, or none of
        its own (licences or burst buffers only)."""
        return not self.nodes or bool({"FLEX", "ANY_NODES"} & set(self.flags))


@dataclass(frozen=True)
class PartitionInfo:
    name: str
    state: str = "UP"
    nodes: tuple[str, ...] = ()
    is_default: bool = False
    # Seconds; None for no limit.
    max_time: int | None = None
    priority_tier: int | None = None
    total_cpus: int | None = None
    total_nodes: int | None = None


class JobSpec(BaseModel):
    """What to run and what to ask Slurm for: one batch job.

    Give either `script` (the body of a batch script; `#SBATCH` lines are generated from the fields) or `template`
    (a name in slurm/templates/, rendered with `template_vars`). `signal="USR1@60"` asks Slurm to send SIGUSR1 to
    the batch shell 60 s before the time limit (and at preemption where the site sends it); `env` is added to the
    job's environment on top of the submitter's (sbatch's default --export=ALL), or of the submitter's variables
    `inherit` names (names; "NAME*" a prefix).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]{1,128}$")
    script: str | None = None
    template: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    template_vars: dict[str, Any] = Field(default_factory=dict)
    partition: str | None = Field(None, pattern=SLURM_TOKEN_PATTERN)
    account: str | None = Field(None, pattern=SLURM_TOKEN_PATTERN)
    qos: str | None = Field(None, pattern=SLURM_TOKEN_PATTERN)
    time: str | None = None
    nodes: int = Field(1, ge=1)
    ntasks: int | None = Field(None, ge=1)
    ntasks_per_node: int | None = Field(None, ge=1)
    cpus_per_task: int | None = Field(None, ge=1)
    # GPUs per node (--gres=gpu:N); `gres` takes a raw GRES string instead, e.g. "gpu:a100:2".
    gpus_per_node: int = Field(0, ge=0)
    gres: str | None = Field(None, pattern=SLURM_TOKEN_PATTERN)
    # Memory per node: "4096" (MB), "512M", "4G"; "0" all of each node's memory (sbatch's --mem=0).
    mem: str | None = None
    nodelist: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    # Node features: required (--constraint) and preferred if available (--prefer, Slurm >= 22.05).
    constraint: str | None = Field(None, pattern=r"^[A-Za-z0-9_.&|,*\[\]()!:-]+$")
    prefer: str | None = Field(None, pattern=r"^[A-Za-z0-9_.&|,*\[\]()!:-]+$")
    signal: str | None = None
    requeue: bool = False
    output: str | None = None
    error: str | None = None
    # Append to output files instead of truncating them: a requeued job reruns its script and keeps its log.
    open_mode_append: bool = True
    env: dict[str, str] = Field(default_factory=dict)
    inherit: tuple[str, ...] | None = None
    chdir: str | None = None
    comment: str | None = Field(None, max_length=256, pattern=SLURM_TOKEN_PATTERN)

    @field_validator("signal")
    @classmethod
    def _valid_signal(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = _SIGNAL.match(value.strip().upper())
        if not match:
            raise ValueError(f"signal {value!r} must look like NAME@SECONDS, e.g. USR1@60 (Slurm's --signal)")
        name, seconds = match.group(1), int(match.group(2))
        # Slurm keeps the seconds in 16 bits: sbatch and slurmrestd refuse more ("Invalid --signal specification").
        if seconds > SLURM_MAX_SIGNAL_SECONDS:
            raise ValueError(f"signal {value!r}: Slurm sends a signal at most {SLURM_MAX_SIGNAL_SECONDS} s before "
                             f"the time limit; give fewer seconds ([slurm] signal_seconds)")
        try:
            signal_name(name)
        except ConfigError as exc:
            raise ValueError(f"signal {value!r}: {exc}") from None
        return f"{name}@{seconds}"

    @field_validator("time")
    @classmethod
    def _valid_time(cls, value: str | None) -> str | None:
        if value is not None:
            parse_walltime(value)  # raises ValueError naming the accepted formats
        return value

    @field_validator("mem")
    @classmethod
    def _valid_mem(cls, value: str | None) -> str | None:
        if value is not None and not _MEMORY.fullmatch(value):
            raise ValueError(f"mem {value!r} must be a number of MB or have a K/M/G/T suffix, e.g. 4G")
        return value

    @field_validator("nodelist", "exclude")
    @classmethod
    def _valid_node_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.\[\],-]+", name):
                raise ValueError(f"node name {name!r} has characters Slurm does not allow")
        return value

    @field_validator("env")
    @classmethod
    def _valid_env(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _ENV_NAME.match(name):
                raise ValueError(f"environment variable name {name!r} is not a valid shell name")
        return value

    @field_validator("inherit")
    @classmethod
    def _valid_inherit(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for pattern in value or ():
            if not _ENV_NAME.match(pattern.removesuffix("*")):
                raise ValueError(f"{pattern!r} is no environment variable name (or NAME* for a prefix)")
        return value

    @field_validator("output", "error", "chdir")
    @classmethod
    def _single_line(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c.isspace() or c == "\0" for c in value)):
            raise ValueError(f"path {value!r} must not be empty or hold spaces (it goes on an #SBATCH line)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if (self.script is None) == (self.template is None):
            raise ValueError("give exactly one of script (a batch script body) or template (a template name)")
        if self.gres and self.gpus_per_node:
            raise ValueError("give either gpus_per_node or gres, not both")
        return self

    # ---------------------------------------------------------------------------------------- derived values

    @property
    def gres_request(self) -> str | None:
        """The --gres value, e.g. "gpu:2"."""
        if self.gres:
            return self.gres
        return f"gpu:{self.gpus_per_node}" if self.gpus_per_node else None

    @property
    def signal_name(self) -> str | None:
        return self.signal.split("@")[0] if self.signal else None

    @property
    def batch_signal(self) -> str | None:
        """sbatch's --signal value: B: sends it to the batch shell, which forwards it to its steps."""
        return f"B:{self.signal}" if self.signal else None

    @property
    def time_minutes(self) -> int | None:
        """The walltime in whole minutes (rounded up), as the REST API and pyslurm want it."""
        if self.time is None:
            return None
        return -(-parse_walltime(self.time) // 60)

    @property
    def mem_mb(self) -> int | None:
        """Memory per node in MB, rounded up as sbatch does; 0 is Slurm's "all the memory of each node"."""
        if self.mem is None:
            return None
        number, unit = _MEMORY.fullmatch(self.mem).groups()
        kilobytes = int(number) * {"": 1024, "K": 1, "M": 1024, "G": 1024**2, "T": 1024**3}[unit.upper()]
        return -(-kilobytes // 1024)


def parse_walltime(text: str) -> int:
    """Slurm walltime text -> seconds. Formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    if not re.fullmatch(WALLTIME_PATTERN, text):  # fullmatch: "$" would let a final newline in
        raise ValueError(f"walltime {text!r} is not one of Slurm's formats (MM, HH:MM:SS, D-HH:MM:SS, ...)")
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        days = int(day_text)
        parts = [int(p) for p in text.split(":")]
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 2:
            hours, minutes, seconds = 0, parts[0], parts[1]
        else:
            hours, minutes, seconds = parts
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def make_job_spec(**fields: Any) -> JobSpec:
    """JobSpec(**fields), with a validation failure turned into one ConfigError naming each bad field."""
    try:
        return JobSpec(**fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'job'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid Slurm job description: {problems}") from None


class SlurmBackend(abc.ABC):
    """One way of talking to Slurm. All methods raise SlurmError (Slurm refused, with its message) or
    SlurmUnavailable (Slurm could not be asked)."""

    #: Short name used in config (`[slurm] backend = "cli"`) and messages.
    name: str = ""

    @abc.abstractmethod
    def submit(self, spec: JobSpec) -> str:
        """Submit a batch job; returns its job id."""

    @abc.abstractmethod
    def statuses(self, job_ids: list[str] | tuple[str, ...]) -> dict[str, JobStatus]:
        """Status of many jobs with one call to Slurm. Every requested id is in the answer; a job Slurm no longer
        knows has state UNKNOWN and missing=True."""

    def status(self, job_id: str) -> JobStatus:
        return self.statuses([job_id])[job_id]

    @abc.abstractmethod
    def list_jobs(self) -> dict[str, JobStatus]:
        """Every job slurmctld still holds (all users, all states), with its comment, in one call (two for the
        CLI backend's text fallback). For finding jobs by their tag, e.g. after a crash between submit and record."""

    @abc.abstractmethod
    def cancel(self, job_id: str) -> None:
        """Cancel a job (pending or running). Cancelling a finished job is not an error."""

    @abc.abstractmethod
    def requeue(self, job_id: str) -> None:
        """Put a running job back in the queue; it keeps its id and reruns its script from the start."""

    @abc.abstractmethod
    def signal(self, job_id: str, sig: str, batch_only: bool = True) -> None:
        """Send a signal (name like "USR1" or "SIGTERM") to a running job: to its batch shell when batch_only,
        else to every step."""

    @abc.abstractmethod
    def nodes(self) -> list[NodeInfo]:
        """Every node Slurm knows, with GPUs total and in use."""

    @abc.abstractmethod
    def partitions(self) -> list[PartitionInfo]:
        """Every partition, the default one marked."""

    def estimate_start(self, spec: JobSpec) -> StartEstimate | None:
        """When a job of this shape would start if submitted now, without submitting it; None when this backend
        cannot ask (the caller falls back to its own estimate). SlurmError when Slurm refuses the shape."""
        return None

    def pending_start_times(self, job_ids: list[str] | tuple[str, ...]) -> dict[str, StartEstimate]:
        """Slurm's expected start of queued jobs (those it has one for); {} when this backend cannot ask."""
        return {}

    def close(self) -> None:
        """Release connections; the backend must not be used afterwards."""


# signal_name: hpcllm.config's (which checks [slurm] signal with it at load), part of this module's API as before.


def catchable_signal(sig: str | int, setting: str = "slurm.signal") -> signal_module.Signals:
    """The signal `setting` names ("USR1", "SIGUSR1", "10"), one a process can catch or ignore (the drain signal, a
    worker's stop signal): a ConfigError saying what to set for an unknown one or KILL/STOP (the agent and its
    workers would die at once instead of draining)."""
    try:
        signum = signal_module.Signals[f"SIG{signal_name(sig)}"]
    except ConfigError as exc:
        raise ConfigError(f"{setting}: {exc}") from None
    if signum in (signal_module.SIGKILL, signal_module.SIGSTOP):
        raise ConfigError(f"{setting} = {sig!r} is {signum.name}, which no process can catch: set a signal the node "
                          f"agent and its workers can handle, e.g. USR1, USR2 or TERM")
    return signum


def drain_signal(config: Config) -> signal_module.Signals:
    """The drain signal (slurm.signal): a name (USR1, SIGUSR1) or a number, as the sbatch script takes it;
    ConfigError for one that is no signal or cannot be caught."""
    return catchable_signal(config.slurm.signal)


def ignore_drain_signal(config: Config) -> Callable[[], None] | None:
    """What makes a process ignore the drain signal, as every process of the job but the node agent must (the agent's
    workers, its host-to-device probe, a tensor-parallel instance's ranks): Slurm's `scancel --signal` reaches every
    process of the step, and a drain is the agent's business. Call it in the process itself, or pass it as a Popen
    preexec_fn (SIG_IGN survives exec; the child only makes the one system call, the signal looked up here). None
    where the drain signal is SIGTERM, by which the agent stops its children."""
    signum = drain_signal(config)
    return None if signum == signal_module.SIGTERM else functools.partial(signal_module.signal, signum,
                                                                         signal_module.SIG_IGN)


__all__ = [
    "JobSpec",
    "JobState",
    "JobStatus",
    "NodeInfo",
    "PartitionInfo",
    "SlurmBackend",
    "StartEstimate",
    "catchable_signal",
    "drain_signal",
    "ignore_drain_signal",
    "make_job_spec",
    "parse_walltime",
    "signal_name",
]
