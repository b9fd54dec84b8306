"""Small process helpers shared by the services (stale temp files, leases, pid files)."""

import gc
import os
import subprocess
from pathlib import Path


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


def proc_stat(pid: int | str) -> list[str] | None:
    """/proc/pid/stat's fields from the state (field 3) on; None once the pid is gone. "pid (comm) state ppid ...":
    comm may hold spaces and parentheses, the last ")" ends it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def descendants(pid: int) -> list[int]:
    """Every live process under pid (children first), from /proc: mpirun's ranks, which OpenMPI moves to process
    groups of their own, so a group kill would miss them."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = proc_stat(stat.parent.name)
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(parents.get(pid, []))
    while todo:
        child = todo.pop(0)
        found.append(child)
        todo += parents.get(child, [])
    return found


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
