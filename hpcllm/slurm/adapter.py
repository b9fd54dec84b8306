"""One adapter from Slurm's outputs (JSON of every version, pinned text formats) to JobStatus / NodeInfo.

Slurm's JSON changed shape across versions; everything version-specific is handled here and nowhere else:
- job_state: a string ("RUNNING", 22.05) or a list of base state + flags (["RUNNING", "COMPLETING"], 23.11+);
- numbers: plain ints (22.05) or {"set": bool, "infinite": bool, "number": n} objects (23.02+);
- nodes: a hostlist string ("n[1-2]") or a structure ({"list": ..., "allocation": [...]}, job_resources 24.05+);
- node state: "idle" + state_flags (22.05) or ["IDLE", "DRAIN"] (23.11+);
- exit_code: a wait status int (22.05) or {"status": [...], "return_code": {...}} (23.02+).
Unknown or missing fields never raise: they become None / empty, so a new Slurm release degrades to less detail
rather than a crash.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from hpcllm.slurm import hostlist
from hpcllm.slurm.hostlist import HostlistError, expand_item, split_top_level
from hpcllm.slurm.base import (JobState, JobStatus, NodeInfo, PartitionInfo, ReservationInfo, parse_walltime,
                               service_reservations)
from hpcllm.slurm.errors import SlurmError, SlurmUnavailable

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------- hostlists


def expand_hostlist(text: str | None) -> list[str]:
    """Slurm hostlist -> names: "n[1-3,7],gpu[01-02]-x,login" -> n1 n2 n3 n7 gpu01-x gpu02-x login, in order with
    repeats: hpcllm.slurm.hostlist.expand_hostlist. Slurm printed it, so what that rule refuses is read item by item
    instead (Slurm's rule: a range going backwards or holding more than 64Ki names is no hostlist), and an item it
    cannot read is kept as Slurm printed it, as one name."""
    if not text or text in ("(null)", "None", "N/A"):
        return []
    try:
        return hostlist.expand_hostlist(text)
    except HostlistError:
        return _expand_readable_items(text.strip())


def _expand_readable_items(text: str) -> list[str]:
    try:
        items = split_top_level(text)
    except HostlistError as exc:  # unbalanced brackets
        _log_unreadable_hostlist(text, str(exc))
        return [text]
    names: list[str] = []
    for item in (item.strip() for item in items):
        if not item:
            continue
        try:
            names.extend(expand_item(item))
        except HostlistError as exc:  # "n[a-c]", "n[]", "n[3-1]": keep the name as Slurm printed it
            _log_unreadable_hostlist(item, str(exc))
            names.append(item)
    return names


@functools.lru_cache(maxsize=256)  # once per item: statuses are asked every few seconds
def _log_unreadable_hostlist(item: str, reason: str) -> None:
    log.warning("cannot expand the Slurm hostlist %r (%s); using it as one name", item, reason)


# -------------------------------------------------------------------------------------------- scalar values


def number(value: Any) -> float | int | None:
    """A JSON number in any version's shape -> the number; None when unset, math.inf when infinite."""
    if isinstance(value, Mapping):
        if value.get("infinite"):
            return math.inf
        if not value.get("set", True):
            return None
        return number(value.get("number"))
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and re.match(r"^-?\d+(\.\d+)?$", value.strip()):
        return float(value) if "." in value else int(value)
    return None


def _timestamp(value: Any) -> float | None:
    """Epoch seconds; Slurm writes 0 (or an unset object) for "not yet"."""
    value = number(value)
    if value is None or value == math.inf or value <= 0:
        return None
    return float(value)


def _count(value: Any) -> int:
    value = number(value)
    return int(value) if value is not None and value != math.inf else 0


def _minutes_to_seconds(value: Any) -> int | None:
    value = number(value)
    if value is None or value == math.inf or value < 0:  # unset, infinite, or -1 for "no limit"
        return None
    return int(value) * 60


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    value = str(value).strip()
    return None if value in ("", "None", "(null)", "N/A") else value


# ---------------------------------------------------------------------------------------------- job states

# Slurm state words (base states and the flags Slurm prints in their place) -> our states.
_STATE_MAP: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,  # nodes allocated but booting: the script has not started
    "RESV_DEL_HOLD": JobState.PENDING,
    "SUSPENDED": JobState.PENDING,  # holds its nodes but does not run
    "STOPPED": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "COMPLETING": JobState.COMPLETING,
    "STAGE_OUT": JobState.COMPLETING,
    "COMPLETED": JobState.COMPLETED,
    "FAILED": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
    "BOOT_FAIL": JobState.NODE_FAIL,
    "NODE_FAIL": JobState.NODE_FAIL,
    "CANCELLED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "DEADLINE": JobState.TIMEOUT,
    "TIMEOUT": JobState.TIMEOUT,
    "PREEMPTED": JobState.PREEMPTED,
    "REQUEUED": JobState.REQUEUED,
    "REQUEUE_HOLD": JobState.REQUEUED,
    "REQUEUE_FED": JobState.REQUEUED,
    "REQUEUE_CRON": JobState.REQUEUED,
}
# Where a state list holds flags too, Slurm's own job_state_string() shows the first of these that is set.
_FLAG_PRECEDENCE = (
    "COMPLETING", "STAGE_OUT", "CONFIGURING", "RESIZING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
    "SPECIAL_EXIT", "STOPPED", "REVOKED", "RESV_DEL_HOLD", "SIGNALING",
)
# Short codes of `squeue -o %t` and words sacct adds ("CANCELLED by 0").
_SHORT_STATES = {
    "PD": "PENDING", "R": "RUNNING", "CG": "COMPLETING", "CD": "COMPLETED", "F": "FAILED", "CA": "CANCELLED",
    "PR": "PREEMPTED", "TO": "TIMEOUT", "NF": "NODE_FAIL", "RQ": "REQUEUED", "CF": "CONFIGURING", "S": "SUSPENDED",
    "OOM": "OUT_OF_MEMORY", "BF": "BOOT_FAIL", "DL": "DEADLINE", "SE": "SPECIAL_EXIT", "SO": "STAGE_OUT",
    "ST": "STOPPED", "RH": "REQUEUE_HOLD", "RF": "REQUEUE_FED", "RS": "RESIZING", "RV": "REVOKED", "SI": "SIGNALING",
    "RD": "RESV_DEL_HOLD",
}


