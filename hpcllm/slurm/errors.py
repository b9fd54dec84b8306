"""Errors of the Slurm backends.

SlurmError carries Slurm's own words (e.g. "sbatch: error: invalid partition specified: nope") so the user sees
what Slurm refused and can fix the request; a submission refused over a setting hpcllm chose (partition, account,
qos, GPUs, time) also names the [slurm] key that chose it (with_setting_hint). SlurmUnavailable means Slurm could
not be asked at all (command missing, controller down, slurmrestd unreachable) and says how to check.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from hpcllm.errors import HpcllmError
from hpcllm.slurm.environment import RESERVATION_VARIABLE, service_reservations

if TYPE_CHECKING:
    from hpcllm.slurm.base import JobSpec


class SlurmError(HpcllmError):
    """Slurm answered and refused (bad partition, bad account, unknown job, ...)."""

    exit_code = 4

    def __init__(self, message: str, slurm_message: str = ""):
        super().__init__(message)
        # Slurm's own text, unchanged, for callers that show or match it.
        self.slurm_message = slurm_message or message


class SlurmUnavailable(SlurmError):
    """Slurm could not be asked, or its answer was lost: command missing, controller down, REST endpoint
    unreachable or timed out, a submission accepted without a readable job id (the job may exist)."""

    exit_code = 5


class SlurmBackendUnsupported(HpcllmError):
    """The configured backend cannot work on this site (e.g. pyslurm does not match the installed Slurm)."""

    exit_code = 2


# Slurm's words (any command, slurmrestd alike) for "could not ask slurmctld", as opposed to a refusal.
UNREACHABLE_PATTERNS = re.compile(
    r"Unable to contact slurm controller|Could not establish a configuration source|Connection refused|"
    r"Unable to process configuration file|s_p_parse_file: cannot stat file|"
    r"Socket timed out|Zero Bytes were transmitted|Communication connection failure|Munge|munge|"
    r"slurm_load_jobs error: Unable|Slurm backup controller in standby mode|No route to host",
)

def unreachable(who: str, message: str) -> SlurmUnavailable:
    """Slurm could not be asked: `who` (a command, a pyslurm call, slurmrestd) with Slurm's own words (one of
    UNREACHABLE_PATTERNS) and how to check; the one wording of all three backends."""
    return SlurmUnavailable(f"{who}: Slurm is not reachable: {message} (check with: scontrol ping; is SLURM_CONF "
                            f"set?)", message)


# Slurm's words (scancel, slurmrestd, libslurm alike) for a job that has already ended.
_ALREADY_DONE = re.compile(r"already completing or completed|Invalid job id specified|Job has already finished",
                           re.IGNORECASE)


def already_done(exc: SlurmError) -> bool:
    """Slurm refused because the job has already ended: for a cancel, the wanted outcome, not an error."""
    return not isinstance(exc, SlurmUnavailable) and bool(_ALREADY_DONE.search(exc.slurm_message))


# Slurm's words for a job asking for a reservation that does not exist (ended, misspelt) or is not the user's.
_RESERVATION_REFUSED = "Requested reservation is invalid"
# Slurm's words when the nodes a job may use (its partition's, less --exclude, or just --nodelist) cannot hold it.
_NODES_CANNOT_HOLD = "Requested node configuration is not available"


# Slurm's words for a job refused over a setting hpcllm chose (slurm_errno.c; the same in 22.05 and later), the
# [slurm] keys that chose it, and where the user finds what the site allows.
_SETTING_REFUSALS = (
    ("Invalid partition name specified", ("partition",), "`sinfo -s` lists the partitions"),
    ("No partition specified or system default partition", ("partition",), "`sinfo -s` lists the partitions"),
    ("Invalid account or account/partition combination specified", ("account", "partition"),
     "`sacctmgr show assoc user=$USER format=account,partition` lists yours"),
    ("Invalid qos specification", ("qos",), "`sacctmgr show assoc user=$USER format=account,qos` lists yours"),
    ("Invalid generic resource (gres) specification", ("gpus_per_node",),
     "`sinfo -o '%P %G'` shows each partition's GRES (an allocation for a model asks at least its gpus)"),
    ("Requested time limit is invalid", ("time",), "`sinfo -o '%P %l'` shows each partition's time limit"),
    # Over a QOS or association limit (MaxWall, MaxTRESPerUser/Job, MaxSubmitJobs): the job's size or time.
    ("Job violates accounting/QOS policy", ("qos", "time", "gpus_per_node"),
     "`sacctmgr show qos format=name,maxwall,maxtrespu,maxtrespj,maxsubmitpu` shows the QOS limits"),
    # More GPUs per node (or nodes of that shape) than any node of the partition has.
    (_NODES_CANNOT_HOLD, ("gpus_per_node", "partition"),
     "`sinfo -o '%P %D %G'` shows each partition's nodes and GRES (nodes a job names must have them too)"),
)
# The keys a model's own [slurm] table may override: controller.protocol.SlurmOverrides' fields (a controller test
# holds the two together; the controller imports this package, not the reverse).
MODEL_OVERRIDES = ("partition", "account", "qos", "time")


def with_setting_hint(exc: SlurmError, spec: JobSpec) -> SlurmError:
    """A refused submission, with the [slurm] key(s) behind Slurm's refusal and what this job asked for named after
    Slurm's own words; `exc` itself for another refusal, or when Slurm could not be asked."""
    if isinstance(exc, SlurmUnavailable):
        return exc
    said = exc.slurm_message.lower()
    reservations = service_reservations()
    if reservations and _RESERVATION_REFUSED.lower() in said:  # no [slurm] key: sbatch took it from our environment
        return SlurmError(f"{exc} -- the job's reservation came from hpcllm's environment, {RESERVATION_VARIABLE}="
                          f"{','.join(reservations)}: set it to a reservation the service may use now (`scontrol show "
                          f"reservation` lists them) or unset it", exc.slurm_message)
    for words, keys, where in _SETTING_REFUSALS:
        if words.lower() in said:
            asked = ", ".join(f"{key} {_asked(spec, key)}" for key in keys)
            overrides = " or ".join(f"the model's slurm.{key}" for key in keys if key in MODEL_OVERRIDES)
            settings = " and ".join(f"[slurm] {key}" for key in keys) + (f" (or {overrides})" if overrides else "")
            return SlurmError(f"{exc} -- the job asked for {asked}{_node_choice(spec, words)}: set {settings} in "
                              f"hpcllm's config to what this site allows; {where}", exc.slurm_message)
    return exc


def _node_choice(spec: JobSpec, words: str) -> str:
    """For a refusal over the nodes a job may use, the nodes it named or left out: the controller leaves out the
    nodes where its agents run, and where those are all of the partition's nodes, Slurm refuses in these words."""
    if words != _NODES_CANNOT_HOLD:
        return ""
    named = f", only nodes {','.join(spec.nodelist)} (--nodelist)" if spec.nodelist else ""
    left_out = f", none of nodes {','.join(spec.exclude)} (--exclude; too few of the partition's nodes may be " \
               f"left)" if spec.exclude else ""
    return named + left_out


def _asked(spec: JobSpec, key: str) -> str:
    if key == "gpus_per_node":
        value = spec.gres or (f"gpu:{spec.gpus_per_node}" if spec.gpus_per_node else None)
    else:
        value = getattr(spec, key)
    return repr(value) if value is not None else "unset (Slurm's default)"
