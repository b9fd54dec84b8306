"""Small process helpers shared by the services (stale temp files, leases, pid files)."""

import gc
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


def exited_within(process: subprocess.Popen, timeout: float) -> bool:
    """Wait up to `timeout` seconds for a child to exit (and reap it); whether it did."""
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def stop_process(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop a child: SIGTERM (a graceful stop), SIGKILL if it is still running after `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        if not exited_within(process, timeout):
            process.kill()
            process.wait()


def freeze_startup_heap() -> None:
    """Take what the process built at start (imports, the model, the app) out of the garbage collector's walks
    (gc.freeze, as vLLM's engine core and API server do). After torch and transformers are imported a process holds
    ~385k tracked objects, and each full collection walks them all with the GIL held: ~0.1-0.2 s during which no
    thread of the process runs, whenever enough new objects have piled up to trigger one. Frozen objects are still
    freed by reference counting; only cycles among them wait for the process's end."""
    gc.collect()
    gc.freeze()