def slurm_state_word(value: Any) -> str:
    """job_state in any shape -> the one word Slurm would print ("RUNNING", "COMPLETING", ...)."""
    if isinstance(value, (list, tuple)):
        words = [str(v).upper() for v in value]
        for flag in _FLAG_PRECEDENCE:
            if flag in words:
                return flag
        return words[0] if words else ""
    word = str(value or "").strip().upper()
    word = word.split()[0] if word else ""  # sacct: "CANCELLED by 1000"
    word = word.rstrip("+")  # sacct marks truncated states with "+"
    return _SHORT_STATES.get(word, word)


def normalize_state(value: Any) -> JobState:
    return _STATE_MAP.get(slurm_state_word(value), JobState.UNKNOWN)


# ----------------------------------------------------------------------------------------------------- jobs


def _job_nodes(job: Mapping[str, Any]) -> tuple[str, ...]:
    for candidate in (job.get("nodes"), (job.get("job_resources") or {}).get("nodes")):
        names = _node_names(candidate)
        if names:
            return tuple(names)
    return ()


def _node_names(value: Any) -> list[str]:
    if isinstance(value, str):
        return expand_hostlist(value)
    if isinstance(value, list):
        names = []
        for entry in value:
            names.extend(_node_names(entry) if not isinstance(entry, Mapping) else [entry.get("name") or ""])
        return [n for n in names if n]
    if isinstance(value, Mapping):
        if value.get("list"):
            return expand_hostlist(value["list"])
        allocation = value.get("allocation") or []
        return [entry["name"] for entry in allocation if isinstance(entry, Mapping) and entry.get("name")]
    return []


def exit_code(code: Any, signal: Any = None) -> int | None:
    """A job's exit code as a shell reports it: the script's own, or 128+N when signal N killed it (Slurm then
    reports exit code 0 with the signal beside it)."""
    code, signal = number(code), number(signal)
    if signal is not None and signal != math.inf and 0 < signal < 128:
        return 128 + int(signal)
    return None if code is None or code == math.inf or code < 0 else int(code)


def _exit_code(value: Any) -> int | None:
    if isinstance(value, Mapping):  # 23.02+: {"status": [...], "return_code": {...}, "signal": {"id": ...}}
        signal = value.get("signal")
        signal = signal.get("id", signal.get("signal_id")) if isinstance(signal, Mapping) else None
        return exit_code(value.get("return_code"), signal)
    status = number(value)  # 22.05: a wait status, the exit code in the high byte, a signal in the low 7 bits
    if status is None or status == math.inf or status < 0:
        return None
    return exit_code((int(status) >> 8) & 0xFF, int(status) & 0x7F)


