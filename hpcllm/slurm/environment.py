"""The environment Slurm commands and submitted jobs get, shared by the CLI, REST and pyslurm backends."""

from __future__ import annotations

import os

# Variables that change what Slurm's commands print (formats, default filters, time format).
_OUTPUT_VARIABLE_PREFIXES = ("SQUEUE_", "SINFO_", "SACCT_", "SCONTROL_")
_OUTPUT_VARIABLES = {"SLURM_TIME_FORMAT"}


def clean_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ without the user's output-format settings, with epoch times, plus `extra`."""
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(_OUTPUT_VARIABLE_PREFIXES) and key not in _OUTPUT_VARIABLES
    }
    env["SLURM_TIME_FORMAT"] = "%s"
    if extra:
        env.update(extra)
    return env


def job_environment(extra: dict[str, str]) -> dict[str, str]:
    """Like sbatch's default --export=ALL: the submitter's environment (without output-format settings and
    without another job's SLURM_* variables) plus the job's own."""
    env = {key: value for key, value in clean_environment().items()
           if not key.startswith("SLURM_") or key == "SLURM_CONF"}
    env.update(extra)
    return env
