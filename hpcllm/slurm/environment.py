"""The environment Slurm commands and submitted jobs get, and the one way hpcllm runs a Slurm command; shared by
the CLI, REST and pyslurm backends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile

# Variables that change what Slurm's commands print (formats, default filters, time format) or do: scancel's
# (SCANCEL_STATE=PENDING, SCANCEL_NAME, SCANCEL_INTERACTIVE: a cancel that cancels nothing and exits 0;
# SCANCEL_BATCH/FULL: which processes a signal reaches).
_OUTPUT_VARIABLE_PREFIXES = ("SQUEUE_", "SINFO_", "SACCT_", "SCONTROL_", "SCANCEL_")
# Variables no option of hpcllm's can undo (sbatch has no --no-wait, no "not an array"): SBATCH_WAIT holds every
# submit until the job ends, SBATCH_ARRAY_INX makes N jobs of which one is tracked, *_CLUSTERS sends the jobs
# (and squeue's and scancel's questions) to another cluster than slurm.conf's. The other SBATCH_* variables are
# beaten by hpcllm's options on sbatch's command line (CliBackend._sbatch) or apply where hpcllm sets nothing
# (bench/replay.py gives CPU-served allocations GPUs with SBATCH_GRES).
_UNDOABLE_VARIABLES = {"SBATCH_WAIT", "SBATCH_ARRAY_INX", "SBATCH_CLUSTERS", "SLURM_CLUSTERS"}
_DROPPED_VARIABLES = {"SLURM_TIME_FORMAT"} | _UNDOABLE_VARIABLES


def inherited(name: str, inherit: tuple[str, ...] | None) -> bool:
    """Does a job that inherits `inherit` (variable names; "NAME*" a prefix; None: every one) get variable `name`?"""
    return inherit is None or any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in inherit)


def clean_environment(extra: dict[str, str] | None = None, inherit: tuple[str, ...] | None = None) -> dict[str, str]:
    """os.environ without the user's output-format settings and the submission settings hpcllm cannot undo, with
    epoch times, plus `extra`. inherit: only those variables (see `inherited`), and the SBATCH_* ones and
    SLURM_CONF, which Slurm's commands read themselves - sbatch's environment for a job that inherits no more."""
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(_OUTPUT_VARIABLE_PREFIXES) and key not in _DROPPED_VARIABLES
        and (key.startswith("SBATCH_") or key == "SLURM_CONF" or inherited(key, inherit))
    }
    env["SLURM_TIME_FORMAT"] = "%s"
    if extra:
        env.update(extra)
    return env


def inherited_sbatch_options() -> dict[str, str]:
    """The SBATCH_* variables sbatch still reads from our environment after clean_environment(), sorted."""
    return {key: value for key, value in sorted(clean_environment().items()) if key.startswith("SBATCH_")}


# The variable sbatch reads the job's reservation(s) from; no [slurm] key sets one (service_reservations()).
RESERVATION_VARIABLE = "SBATCH_RESERVATION"


def service_reservations() -> tuple[str, ...]:
    """The Slurm reservations the service's jobs run in: SBATCH_RESERVATION, which sbatch reads (a comma-separated
    list: the one that starts the job first); () for none."""
    value = inherited_sbatch_options().get(RESERVATION_VARIABLE, "")
    return tuple(name for name in (part.strip() for part in value.split(",")) if name)


def job_environment(extra: dict[str, str], inherit: tuple[str, ...] | None = None) -> dict[str, str]:
    """Like sbatch's --export=ALL: the submitter's environment (without output-format settings and without another
    job's SLURM_* variables; inherit: only those variables) plus the job's own."""
    env = {key: value for key, value in clean_environment(inherit=inherit).items()
           if not key.startswith("SLURM_") or key == "SLURM_CONF"}
    env.update(extra)
    return env


def run_slurm_command(args: list[str], *, timeout: float, stdin: str | None = None, env: dict[str, str] | None = None,
                      inherit: tuple[str, ...] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one Slurm command with clean_environment(env, inherit); no input means /dev/null (never our terminal).

    The answer is what the command wrote until it exited. Its output goes to files, not pipes, so a child it leaves
    in the background (a site wrapper's logger, a daemon it starts) that keeps them open does not hold the answer
    back until the timeout. It runs in a session of its own: at the timeout the whole group is killed, children too.
    Output is read as UTF-8 with undecodable bytes replaced (U+FFFD): `squeue --all` prints every user's job
    names and comments, and sbatch relays site messages, in whatever encoding each was written; one such byte must
    not make the whole answer unreadable. OSError (FileNotFoundError: no such command) and
    subprocess.TimeoutExpired reach the caller."""
    with tempfile.TemporaryFile() as feed, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        if stdin is not None:
            feed.write(stdin.encode("utf-8", "replace"))
            feed.seek(0)
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL if stdin is None else feed, stdout=out,
                                   stderr=err, env=clean_environment(env, inherit), start_new_session=True)
        try:
            returncode = process.wait(timeout)
        except BaseException:  # the timeout, or an interrupt: nothing of the command outlives it
            _kill_session(process)
            raise
        return subprocess.CompletedProcess(args, returncode, _text(out), _text(err))


def _kill_session(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group has already exited
        os.killpg(process.pid, signal.SIGKILL)  # its session's group: start_new_session made it the leader
    process.wait()


def _text(file) -> str:
    """What the command wrote, as subprocess.run(encoding="utf-8", errors="replace") reads it (universal newlines)."""
    file.seek(0)
    return file.read().decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