def job_status_from_json(job: Mapping[str, Any]) -> JobStatus:
    """One entry of `squeue --json`'s / slurmrestd's "jobs" list -> JobStatus."""
    word = slurm_state_word(job.get("job_state"))
    reason = _text(job.get("state_reason"))
    description = _text(job.get("state_description"))
    if description and description != reason:
        reason = f"{reason}: {description}" if reason else description
    return JobStatus(
        job_id=str(job.get("job_id")),
        state=_STATE_MAP.get(word, JobState.UNKNOWN),
        raw_state=word,
        nodes=_job_nodes(job),
        reason=reason,
        name=_text(job.get("name")),
        partition=_text(job.get("partition")),
        start_time=_timestamp(job.get("start_time")),
        end_time=_timestamp(job.get("end_time")),
        time_limit=_minutes_to_seconds(job.get("time_limit")),
        restart_count=_count(job.get("restart_cnt")),
        exit_code=_exit_code(job.get("exit_code")),
        comment=_comment(job.get("comment")),
    )


def _comment(value: Any) -> str | None:
    """A job's comment: a string in squeue --json (22.05-24.05), an object {"job", "administrator", "system"} in
    sacct --json."""
    if isinstance(value, Mapping):
        value = value.get("job")
    return _text(value) if isinstance(value, str) else None


def jobs_from_json(payload: Mapping[str, Any], *, wanted: Collection[str] = ()) -> dict[str, JobStatus]:
    """`squeue --json` / GET .../jobs -> {job id: JobStatus}, with the aliases of statuses_with_aliases."""
    return statuses_with_aliases(((job, job_status_from_json(job)) for job in payload.get("jobs") or []
                                  if isinstance(job, Mapping) and job.get("job_id") is not None), wanted)


def statuses_with_aliases(jobs: Iterable[tuple[Mapping[str, Any], JobStatus]],
                          wanted: Collection[str] = ()) -> dict[str, JobStatus]:
    """{job id: JobStatus} of (a job's fields as Slurm's JSON names them, its status) pairs; each of `wanted` that
    is an array task ("A_T") or a het component ("H+O") is also found under that id (Slurm lists jobs by number
    only: its JSON, pyslurm)."""
    other_ids = {job_id for job_id in wanted if not job_id.isdigit()}
    statuses = {}
    for fields, status in jobs:
        for alias in _ids_among(fields, other_ids) if other_ids else ():
            statuses.setdefault(alias, dataclasses.replace(status, job_id=alias))
        statuses[status.job_id] = status
    return statuses


def _ids_among(job: Mapping[str, Any], ids: set[str]) -> list[str]:
    """Those of `ids` a JSON job entry answers to besides its number: "A_T" for an array task (or for each task a
    pending array record still holds in its task string: "1-10%2", "1,3,5-9:2"), "H+O" for a het component."""
    array_job, task = number(job.get("array_job_id")), number(job.get("array_task_id"))
    het_job, offset = number(job.get("het_job_id")), number(job.get("het_job_offset"))
    if array_job and array_job != math.inf:
        prefix = f"{int(array_job)}_"
        tasks = [int(job_id.removeprefix(prefix)) for job_id in ids
                 if job_id.startswith(prefix) and job_id.removeprefix(prefix).isdigit()]
        if task is not None and task != math.inf:
            return [f"{prefix}{t}" for t in tasks if t == task]
        text = _text(job.get("array_task_string"))
        return [f"{prefix}{t}" for t in tasks if _in_task_string(t, text)]
    if het_job and het_job != math.inf and offset is not None and offset != math.inf:
        component = f"{int(het_job)}+{int(offset)}"
        return [component] if component in ids else []
    return []


def _in_task_string(task: int, text: str | None) -> bool:
    """Is `task` one of an array's task string ("1-10%2", "1,3,5-9:2")? False for a string that is not one."""
    for part in (text or "").split("%")[0].split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part.strip())
        if match:
            low, high, step = int(match[1]), int(match[2] or match[1]), max(int(match[3] or 1), 1)
            if low <= task <= high and (task - low) % step == 0:
                return True
    return False


