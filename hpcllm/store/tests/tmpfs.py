"""A small tmpfs mounted for one test: a filesystem that runs out of room (shared memory, an NVMe cache folder).

Mounting needs root, as the test suite does (README: as root; the dev Slurm cluster too): a machine where it fails is
a failed set-up, said as such, not a skipped test."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def mounted_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` (mount's syntax: 256k, 3m) on the new folder `mount`; unmounted afterwards."""
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs for this test (the suite runs as root): {mounted.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
