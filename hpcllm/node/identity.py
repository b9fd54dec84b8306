"""Which node this process runs on, as Slurm names it, and the node-pattern expansion of node paths (%n, %j).

Used by the node agent and by processes it starts (a tensor-parallel rank finding its node's slice copy), so it
lives apart from both.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path

from hpcllm.errors import ConfigError

log = logging.getLogger(__name__)

MOUNTINFO = Path("/proc/self/mountinfo")
# $NAME or ${NAME}: os.path.expandvars' own pattern (posixpath._varprog), so that what is checked is what it expands
VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})", re.ASCII)
# Filesystems that several nodes mount: a node cache's SQLite state (WAL mode: shared memory, one host) and its
# liveness checks (process ids) hold only on one node's own storage.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph",
                                 "glusterfs", "fuse.glusterfs", "fuse.sshfs", "panfs", "wekafs", "9p", "afs",
                                 "fuse.ceph", "orangefs", "pvfs2", "ocfs2", "gfs2"})


def node_name() -> str:
    """The Slurm node name where Slurm set it (it is what Slurm and the controller call the node), else hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def slurm_job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or None


def expand_node_pattern(value: str, node: str, job_id: str | None, setting: str = "the setting") -> str:
    """%n -> node name, %j -> Slurm job id (or 'nojob'), then $VARIABLES from the environment (expand_variables)."""
    return expand_variables(value.replace("%n", node).replace("%j", job_id or "nojob"), setting, node)


def expand_variables(value: str, setting: str, node: str) -> str:
    """$VARIABLES of a node's folder from this process's environment. One that is not set is a ConfigError naming
    `setting` and the variable: os.path.expandvars leaves it as it is, and "$NAME/..." named a folder called "$NAME",
    in the current folder (often on the shared FS) when it came first."""
    unset = [written for written, name in variables(value) if name not in os.environ]
    if unset:
        raise ConfigError(f"{setting} = {value!r} uses {unset[0]}, which is not set on node {node}: set it in the "
                          f"environment of the job that runs there (its job script), or write the folder without it")
    return os.path.expandvars(value)


def variables(value: str) -> list[tuple[str, str]]:
    """The $VARIABLES in value, each as written ("${NAME}") and its name ("NAME")."""
    return [(match.group(0), match.group(1).removeprefix("{").removesuffix("}")) for match in VARIABLE.finditer(value)]


def filesystem_type(path: Path, mountinfo: Path | None = None) -> str | None:
    """The type of the filesystem `path` (or its nearest existing folder) is on, from the mount table: the mount
    point that is the longest prefix of its real path, the last mounted there; None where the table cannot be read
    (not Linux)."""
    real = Path(os.path.realpath(path))
    _reach(real)  # first: an automounted share not mounted yet shows only its autofs entry in the table
    try:
        lines = (mountinfo or MOUNTINFO).read_text().splitlines()
    except OSError:
        return None
    best, kind = -1, None
    for line in lines:
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        point = fields[4].replace("\\040", " ")
        fstype = fields[fields.index("-", 6) + 1]
        # >=: of mounts on the same point the last is the one seen (an automounted NFS share on its autofs entry)
        if (real == Path(point) or Path(point) in real.parents) and len(point) >= best:
            best, kind = len(point), fstype
    return kind


def _reach(path: Path) -> None:
    """Open the nearest existing folder of path: what the automounter needs to mount the share it is on (stat of a
    mount point alone does not trigger it)."""
    for folder in (path, *path.parents):
        try:
            os.close(os.open(folder, os.O_RDONLY | os.O_DIRECTORY))
            return
        except OSError:
            continue


def _per_node(pattern: str) -> bool:
    """The pattern names a folder of each node: %n, or a $VARIABLE whose value is this node's name
    ($SLURMD_NODENAME, $HOSTNAME); a node's name written in it, or a variable that merely holds it ($SLURM_JOB_NODELIST
    = n1,n3), is one folder for several nodes."""
    return "%n" in pattern or any(_names_this_node(os.environ.get(name)) for _, name in variables(pattern))


def _names_this_node(value: str | None) -> bool:
    """The value is this node's name: Slurm's (node_name()), or its host name in full or short ($HOSTNAME may be
    n1.cluster where Slurm's name is n1)."""
    if not value:
        return False
    node = node_name()
    return value == node or value.split(".")[0] == node or value == socket.gethostname()


def check_node_local(pattern: str, path: Path, setting: str, mountinfo: Path | None = None) -> None:
    """A node cache folder on a filesystem other nodes mount: an error when every node's agent would share it (the
    pattern names no node: _per_node), a warning otherwise (one node's processes, but SQLite's locking over the
    network)."""
    kind = filesystem_type(path, mountinfo)
    if kind not in NETWORK_FILESYSTEMS:
        return
    if not _per_node(pattern):
        raise ConfigError(f"{setting} = {pattern!r} is on a {kind} filesystem that other nodes mount, and every "
                          f"node's agent would share its cache state (SQLite in WAL mode and process checks hold "
                          f"on one node only): set {setting} to a folder on the node's own disk, or make it one "
                          f"folder per node with %n")
    log.warning("%s %s is on a %s filesystem: the node cache's state (SQLite) is safest on node-local storage",
                setting, path, kind)
