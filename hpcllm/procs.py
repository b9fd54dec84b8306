"""Small process helpers shared by the services (stale temp files, leases, pid files)."""

import os
import subprocess


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (even one owned by another user) and has not exited: a zombie (exited,
    not yet reaped - e.g. a tensor-parallel rank whose mpirun was killed, in a container whose init does not reap)
    holds no files or references any more."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stop_process(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop a child: SIGTERM (a graceful stop), SIGKILL if it is still running after `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