def missing_status(job_id: str, why: str) -> JobStatus:
    return JobStatus(job_id=job_id, state=JobState.UNKNOWN, raw_state="", reason=why, missing=True)


# Pinned `squeue` text format (fallback when --json fails): one line per job, fields split by "|".
# Name goes last: it is the one field that may hold the separator. JobID is the job's own number (as in squeue
# --json); JobArrayID its id as users give it where that differs: an array task's "12_3", a het component's "12+1".
SQUEUE_TEXT_FIELDS = ("JobID", "State", "Reason", "NodeList", "StartTime", "EndTime", "TimeLimit", "RestartCnt",
                      "Partition", "JobArrayID", "Name")
SQUEUE_TEXT_FORMAT = ",".join(f"{name}:0|" for name in SQUEUE_TEXT_FIELDS)


def jobs_from_squeue_text(text: str, *, wanted: Collection[str] = ()) -> dict[str, JobStatus]:
    """Output of `squeue -h -a -t all --array -O <SQUEUE_TEXT_FORMAT>` with SLURM_TIME_FORMAT=%s -> statuses by job
    number; each of `wanted` that is an array task ("A_T") or a het component ("H+O") also by that id."""
    other_ids = {job_id for job_id in wanted if not job_id.isdigit()}
    statuses = {}
    for line in text.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) < len(SQUEUE_TEXT_FIELDS) or not fields[0]:
            continue
        job_id, state, reason, nodelist, start, end, limit, restarts, partition, shown_id = fields[:10]
        name = "|".join(fields[10:]).removesuffix("|").strip()  # each field ends with "|", the name too
        word = slurm_state_word(state)
        statuses[job_id] = JobStatus(
            job_id=job_id,
            state=_STATE_MAP.get(word, JobState.UNKNOWN),
            raw_state=word,
            nodes=tuple(expand_hostlist(nodelist)),
            reason=_text(reason),
            name=_text(name),
            partition=_text(partition),
            start_time=_timestamp(start),
            end_time=_timestamp(end),
            time_limit=_walltime_text_to_seconds(limit),
            restart_count=_count(restarts),
        )
        if shown_id in other_ids:
            statuses[shown_id] = dataclasses.replace(statuses[job_id], job_id=shown_id)
    return statuses


# Comments in the text fallback come from a second call: a comment, like a name, may hold the separator, and only
# the last field of a line can.
SQUEUE_COMMENT_FORMAT = "JobID:0|,Comment:0|"


def comments_from_squeue_text(text: str) -> dict[str, str]:
    """Output of `squeue -h -a -t all -O <SQUEUE_COMMENT_FORMAT>` -> {job id: comment} (jobs with one)."""
    comments = {}
    for line in text.splitlines():
        job_id, sep, rest = line.partition("|")
        comment = _text(rest.removesuffix("|"))
        if sep and job_id.strip() and comment:
            comments[job_id.strip()] = comment
    return comments


def _walltime_text_to_seconds(text: str) -> int | None:
    text = (text or "").strip()
    if text.upper() in ("", "UNLIMITED", "INFINITE", "NONE", "N/A", "PARTITION_LIMIT"):
        return None
    try:
        return parse_walltime(text)
    except ValueError:
        return None


# sacct -X -n -P -o <SACCT_FIELDS> with SLURM_TIME_FORMAT=%s. JobName goes last: it is the one field that may
# hold the separator.
# JobID beside JobIDRaw: an array task's or het component's id as users give it ("12_3", "12+1").
SACCT_FIELDS = ("JobIDRaw", "State", "Reason", "NodeList", "Start", "End", "TimelimitRaw", "ExitCode", "Partition",
                "JobID", "JobName")


