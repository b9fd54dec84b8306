"""When the agent's own Slurm job ends, as Slurm says now: a model pool's agent reports it in its heartbeats, and the
controller hands the pool over before it (docs/controller.md "Model pools").

Slurm 22.05 puts no end time in the job's environment (later versions set SLURM_JOB_END_TIME, but only as it was at
the start), and `scontrol update JobId=N TimeLimit=...` moves the end while the job runs: the agent asks squeue for
its one job now and then, in the pinned text format the CLI backend parses (hpcllm.slurm.adapter).
"""

from __future__ import annotations

import subprocess

from hpcllm.slurm import adapter
from hpcllm.slurm.environment import run_slurm_command
from hpcllm.slurm.errors import SlurmError


def read_job_end(job_id: str, timeout: float) -> float | None:
    """The job's end (Unix time); None for a job without a time limit. SlurmError when squeue cannot be run, fails,
    or does not list the job (its message says which)."""
    args = ["squeue", "--noheader", f"--jobs={job_id}", f"--Format={adapter.SQUEUE_TEXT_FORMAT}"]
    try:
        result = run_slurm_command(args, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"squeue cannot be run: {exc}") from None
    if result.returncode != 0:
        said = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
        raise SlurmError(f"squeue failed: {said[:300]}")
    status = adapter.jobs_from_squeue_text(result.stdout).get(job_id)
    if status is None:
        raise SlurmError(f"squeue does not list job {job_id}")
    return status.end_time if status.time_limit is not None else None
