"""Errors of the Slurm backends.

SlurmError carries Slurm's own words (e.g. "sbatch: error: invalid partition specified: nope") so the user sees
what Slurm refused and can fix the request; SlurmUnavailable means Slurm could not be asked at all (command
missing, controller down, slurmrestd unreachable) and says how to check.
"""

from __future__ import annotations

import re

from hpcllm.errors import HpcllmError


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


# Slurm's words (scancel, slurmrestd, libslurm alike) for a job that has already ended.
_ALREADY_DONE = re.compile(r"already completing or completed|Invalid job id specified|Job has already finished",
                           re.IGNORECASE)


def already_done(exc: SlurmError) -> bool:
    """Slurm refused because the job has already ended: for a cancel, the wanted outcome, not an error."""
    return not isinstance(exc, SlurmUnavailable) and bool(_ALREADY_DONE.search(exc.slurm_message))
