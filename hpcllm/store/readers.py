"""Positional readers for checkpoint data files: O_DIRECT (node-local disk) or buffered (shared FS, page cache).

`os.preadv` releases the GIL, so two reader threads keep two requests in flight. O_DIRECT skips the page cache
(no double copy, no cache pollution) but needs page-aligned buffers, offsets and lengths: callers read whole
chunks (multiples of 4096 bytes) into page-aligned memory and round the length of the file's last chunk up.

A file the page cache already holds (mostly) is read buffered even on the O_DIRECT tier: copying from the cache
beats going to the disk again, and `fallback_reason` says so.

Some filesystems refuse O_DIRECT (older tmpfs, some NFS/FUSE mounts) with EINVAL, at open or at the first read.
The reader then falls back to buffered reads and says why in `fallback_reason`, which the load stats report.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hpcllm.checkpoint import MissingFile, TruncatedFile

ODIRECT = "odirect"
BUFFERED = "buffered"
READ_MODES = (ODIRECT, BUFFERED)


CACHED_ENOUGH = 0.5  # fraction of a file's pages in the page cache above which buffered reads win

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def evict_from_page_cache(paths: Iterable[Path]) -> None:
    """Drop files from the page cache, as a cold start finds them (benchmarks, tests). Dirty pages cannot be
    dropped, so each file is fsynced first."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(path: Path, samples: int = 32, window_pages: int = 64) -> float:
    """Estimated fraction of the file's pages in the page cache: mincore over `samples` evenly spaced windows of a
    mapping that is never touched (a few hundred microseconds, whatever the file size)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0.0
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0.0
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            return 0.0
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            window = min(window_pages, pages)
            starts = sorted({(pages - window) * i // max(1, samples - 1) for i in range(samples)})
            residency = (ctypes.c_ubyte * window)()
            resident = checked = 0
            for start in starts:
                if _libc.mincore(address + start * mmap.PAGESIZE, window * mmap.PAGESIZE, residency) != 0:
                    return 0.0
                resident += sum(b & 1 for b in residency)
                checked += window
            return resident / checked
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)


@contextmanager
def page_aligned_buffer(nbytes: int) -> Iterator[memoryview]:
    """A view of `nbytes` of anonymous memory, page-aligned as O_DIRECT needs, unmapped on leaving. Not when an error
    leaves: its traceback still holds views of the buffer, and closing it then would replace the error (a short
    file, a failed read) with BufferError; the GC unmaps it once the error is handled."""
    buffer = mmap.mmap(-1, nbytes)
    view = memoryview(buffer)
    yield view
    view.release()
    buffer.close()


class FileReader:
    """Reads byte ranges of one file into caller-provided buffers, from several threads at once."""

    def __init__(self, path: Path, mode: str, expected_size: int | None = None, use_page_cache: bool = True):
        if mode not in READ_MODES:
            raise ValueError(f"read mode must be one of {READ_MODES}, got {mode!r}")
        self.path = Path(path)
        self.requested_mode = mode
        self.fallback_reason: str | None = None
        self.expected_size = expected_size
        self._lock = threading.Lock()
        self._fd = -1
        self._retired: list[int] = []  # O_DIRECT fds replaced by a buffered one: another thread may be reading one
        self.mode = mode
        if mode == ODIRECT and use_page_cache:
            cached = cached_fraction(self.path)
            if cached >= CACHED_ENOUGH:
                self._fall_back(f"the page cache holds {cached:.0%} of {self.path.name}: buffered reads are faster")
        if self.mode == ODIRECT:
            try:
                self._fd = self._open(os.O_RDONLY | os.O_DIRECT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._fall_back(f"{self.path.parent} refuses O_DIRECT at open (EINVAL)")
        if self._fd < 0:
            self._fd = self._open(os.O_RDONLY)
            self._advise_sequential()

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.path, flags)
        except FileNotFoundError:
            raise MissingFile(f"{self.path}: data file is missing from the checkpoint") from None
        except PermissionError:
            raise MissingFile(f"{self.path}: data file cannot be read (permission denied)") from None

    def _advise_sequential(self) -> None:
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass  # advice only

    def _fall_back(self, reason: str) -> None:
        self.mode = BUFFERED
        self.fallback_reason = reason

    def _switch_to_buffered(self, reason: str) -> None:
        with self._lock:
            if self.mode == BUFFERED:
                return
            # The old fd stays open until close(): a thread that took it before this switch reads it (EINVAL, and
            # it retries on the new one) instead of a closed number, or one another open reused meanwhile.
            # Opened before the old one is retired: a failed open (MissingFile) leaves self._fd as the only holder,
            # not also in _retired, where close() closed it twice (the second time another thread's reused number).
            buffered = self._open(os.O_RDONLY)
            self._retired.append(self._fd)
            self._fd = buffered
            self._advise_sequential()
            self._fall_back(reason)

    def read_into(self, offset: int, buffer: memoryview, need: int, max_request: int | None = None) -> int:
        """Fill buffer from file offset; at least `need` bytes must exist there (TruncatedFile otherwise).

        `buffer` may be longer than `need` (an O_DIRECT read of the last chunk is rounded up to whole pages).
        `max_request` (a multiple of 4096) caps the bytes of one preadv: the block size the node's probe found
        fastest (hpcllm.store.tuning). Returns the number of bytes read.
        """
        done = 0
        while done < need:
            end = len(buffer) if max_request is None else min(len(buffer), done + max_request)
            fd = self._fd
            try:
                n = os.preadv(fd, [buffer[done:end]], offset + done)
            except OSError as exc:
                # fd != self._fd: another thread switched to buffered reads meanwhile (this one read its old fd)
                if exc.errno == errno.EINVAL and (self.mode == ODIRECT or fd != self._fd):
                    self._switch_to_buffered(f"{self.path.parent} refuses O_DIRECT reads (EINVAL)")
                    continue
                raise MissingFile(f"{self.path}: read failed at offset {offset + done} ({exc.strerror})") from None
            if n == 0:
                size = self.expected_size
                raise TruncatedFile(
                    f"{self.path}: ends at byte {offset + done}, expected at least {offset + need} bytes"
                    + (f" (the manifest says {size})" if size is not None else "")
                    + "; the copy is incomplete, re-copy or re-convert the checkpoint"
                )
            done += n
            if self.mode == ODIRECT and n % 512:
                break  # a short O_DIRECT read only happens at end of file
        if done < need:
            raise TruncatedFile(f"{self.path}: ends at byte {offset + done}, expected at least {offset + need} bytes; "
                                f"the copy is incomplete, re-copy or re-convert the checkpoint")
        return done

    def close(self) -> None:
        with self._lock:
            fds, self._fd, self._retired = [self._fd, *self._retired], -1, []
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> "FileReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
