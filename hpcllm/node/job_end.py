"""When the agent's own Slurm job ends, as Slurm says now: a model pool's agent reports it in its heartbeats, and the
controller hands the pool over before it (docs/controller.md "Model pools").

Slurm 22.05 puts no end time in the job's environment (later versions set SLURM_JOB_END_TIME, but only as it was at
the start), and `scontrol update JobId=N TimeLimit=...` moves the end while the job runs: the agent asks squeue for
its one job now and then, through the CLI backend (its pinned text format, and its errors with their hints).
"""

from __future__ import annotations

from hpcllm.slurm.cli_backend import CliBackend


def read_job_end(job_id: str, timeout: float) -> float | None:
    """The job's end (Unix time); None for a job without a time limit. SlurmError when squeue cannot be run, fails,
    or does not list the job (its message says which, and what to check)."""
    return CliBackend(command_timeout=timeout).job_end(job_id)
