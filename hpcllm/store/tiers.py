"""Storage tiers and their loader settings: one pipeline, configured per tier.

  dram      checkpoint in /dev/shm (hpcllm.store.dram.DramTier): CPU targets get zero-copy views of the shared
            mapping; GPU targets stream it through the staging ring, copied by memory_copy_threads() threads.
            Verified when it was filled.
  disk      node-local disk (NVMe / SSD): O_DIRECT reads, 2 threads, verified while reading. Files already in
            the page cache are mapped for a CPU target (verified by hashing the mapping) or read buffered.
  sharedfs  shared-filesystem origin (NFS, Lustre, GPFS, ...): buffered reads, same pipeline, verified.

`detect_tier(path)` picks one from the filesystem type in /proc/self/mountinfo; callers can always name one.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from hpcllm.errors import ConfigError

MMAP = "mmap"  # zero-copy: tensors are views of a shared-memory mapping


@dataclass(frozen=True)
class TierSettings:
    name: str
    reader: str  # "mmap" | "odirect" | "buffered"
    verify: bool = True
    threads: int = 2
    unit_bytes: int = 16 << 20  # bytes per read request (whole checkpoint chunks, at least one)
    staging_slots: int = 6  # pinned staging slots for device targets (each one read unit)
    prefault: bool = True  # fault fresh destination memory in a thread ahead of the readers
    map_cached: bool = False  # CPU target and the files already in the page cache: map them instead of reading
    trust_verified_record: bool = False  # skip re-hashing files unchanged since a verified load (node-local only)

    def with_overrides(self, **overrides) -> "TierSettings":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


TIERS: dict[str, TierSettings] = {
    "dram": TierSettings("dram", MMAP, verify=False),
    "disk": TierSettings("disk", "odirect", map_cached=True, trust_verified_record=True),
    "sharedfs": TierSettings("sharedfs", "buffered"),
}

# Copies out of a memory tier (into a GPU load's pinned ring, or into shared memory for a model process) are bound
# by the copying threads' memcpy, not by a device: on the H200 machine (16 cores) the DRAM tier -> GPU with the
# tier's 2 threads read 8 GB/s, a warm disk -> GPU load copying from the page cache with 4 threads 15 GB/s, against
# 55 GB/s of pinned host-to-device (docs/gpu-checks.md). Up to this many threads, never more than the usable CPUs.
MEMORY_COPY_THREADS = 8


def memory_copy_threads() -> int:
    return min(MEMORY_COPY_THREADS, len(os.sched_getaffinity(0)))  # a process may always use at least one CPU


MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "hugetlbfs"})
SHARED_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "glusterfs", "cifs", "smb3", "smbfs", "9p",
    "virtiofs", "orangefs", "pvfs2", "panfs", "wekafs", "afs",
})


def tier_settings(name: str) -> TierSettings:
    try:
        return TIERS[name]
    except KeyError:
        raise ConfigError(f"unknown storage tier {name!r}; use one of {', '.join(TIERS)}") from None


def filesystem_type(path: Path) -> str:
    """The filesystem type of the mount holding `path` (longest mount point prefix in /proc/self/mountinfo)."""
    target = os.path.realpath(path)
    best_mount, best_type = "", "unknown"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                mount_point = fields[4].replace("\\040", " ")
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best_mount):
                    best_mount, best_type = mount_point, right.split()[0]
    except OSError:
        pass
    return best_type


def detect_tier(path: Path) -> str:
    fstype = filesystem_type(path)
    if fstype in MEMORY_FILESYSTEMS:
        return "dram"
    if fstype in SHARED_FILESYSTEMS or fstype.startswith("fuse"):
        return "sharedfs"
    return "disk"


def file_stats(folder: str | os.PathLike) -> Iterator[os.stat_result]:
    """os.stat of every regular file under `folder` (symlinks followed, symlinked folders not entered). Fills publish
    (rename) and removals delete files and folders while a tier is counted: what went meanwhile is skipped (os.walk
    skips a folder gone before it is read; Path.rglob raised FileNotFoundError for it), never an error."""
    for parent, _, names in os.walk(folder):
        for name in names:
            try:
                st = os.stat(os.path.join(parent, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield st