def jobs_from_sacct_text(text: str) -> dict[str, JobStatus]:
    """Parsable sacct output ("|"-separated, no header, allocations only) -> statuses by JobIDRaw, and by JobID too
    where that differs (array tasks, het components); the last record of a requeued job wins (sacct lists each
    run)."""
    statuses: dict[str, JobStatus] = {}
    runs: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < len(SACCT_FIELDS) or not fields[0].strip():
            continue
        job_id, state, reason, nodelist, start, end, limit, code_and_signal, partition, shown_id = fields[:10]
        name = "|".join(fields[10:])
        word = slurm_state_word(state)
        runs[job_id] = runs.get(job_id, -1) + 1
        code, _, signal = code_and_signal.partition(":")  # "exit:signal"
        statuses[job_id] = JobStatus(
            job_id=job_id,
            state=_STATE_MAP.get(word, JobState.UNKNOWN),
            raw_state=word,
            nodes=tuple(expand_hostlist(nodelist)) if nodelist not in ("None assigned", "") else (),
            reason=_text(reason),
            name=_text(name),
            partition=_text(partition),
            start_time=_timestamp(start),
            end_time=_timestamp(end),
            time_limit=_minutes_to_seconds(limit),
            restart_count=runs[job_id],
            exit_code=exit_code(code, signal),
        )
        shown_id = shown_id.strip()
        if shown_id and shown_id != job_id and "[" not in shown_id:  # not a pending array's "12_[3-9]"
            statuses[shown_id] = dataclasses.replace(statuses[job_id], job_id=shown_id)
    return statuses


# ---------------------------------------------------------------------------------------------------- nodes


def count_gpus(gres: str | None) -> int:
    """GPUs in a GRES string: "gpu:2", "gpu:a100:4(S:0-1)", "gpu:a100:2,gpu:v100:1", "gpu:1(IDX:0)",
    "gres/gpu=2" -> 2, 4, 3, 1, 2."""
    total = 0
    for entry in _split_top_level_parens(gres or ""):
        entry = entry.strip()
        if entry.startswith("gres/"):  # TRES form; typed entries (gres/gpu:a100=2) repeat the total
            key, _, value = entry.partition("=")
            total += _count(value) if key == "gres/gpu" else 0
            continue
        entry = re.sub(r"\([^()]*\)$", "", entry)  # the last group only: an untyped GPU's type prints as "(null)"
        parts = entry.split(":")
        if parts[0] != "gpu":
            continue
        if len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
        elif len(parts) >= 2 and re.match(r"^\d+[KMG]?$", parts[-1]):
            total += int(re.match(r"^\d+", parts[-1]).group())
        else:
            total += 1  # "gpu" or "gpu:type" alone means one
    return total


def _split_top_level_parens(text: str) -> list[str]:
    items, depth, current = [], 0, []
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return [item for item in items if item.strip() and item.strip() not in ("(null)", "N/A")]


def _node_state(value: Any, flags: Any = None) -> tuple[str, tuple[str, ...]]:
    """'mixed' + ['DRAIN'] (22.05), ['IDLE', 'DRAIN'] (23.11+), 'IDLE+DRAIN' or 'DOWN*' (text) -> base, flags."""
    if isinstance(value, (list, tuple)):
        words = [str(v).upper() for v in value]
    else:
        text = str(value or "UNKNOWN").upper()
        words = text.split("+")
        if words[0].endswith("*"):
            words[0] = words[0].rstrip("*")
            words.append("NOT_RESPONDING")
    extra = [str(f).upper() for f in (flags or [])]
    base = words[0] if words else "UNKNOWN"
    return base, tuple(dict.fromkeys(words[1:] + extra))


def _features(value: Any) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(str(v) for v in value if v)
    text = _text(value)
    return tuple(f for f in text.split(",") if f) if text else ()


def _partitions(value: Any) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(str(v) for v in value if v)
    text = _text(value)
    return tuple(p for p in text.split(",") if p) if text else ()


def node_from_json(node: Mapping[str, Any]) -> NodeInfo:
    """One entry of `sinfo --json` (22.05-23.11) / `scontrol show nodes --json` / GET .../nodes -> NodeInfo."""
    base, flags = _node_state(node.get("state"), node.get("state_flags"))
    gres = _text(node.get("gres")) or ""
    gres_used = _text(node.get("gres_used")) or ""
    gpus_total = count_gpus(gres) or _tres_gpus(node.get("tres"))
    gpus_used = count_gpus(gres_used) or _tres_gpus(node.get("tres_used"))
    return NodeInfo(
        name=str(node.get("name") or node.get("hostname") or ""),
        state=base,
        state_flags=flags,
        partitions=_partitions(node.get("partitions")),
        gres=gres,
        gres_used=gres_used,
        gpus_total=gpus_total,
        gpus_used=gpus_used,
        cpus_total=_count(node.get("cpus")),
        cpus_allocated=_count(node.get("alloc_cpus")),
        memory_mb=_count(node.get("real_memory")),
        memory_allocated_mb=_count(node.get("alloc_memory")),
        features=_features(node.get("features")),
        reason=_text(node.get("reason")),
    )


