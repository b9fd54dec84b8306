"""Folders only the service user may touch: state, node caches, shared-memory (/dev/shm) copies.

Their default places live under world-writable folders (/var/tmp, /dev/shm) at predictable names, so another local
user could create one first and have the service write into, or load weights from, a folder they control. Every
such folder is created 0700 and must belong to the user running hpcllm: one of someone else's is refused with the
fix; one of ours that an older version left group/world-accessible is tightened to 0700. The folders above it are
checked like OpenSSH's safe_path checks those above a key file: each belongs to root or to us, and no one else may
write to it - except that sticky folders (/tmp, /var/tmp, /dev/shm) are accepted, which safe_path does not do -
else another user could rename ours away and put a folder of theirs in its place.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hpcllm.errors import ConfigError


class NotPrivate(ConfigError):
    """A folder hpcllm keeps private belongs to another user."""


def private_dir(path: str | os.PathLike, what: str, fix: str) -> Path:
    """Create `path` (and missing parents) 0700, or check an existing one: ours (else NotPrivate naming `what`
    and `fix`), and 0700 (tightened if not), in folders no other user may change (_check_parents). Returns the
    path."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise NotPrivate(f"{what} {path} is not a folder (a symbolic link or a file is there); remove it or {fix}")
    if info.st_uid != os.getuid():
        raise NotPrivate(f"{what} {path} belongs to another user (uid {info.st_uid}); {fix}")
    _check_parents(path, what, fix)
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)
    return path


def _check_parents(path: Path, what: str, fix: str) -> None:
    """NotPrivate when a folder above `path` belongs to another user than root and us, or others may write to it
    and it is not sticky: they may rename entries there, `path` included. Both the folders of the path as written
    and of its real one: a symbolic link on the way (/shared/me -> ~/x) lies in a folder too, where it can be
    replaced. Of a link itself only the owner counts (its target is among the real path's folders)."""
    written = Path(os.path.abspath(path)).parents
    real = Path(os.path.realpath(path)).parents
    for parent in dict.fromkeys([*written, *real]):
        info = parent.lstat()
        if info.st_uid not in (0, os.getuid()):
            raise NotPrivate(f"{what} {path} lies in {parent}, which belongs to another user (uid {info.st_uid}) "
                             f"who could put a folder of theirs in its place; {fix}")
        if stat.S_ISLNK(info.st_mode):
            continue
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o022 and not mode & stat.S_ISVTX:
            raise NotPrivate(f"{what} {path} lies in {parent}, which other users may write to (mode {mode:o}, not "
                             f"sticky): they could put a folder of theirs in its place; {fix}, or run "
                             f"`chmod go-w {parent}`")


def owned_by_us(path: str | os.PathLike) -> bool:
    """True when `path` (not following a symbolic link) belongs to this process's user and no one else may write
    to it."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return info.st_uid == os.getuid() and not stat.S_IMODE(info.st_mode) & 0o022 and not stat.S_ISLNK(info.st_mode)
