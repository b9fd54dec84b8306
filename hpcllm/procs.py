"""Small process helpers shared by the services (stale temp files, leases, pid files)."""

import os


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (even one owned by another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
