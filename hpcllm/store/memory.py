"""Page-aligned host memory and a reusable pool of pre-faulted buffers.

Measured on these machines (docs/loader.md, shared/notes/loading-on-these-machines.md): the first touch of fresh
memory costs more than reading it from disk (page faults at 0.7-3 GB/s against 1-2.7 GB/s O_DIRECT), so a loader
that reads into freshly allocated memory is bound by page faults, not the disk. Two remedies live here:

* `HostBuffer.populate` pre-faults a range with one madvise(MADV_POPULATE_WRITE) call (Linux >= 5.14; falls back to
  touching one byte per page). The loader runs it in a thread *ahead* of the readers, so faults overlap with I/O.
* `HostBufferPool` keeps buffers of finished/released models, already faulted, for the next load. A long-lived
  worker can `reserve()` its pool at start-up so loads never page-fault.

Buffers are anonymous mmaps: page-aligned (O_DIRECT needs that; torch.empty is only 64-byte aligned) and marked
MADV_NOHUGEPAGE (transparent huge pages fault at 0.6 GB/s after idle on these VMs).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import threading
from dataclasses import dataclass

PAGE_SIZE = mmap.PAGESIZE
_MADV_POPULATE_READ = 22  # linux/mman.h (>= 5.14); not exported by Python's mmap module
_MADV_POPULATE_WRITE = 23

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_populate_write_supported = True


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def buffer_address(obj) -> int:
    """Address of the first byte of a writable buffer (mmap, bytearray, numpy array)."""
    anchor = ctypes.c_char.from_buffer(obj)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # drop the buffer export so the mmap can still be closed later


class _Discardable:
    """Giving pages of a mapping back (a model's dropped weights): HostBuffer's and MappedFile's."""

    address: int
    capacity: int
    populated: bool

    def holds(self, address: int, length: int) -> bool:
        return self.address <= address and address + length <= self.address + self.capacity

    def discard(self, address: int, length: int) -> int:
        """Release the whole pages of [address, address + length), inside this mapping (see discard_pages). A file
        mapping's pages stay in the file (a tmpfs tier's copy, the page cache); only this process lets go of them."""
        if not self.holds(address, length):
            raise ValueError("the range is not inside this mapping")
        released = discard_pages(address, length)
        if released:
            self.populated = False  # a later load from the pool faults those pages in again
        return released


class HostBuffer(_Discardable):
    """One page-aligned anonymous mapping of `capacity` bytes (at least the requested size, rounded to pages)."""

    def __init__(self, nbytes: int):
        self.capacity = max(round_up(nbytes, PAGE_SIZE), PAGE_SIZE)
        self.mmap = mmap.mmap(-1, self.capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            self.mmap.madvise(mmap.MADV_NOHUGEPAGE)
        self.address = buffer_address(self.mmap)
        self.populated = False  # every page faulted in (set by populate over the whole range)

    def view(self) -> memoryview:
        return memoryview(self.mmap)

    def tensor(self):
        """A torch uint8 tensor over the whole buffer (shares the memory; keeps the mapping alive)."""
        import torch

        return torch.frombuffer(self.mmap, dtype=torch.uint8)

    def populate(self, start: int = 0, end: int | None = None) -> None:
        """Fault in [start, end) for writing so later reads into it cost no page faults."""
        end = self.capacity if end is None else min(end, self.capacity)
        start = start // PAGE_SIZE * PAGE_SIZE
        if start >= end:
            return
        populate_range(self.address + start, end - start, self.mmap, start)
        if start == 0 and end == self.capacity:
            self.populated = True


def discard_pages(address: int, length: int) -> int:
    """madvise(MADV_DONTNEED) over the whole pages inside [address, address + length): their memory goes back to the
    OS (anonymous memory reads as zeros afterwards). Returns the bytes released."""
    start, end = round_up(address, PAGE_SIZE), (address + length) // PAGE_SIZE * PAGE_SIZE
    if end <= start:
        return 0
    if _libc.madvise(start, end - start, mmap.MADV_DONTNEED) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(MADV_DONTNEED) failed: {errno.errorcode.get(err, err)}")
    return end - start


def populate_range(address: int, length: int, owner=None, owner_offset: int = 0) -> None:
    """madvise(MADV_POPULATE_WRITE) over a page-aligned range; touches pages of `owner` if the kernel lacks it.

    The ctypes call releases the GIL, so a populate thread runs beside reader threads.
    """
    global _populate_write_supported
    if _populate_write_supported:
        if _libc.madvise(address, length, _MADV_POPULATE_WRITE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, f"madvise(MADV_POPULATE_WRITE) failed: {errno.errorcode.get(err, err)}")
        _populate_write_supported = False
    if owner is None:
        return
    import numpy as np

    pages = np.frombuffer(owner, dtype=np.uint8)[owner_offset:owner_offset + length:PAGE_SIZE]
    pages[:] = pages  # a write per page faults it in without changing data


def populate_read(address: int, length: int) -> bool:
    """Map in the pages of a file mapping for reading, without copy-on-write; False where the kernel lacks it."""
    return _libc.madvise(address, length, _MADV_POPULATE_READ) == 0


@dataclass
class PoolStats:
    buffers: int
    free_buffers: int
    bytes_total: int
    bytes_free: int


class HostBufferPool:
    """Reusable, pre-faulted host buffers; one per checkpoint partition of a loaded CPU model.

    `acquire` hands out the smallest free buffer that fits (and wastes at most `max_waste` of it), else a new,
    not yet faulted one (the loader faults it ahead of its readers). `release` returns a buffer once nothing uses
    its memory any more (LoadedModel.release does that). Thread-safe.
    """

    def __init__(self, max_waste: float = 0.25):
        self._lock = threading.Lock()
        self._free: list[HostBuffer] = []
        self._all_bytes = 0
        self._all_count = 0
        self.max_waste = max_waste

    def acquire(self, nbytes: int) -> HostBuffer:
        need = max(round_up(nbytes, PAGE_SIZE), PAGE_SIZE)
        with self._lock:
            fitting = [b for b in self._free if need <= b.capacity <= need * (1 + self.max_waste) + PAGE_SIZE]
            if fitting:
                best = min(fitting, key=lambda b: b.capacity)
                self._free.remove(best)
                return best
            self._all_bytes += need
            self._all_count += 1
        return HostBuffer(need)

    def release(self, buffer: HostBuffer) -> None:
        with self._lock:
            if buffer not in self._free:
                self._free.append(buffer)

    def reserve(self, sizes: list[int]) -> None:
        """Allocate and fault in buffers of these sizes now (e.g. at worker start), ready for later loads."""
        buffers = [self.acquire(size) for size in sizes]  # all held at once: distinct buffers, one per size
        for buffer in buffers:
            buffer.populate()
        for buffer in buffers:
            self.release(buffer)

    def trim(self) -> int:
        """Drop every free buffer; returns their bytes. The memory goes back to the OS when the last reference
        (the pool's, or a tensor's that torch.frombuffer keeps on the mapping) goes: never unmapped under a view."""
        with self._lock:
            freed, self._free = self._free, []
            released = sum(b.capacity for b in freed)
            self._all_bytes -= released
            self._all_count -= len(freed)
        return released

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(buffers=self._all_count, free_buffers=len(self._free), bytes_total=self._all_bytes,
                             bytes_free=sum(b.capacity for b in self._free))


_default_pool = HostBufferPool()


def default_pool() -> HostBufferPool:
    """The process-wide pool load_model uses unless given another."""
    return _default_pool


class MappedFile(_Discardable):
    """A file (on tmpfs, for the DRAM tier) mapped into memory, with HostBuffer's interface.

    shared=True: writes go to the file (filling the tier). shared=False: a private copy-on-write mapping, so a
    model that writes into a weight never changes the copy other processes map; reading costs no copy.
    Maps the file's current size, which must be > 0 (Python refuses to map past EOF or an empty file).
    """

    def __init__(self, path, shared: bool):
        import os

        self.path = path
        fd = os.open(path, os.O_RDWR if shared else os.O_RDONLY)
        try:
            self.capacity = os.fstat(fd).st_size
            flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
            self.mmap = mmap.mmap(fd, self.capacity, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.address = buffer_address(self.mmap)
        self.populated = False

    def view(self) -> memoryview:
        return memoryview(self.mmap)

    def tensor(self):
        import torch

        return torch.frombuffer(self.mmap, dtype=torch.uint8)

    def populate(self, start: int = 0, end: int | None = None) -> None:
        end = self.capacity if end is None else min(end, self.capacity)
        start = start // PAGE_SIZE * PAGE_SIZE
        if start < end:
            populate_range(self.address + start, end - start, self.mmap, start)