def _tres_gpus(tres: Any) -> int:
    text = _text(tres) or ""
    for entry in text.split(","):
        key, _, value = entry.partition("=")
        if key == "gres/gpu":
            return _count(value)
    return 0


def nodes_from_json(payload: Mapping[str, Any]) -> list[NodeInfo]:
    return [node_from_json(n) for n in payload.get("nodes") or [] if isinstance(n, Mapping)]


def parse_key_values(line: str) -> dict[str, str]:
    """One line of `scontrol -o show ...`: "NodeName=n1 Arch=x86_64 OS=Linux 6.1 #1 SMP ..." -> dict. Values
    may hold spaces (OS=, Reason=): a new key starts only at a space followed by Word=."""
    pairs = re.split(r"\s+(?=[A-Za-z][A-Za-z0-9_:/.-]*=)", line.strip())
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if sep:
            result[key] = value.strip()
    return result


def nodes_from_scontrol_text(text: str) -> list[NodeInfo]:
    """`scontrol -d -o show node` -> NodeInfo list (works on every Slurm version)."""
    nodes = []
    for line in text.splitlines():
        if not line.startswith("NodeName="):
            continue
        kv = parse_key_values(line)
        base, flags = _node_state(kv.get("State"))
        gres = _text(kv.get("Gres")) or ""
        gres_used = _text(kv.get("GresUsed")) or ""
        nodes.append(NodeInfo(
            name=kv["NodeName"],
            state=base,
            state_flags=flags,
            partitions=_partitions(kv.get("Partitions")),
            gres=gres,
            gres_used=gres_used,
            gpus_total=count_gpus(gres) or _tres_gpus(kv.get("CfgTRES")),
            gpus_used=count_gpus(gres_used) or _tres_gpus(kv.get("AllocTRES")),
            cpus_total=_count(kv.get("CPUTot")),
            cpus_allocated=_count(kv.get("CPUAlloc")),
            memory_mb=_count(kv.get("RealMemory")),
            memory_allocated_mb=_count(kv.get("AllocMem")),
            features=_features(kv.get("AvailableFeatures")),
            reason=_text(kv.get("Reason")),
        ))
    return nodes


# ----------------------------------------------------------------------------------------------- partitions


def partitions_from_scontrol_text(text: str) -> list[PartitionInfo]:
    """`scontrol -o show partition` -> PartitionInfo list."""
    partitions = []
    for line in text.splitlines():
        if not line.startswith("PartitionName="):
            continue
        kv = parse_key_values(line)
        partitions.append(PartitionInfo(
            name=kv["PartitionName"],
            state=(kv.get("State") or "UNKNOWN").upper(),
            nodes=tuple(expand_hostlist(kv.get("Nodes"))),
            is_default=kv.get("Default", "NO").upper() == "YES",
            max_time=_walltime_text_to_seconds(kv.get("MaxTime", "")),
            priority_tier=_optional_int(kv.get("PriorityTier")),
            total_cpus=_optional_int(kv.get("TotalCPUs")),
            total_nodes=_optional_int(kv.get("TotalNodes")),
        ))
    return partitions


def _optional_int(value: Any) -> int | None:
    value = number(value)
    return None if value is None or value == math.inf else int(value)


def partitions_from_json(payload: Mapping[str, Any]) -> list[PartitionInfo]:
    """GET .../partitions (v0.0.38: flat fields; 23.02+: nested "maximums"/"priority"/"partition" objects)."""
    partitions = []
    for part in payload.get("partitions") or []:
        if not isinstance(part, Mapping):
            continue
        flags = [str(f).lower() for f in _as_list(part.get("flags"))]
        state = part.get("state")
        if isinstance(part.get("partition"), Mapping):  # 23.02+: {"partition": {"state": [...]}}
            state = part["partition"].get("state", state)
        state_word = (state[0] if isinstance(state, list) and state else state) or "UP"
        max_time = part.get("max_time_limit", part.get("maximum_time"))  # minutes; -1: no limit (v0.0.38)
        if isinstance(part.get("maximums"), Mapping):
            max_time = part["maximums"].get("time", max_time)
        tier = part.get("priority_tier")
        if isinstance(part.get("priority"), Mapping):
            tier = part["priority"].get("tier", tier)
        nodes = part.get("nodes")
        if isinstance(nodes, Mapping):
            nodes = nodes.get("configured") or nodes.get("allowed_allocation")
        cpus = part.get("total_cpus")
        if isinstance(part.get("cpus"), Mapping):
            cpus = part["cpus"].get("total", cpus)
        node_count = part.get("total_nodes")
        if isinstance(part.get("nodes"), Mapping):
            node_count = part["nodes"].get("total", node_count)
        partitions.append(PartitionInfo(
            name=str(part.get("name")),
            state=str(state_word).upper(),
            nodes=tuple(expand_hostlist(nodes if isinstance(nodes, str) else None)),
            is_default="default" in flags,
            max_time=_minutes_to_seconds(max_time),
            priority_tier=_optional_int(tier),
            total_cpus=_optional_int(cpus),
            total_nodes=_optional_int(node_count),
        ))
    return partitions


