"""pyslurm backend (libslurm through pyslurm's 25.x API), for sites whose Slurm matches an installed pyslurm.

pyslurm is built against one Slurm release: pyslurm X.Y.* works only with Slurm X.Y (it checks the version when
it is built and uses that release's C structures). So this backend refuses to start unless pyslurm imports AND its
major.minor equals the site's Slurm major.minor, with a message that says which backend to use instead. PyPI
carries pyslurm 25.11.x (and 18.8 and older); a Slurm 22.05 site such as the dev cluster has no matching pyslurm,
so there the answer is `[slurm] backend = "cli"` (default) or `"rest"`.

Calls (pyslurm 25.x): pyslurm.JobSubmitDescription(...).submit(), pyslurm.Jobs.load(), pyslurm.Job(id).cancel(),
.requeue(), .send_signal(sig, steps="batch"|"all"), pyslurm.Nodes.load(), pyslurm.Partitions.load(),
pyslurm.Reservations.load() (with SBATCH_RESERVATION set, for the nodes of its reservations). Node and job
fields go through the same normalization as the other backends (hpcllm.slurm.adapter).
"""

from __future__ import annotations

import enum
import importlib
import re
import signal as signal_module
import subprocess
from types import ModuleType
from typing import TYPE_CHECKING, Any

from hpcllm.slurm import adapter
from hpcllm.slurm.base import (JobSpec, JobStatus, NodeInfo, PartitionInfo, ReservationInfo, SlurmBackend,
                               service_reservations, signal_name)
from hpcllm.slurm.errors import (UNREACHABLE_PATTERNS, SlurmBackendUnsupported, SlurmError, SlurmUnavailable,
                                 already_done, unreachable, with_setting_hint)
from hpcllm.slurm.environment import job_environment, run_slurm_command
from hpcllm.slurm.templates import ensure_log_dirs, render_batch_script

if TYPE_CHECKING:
    from hpcllm.config import SlurmConfig

_ALTERNATIVES = 'set [slurm] backend = "cli" (Slurm\'s commands; the default) or "rest" (slurmrestd)'


def site_slurm_version() -> tuple[int, int] | None:
    """The site's Slurm major.minor from `sinfo --version` ("slurm-wlm 22.05.8" -> (22, 5)); None if unknown."""
    try:
        result = run_slurm_command(["sinfo", "--version"], timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_version(result.stdout)


def parse_version(text: str) -> tuple[int, int] | None:
    match = re.search(r"(\d+)\.(\d+)(?:\.\d+)?", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def _format(version: tuple[int, int] | None) -> str:
    return f"{version[0]}.{version[1]:02d}" if version else "unknown"


def load_matching_pyslurm(site_version: tuple[int, int] | None = None,
                          importer=importlib.import_module) -> ModuleType:
    """Import pyslurm and check it was made for this site's Slurm; SlurmBackendUnsupported otherwise."""
    site_version = site_version or site_slurm_version()
    try:
        pyslurm = importer("pyslurm")
    except ImportError as exc:
        raise SlurmBackendUnsupported(
            f'[slurm] backend = "pyslurm" needs the pyslurm package built for this site\'s Slurm '
            f"{_format(site_version)}, and it cannot be imported ({exc}). pyslurm X.Y only works with Slurm X.Y; "
            f"PyPI has pyslurm 25.11.x (and 18.8 and older), so a Slurm {_format(site_version)} site has no "
            f"matching pyslurm there. {_ALTERNATIVES}.") from None
    module_version = parse_version(str(getattr(pyslurm, "__version__", "") or _call(pyslurm, "version")))
    if site_version is None:
        raise SlurmBackendUnsupported(
            f"cannot tell which Slurm this site runs (sinfo --version failed), so pyslurm "
            f"{_format(module_version)} cannot be checked against it; {_ALTERNATIVES}.")
    if module_version != site_version:
        raise SlurmBackendUnsupported(
            f"pyslurm {_format(module_version)} is installed but this site runs Slurm {_format(site_version)}; "
            f"pyslurm X.Y only works with Slurm X.Y. Install pyslurm {site_version[0]}.{site_version[1]}.x, or "
            f"{_ALTERNATIVES}.")
    return pyslurm


def _call(module: ModuleType, name: str) -> Any:
    function = getattr(module, name, None)
    return function() if callable(function) else ""


class PyslurmBackend(SlurmBackend):
    name = "pyslurm"

    def __init__(self, config: SlurmConfig | None = None, *, pyslurm: ModuleType | None = None):
        self.pyslurm = pyslurm or load_matching_pyslurm()

    def _rpc(self, what: str, call, *args, **kwargs):
        """Run a pyslurm call; its RPCError becomes SlurmError (or SlurmUnavailable) with Slurm's message."""
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # pyslurm.RPCError and ValueError carry Slurm's / pyslurm's message
            message = str(exc)
            if UNREACHABLE_PATTERNS.search(message) or re.search("timed out", message, re.IGNORECASE):
                raise unreachable(what, message) from None
            raise SlurmError(f"{what}: {message}", message) from None

    def _job(self, job_id: str) -> Any:
        """pyslurm.Job of a job number; pyslurm.Job takes no "12_3" / "12+1" (an array task, a het component)."""
        if not str(job_id).isdigit():
            raise SlurmError(f"job {job_id!r}: the pyslurm backend acts on job numbers only (pyslurm.Job takes an "
                             f"int); use its own number (`scontrol show job {job_id}` shows it as JobId=) or "
                             f"backend = \"cli\"")
        return self.pyslurm.Job(int(job_id))

    def submit(self, spec: JobSpec) -> str:
        description = self.pyslurm.JobSubmitDescription(**submit_description_fields(spec))
        ensure_log_dirs(spec)
        try:
            return str(self._rpc("submit", description.submit))
        except SlurmError as exc:
            raise with_setting_hint(exc, spec) from None

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

    def _jobs(self, wanted: list[str] | None = None) -> dict[str, JobStatus]:
        """Every job by its number, and each of `wanted` that is an array task or het component by that id."""
        jobs = self._rpc("load jobs", self.pyslurm.Jobs.load)
        return adapter.statuses_with_aliases(((_id_fields(job), job_status_from_pyslurm(job)) for job in jobs.values()),
                                             wanted or ())

    def cancel(self, job_id: str) -> None:
        try:
            self._rpc(f"cancel job {job_id}", self._job(job_id).cancel)
        except SlurmError as exc:
            if not already_done(exc):
                raise

    def requeue(self, job_id: str) -> None:
        self._rpc(f"requeue job {job_id}", self._job(job_id).requeue)

    def signal(self, job_id: str, sig: str, batch_only: bool = True) -> None:
        self._rpc(f"signal job {job_id}", self._job(job_id).send_signal, f"SIG{signal_name(sig)}",
                  steps="batch" if batch_only else "all")

    def nodes(self) -> list[NodeInfo]:
        # Nodes is a map (pyslurm.xcollections.MultiClusterMap): iterating it gives node names, not nodes.
        nodes = [node_from_pyslurm(node) for node in _values(self._rpc("load nodes", self.pyslurm.Nodes.load))]
        return adapter.with_reservations(nodes, self.reservations)

    def reservations(self) -> list[ReservationInfo]:
        if not hasattr(self.pyslurm, "Reservations"):  # pyslurm before 25.5
            raise SlurmError(f"this pyslurm ({getattr(self.pyslurm, '__version__', 'unknown')}) cannot read "
                             f'reservations (pyslurm 25.5 and later can); {_ALTERNATIVES}')
        # Flags of the service's reservations only, the ones they matter for (ReservationInfo.takes_unreserved_nodes):
        # pyslurm 25.5 refuses to read some (_reservation_flags), a site's recurring reservation must not fail this.
        wanted = service_reservations()
        return [ReservationInfo(name=resv.name, nodes=tuple(adapter.expand_hostlist(getattr(resv, "nodes", None))),
                                flags=_reservation_flags(resv) if resv.name in wanted else ())
                for resv in _values(self._rpc("load reservations", self.pyslurm.Reservations.load))]

    def partitions(self) -> list[PartitionInfo]:
        partitions = self._rpc("load partitions", self.pyslurm.Partitions.load)
        return [partition_from_pyslurm(p) for p in _values(partitions)]


def submit_description_fields(spec: JobSpec) -> dict[str, Any]:
    """JobSpec -> pyslurm.JobSubmitDescription keyword arguments (pyslurm 25.x attribute names)."""
    fields: dict[str, Any] = {
        "name": spec.name,
        "script": render_batch_script(spec),
        "nodes": spec.nodes,
        "is_requeueable": spec.requeue,
        "environment": job_environment(spec.env, spec.inherit),
        "log_files_open_mode": "append" if spec.open_mode_append else "truncate",
    }
    optional = {
        "partitions": spec.partition,
        "account": spec.account,
        "qos": spec.qos,
        "time_limit": spec.time,
        "ntasks": spec.ntasks,
        "ntasks_per_node": spec.ntasks_per_node,
        "cpus_per_task": spec.cpus_per_task,
        "gres_per_node": spec.gres_request,
        "memory_per_node": spec.mem_mb,
        "required_nodes": list(spec.nodelist) or None,
        "excluded_nodes": list(spec.exclude) or None,
        "constraints": spec.constraint,
        "standard_output": spec.output,
        "standard_error": spec.error,
        "working_directory": spec.chdir,
        "comment": spec.comment,
        # As sbatch takes SBATCH_RESERVATION (libslurm does not read it): nodes() offers only those reservations'.
        "reservations": list(service_reservations()) or None,
    }
    if spec.signal:
        name, seconds = spec.signal.split("@")
        # By number: pyslurm 25.x puts a dict's "signal" into a uint16 as it is (a name raises TypeError there).
        number = signal_module.Signals[f"SIG{signal_name(name)}"].value
        optional["signal"] = {"signal": number, "time": int(seconds), "batch_only": True}
    fields.update({key: value for key, value in optional.items() if value is not None})
    if spec.mem_mb == 0:  # pyslurm drops a memory_per_node of 0 (NO_VAL): the job would get the default instead
        raise SlurmError("the pyslurm backend cannot ask for all of each node's memory (mem = \"0\", sbatch's "
                         "--mem=0): give the memory in MB or GB, or use backend = \"cli\"")
    if spec.prefer:  # JobSubmitDescription (pyslurm 25.x) has no attribute for --prefer
        raise SlurmError("the pyslurm backend cannot pass --prefer (pyslurm has no such attribute); "
                         "drop prefer or use backend = \"cli\"")
    return fields


def job_status_from_pyslurm(job: Any) -> JobStatus:
    word = adapter.slurm_state_word(job.state)
    limit = job.time_limit
    return JobStatus(
        job_id=str(job.id),
        state=adapter.normalize_state(word),
        raw_state=word,
        nodes=tuple(adapter.expand_hostlist(job.allocated_nodes)),
        reason=adapter._text(job.state_reason),
        name=job.name,
        partition=job.partition,
        start_time=adapter._timestamp(job.start_time),
        end_time=adapter._timestamp(job.end_time),
        time_limit=int(limit) * 60 if isinstance(limit, (int, float)) and limit > 0 else None,
        restart_count=int(job.requeue_count or 0),
        exit_code=adapter.exit_code(job.exit_code, getattr(job, "exit_code_signal", None)),
        comment=adapter._text(getattr(job, "comment", None)),
    )


def _id_fields(job: Any) -> dict[str, Any]:
    """A pyslurm Job's array and het fields under the names of Slurm's JSON (adapter.statuses_with_aliases)."""
    return {"array_job_id": getattr(job, "array_id", None), "array_task_id": getattr(job, "array_task_id", None),
            "array_task_string": getattr(job, "array_tasks_waiting", None),
            "het_job_id": getattr(job, "heterogeneous_id", None),
            "het_job_offset": getattr(job, "heterogeneous_offset", None)}


def _gres_string(gres: Any) -> str:
    """pyslurm's GRES dict ({"gpu:a100": 2} or {"gpu": {"count": 2, ...}}) -> "gpu:a100:2"."""
    if isinstance(gres, str):
        return gres
    parts = []
    for key, value in (gres or {}).items():
        count = value.get("count") if isinstance(value, dict) else value
        parts.append(f"{key}:{count}")
    return ",".join(parts)


def node_from_pyslurm(node: Any) -> NodeInfo:
    gres, used = _gres_string(node.configured_gres), _gres_string(node.allocated_gres)
    base, flags = adapter._node_state(node.state)
    return NodeInfo(
        name=node.name,
        state=base,
        state_flags=flags,
        partitions=tuple(node.partitions or ()),
        gres=gres,
        gres_used=used,
        gpus_total=adapter.count_gpus(gres),
        gpus_used=adapter.count_gpus(used),
        cpus_total=int(node.total_cpus or 0),
        cpus_allocated=int(node.allocated_cpus or 0),
        memory_mb=int(node.real_memory or 0),
        memory_allocated_mb=int(node.allocated_memory or 0),
        features=tuple(getattr(node, "available_features", None) or ()),
        reason=adapter._text(node.reason),
    )


def partition_from_pyslurm(partition: Any) -> PartitionInfo:
    max_time = getattr(partition, "max_time", None)
    return PartitionInfo(
        name=partition.name,
        state=str(getattr(partition, "state", "UP") or "UP").upper(),
        nodes=tuple(adapter.expand_hostlist(getattr(partition, "nodes", None))),
        is_default=bool(getattr(partition, "is_default", False)),
        max_time=int(max_time) * 60 if isinstance(max_time, (int, float)) and max_time > 0 else None,
        priority_tier=getattr(partition, "priority_tier", None),
        total_cpus=getattr(partition, "total_cpus", None),
        total_nodes=getattr(partition, "total_nodes", None),
    )


def _reservation_flags(resv: Any) -> tuple[str, ...]:
    """A reservation's flag names. pyslurm 25.5 reads .flags as its ReservationFlags, an enum.Flag without the
    recurrence flags (DAILY, WEEKLY, HOURLY, ...), TIME_FLOAT and others: a ValueError for a reservation with one."""
    try:
        return _flag_names(getattr(resv, "flags", None))
    except ValueError as exc:
        raise SlurmError(f"this pyslurm cannot read the flags of reservation {resv.name!r} ({exc}): it has no name "
                         f"for some of them; {_ALTERNATIVES}") from None


def _flag_names(flags: Any) -> tuple[str, ...]:
    """pyslurm's ReservationFlags (an enum.Flag: FLEX, ANY_NODES, ...) -> the names of the flags it holds."""
    if isinstance(flags, enum.Flag):
        return tuple(member.name for member in type(flags) if member.value and member in flags)
    return ()


def _values(collection: Any) -> list[Any]:
    return list(collection.values()) if hasattr(collection, "values") else list(collection)