# --------------------------------------------------------------------------------------------- reservations


def with_reservations(nodes: list[NodeInfo], reservations: Callable[[], list[ReservationInfo]]) -> list[NodeInfo]:
    """The nodes, each with the service's reservations (service_reservations(): SBATCH_RESERVATION) whose jobs may
    run there: a reservation's own nodes, and, for a FLEX or node-less one (ReservationInfo.takes_unreserved_nodes),
    the nodes in no reservation (not RESERVED). reservations() (a backend's one read of all Slurm shows) is called
    once, never without SBATCH_RESERVATION. A reservation Slurm does not show (ended, misspelt: sbatch would refuse
    every job) is a SlurmError saying what to set; one read that fails, a SlurmError naming the reservations."""
    wanted = service_reservations()
    if not wanted:
        return nodes
    try:
        shown = {resv.name: resv for resv in reservations()}
    except SlurmUnavailable:
        raise
    except SlurmError as exc:
        raise SlurmError(f"cannot read Slurm's reservations, for the nodes of {', '.join(map(repr, wanted))}, which "
                         f"SBATCH_RESERVATION (the service's environment) names for the service's jobs: {exc}",
                         exc.slurm_message) from None
    for name in wanted:
        if name not in shown:
            raise SlurmError(f"Slurm shows no reservation {name!r}, which SBATCH_RESERVATION (the service's "
                             f"environment) names for the service's jobs (sbatch refuses them): set "
                             f"SBATCH_RESERVATION to the service's current reservation (`scontrol show reservation` "
                             f"lists them) or unset it")

    def takes(node: NodeInfo, resv: ReservationInfo) -> bool:
        return node.name in resv.nodes or (resv.takes_unreserved_nodes and "RESERVED" not in node.state_flags)

    return [dataclasses.replace(node, reservations=tuple(r for r in wanted if takes(node, shown[r])))
            for node in nodes]


def reservations_from_scontrol_text(text: str) -> list[ReservationInfo]:
    """`scontrol -o show reservation` -> every reservation ("No reservations in the system": none)."""
    return [ReservationInfo(name=kv["ReservationName"], nodes=tuple(expand_hostlist(kv.get("Nodes"))),
                            flags=_flags(kv.get("Flags")))
            for kv in (parse_key_values(line) for line in text.splitlines() if line.startswith("ReservationName="))]


def reservations_from_json(payload: Mapping[str, Any]) -> list[ReservationInfo]:
    """GET .../reservations (`{"reservations": [{"name", "node_list", "flags"}]}`) -> every reservation."""
    return [ReservationInfo(name=str(resv["name"]), nodes=tuple(expand_hostlist(_text(resv.get("node_list")))),
                            flags=_flags(resv.get("flags")))
            for resv in payload.get("reservations") or [] if isinstance(resv, Mapping) and resv.get("name")]


def _flags(value: Any) -> tuple[str, ...]:
    """Slurm's flags, "FLEX,SPEC_NODES" or ["FLEX", "SPEC_NODES"] -> ("FLEX", "SPEC_NODES")."""
    text = _text(value)
    return tuple(flag.strip().upper() for flag in text.split(",") if flag.strip()) if text else ()


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def errors_from_json(payload: Mapping[str, Any]) -> list[str]:
    """The "errors" list every Slurm JSON answer carries -> messages."""
    messages = []
    for error in payload.get("errors") or []:
        if isinstance(error, Mapping):
            text = error.get("error") or error.get("description") or ""
            code = error.get("error_number") or error.get("error_code") or error.get("errno")
            messages.append(f"{text} (error {code})" if code and text else str(text or code or error))
        else:
            messages.append(str(error))
    return [m for m in messages if m]
