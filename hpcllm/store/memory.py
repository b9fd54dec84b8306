"""Page-aligned host memory and a reusable pool of pre-faulted buffers.

Measured on these machines (docs/loader.md, shared/notes/loading-on-these-machines.md): the first touch of fresh
memory costs more than reading it from disk (page faults at 0.7-3 GB/s against 1-2.7 GB/s O_DIRECT), so a loader
that reads into freshly allocated memory is bound by page faults, not the disk. Two remedies live here:

* `HostBuffer.populate` pre-faults a range with one madvise(MADV_POPULATE_WRITE) call (Linux >= 5.14; falls back to
  touching one byte per page). The loader runs it in a thread *ahead* of the readers, so faults overlap with I/O.
* `HostBufferPool` keeps buffers of finished/released models, already faulted, for the next load. A long-lived
  worker can `reserve()` its pool at start-up so loads never page-fault; `reserve_bytes(n)` reserves one pre-faulted
  arena that serves any model up to n bytes (partition buffers are carved out of it), which is what a spare
  worker does before it knows its model (HPCLLM_HOST_POOL_BYTES, set by the node agent).

Buffers are anonymous mmaps: page-aligned (O_DIRECT needs that; torch.empty is only 64-byte aligned). Buffers
faulted in during a load are marked MADV_NOHUGEPAGE (transparent huge pages fault at 0.6 GB/s after idle on these
VMs). The reserved arena is the opposite case and asks for huge pages (MADV_HUGEPAGE): it is faulted in before any
request, where that cost is paid off the load's path, and O_DIRECT into it is much faster. A direct read is one
request per run of physically contiguous memory, and this virtio disk takes at most 254 segments per request: into
4 KiB pages a request carries at most ~1 MiB, into 2 MiB pages the full 4 MiB (max_sectors_kb). Measured on this VM
in one process, minutes apart, 1.95 GB from a cold page cache: O_DIRECT into a pre-faulted 4 KiB-page arena
1.50-1.73 GB/s for every threads x block tried (2-32 x 4-64 MiB), into a huge-page arena 2.56-2.64 GB/s, with a tenth
of the CPU time (docs/loader.md, "Where the cold load lost time").

`SharedHostBuffer` is the same in torch shared memory (`torch.UntypedStorage._new_shared`: an fd-backed shm
segment), for a model that goes to a model process (hpcllm.worker.runner_process): torch.multiprocessing passes
such a storage to the child by its fd, where it would copy any other CPU storage into a new segment first. Its
huge pages are the shm mount's to grant (/dev/shm's `huge=` option; none by default), not MADV_HUGEPAGE's.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from dataclasses import dataclass

from hpcllm.errors import HpcllmError

PAGE_SIZE = mmap.PAGESIZE
_MADV_POPULATE_READ = 22  # linux/mman.h (>= 5.14); not exported by Python's mmap module
_MADV_POPULATE_WRITE = 23
_MADV_REMOVE = 9  # frees the pages of a shared (shmem) mapping; MADV_DONTNEED would only unmap them
SHM_DIR = "/dev/shm"  # where torch's shared memory lives (shm_open, glibc)


class SharedMemoryFull(HpcllmError):
    """The shared-memory filesystem cannot hold a buffer a model process's load needs."""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_populate_write_supported = True
HUGE_PAGE_SIZE = 2 << 20  # x86-64 / arm64 (4 KiB base pages) PMD size: what MADV_HUGEPAGE maps
RESERVE_STEP = 64 << 20  # bytes faulted in per madvise while reserving: how soon a stop request is seen
ARENA_SLACK_PAGES = 64  # a checkpoint of up to 64 partitions fits an arena reserved for its byte count


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
    """One page-aligned anonymous mapping of `capacity` bytes (at least the requested size, rounded to pages), or a
    page-aligned range of one (`carve`: a partition buffer taken from a pool's reserved arena)."""

    shared = False  # torch shared memory (SharedHostBuffer): a model process gets it without a copy

    def __init__(self, nbytes: int, huge_pages: bool = False):
        """huge_pages: back the buffer with transparent huge pages where the kernel grants them (faulting it in is
        slower, direct reads into it faster: for memory faulted in ahead of time); else never."""
        self.capacity = max(round_up(nbytes, PAGE_SIZE), PAGE_SIZE)
        self.mmap = mmap.mmap(-1, self.capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        advice = getattr(mmap, "MADV_HUGEPAGE" if huge_pages else "MADV_NOHUGEPAGE", None)
        if advice is not None:
            try:
                self.mmap.madvise(advice)
            except OSError:
                pass  # a kernel without transparent huge pages: base pages, as asked or as the only choice
        self.offset = 0  # of this buffer in self.mmap
        self.address = buffer_address(self.mmap)
        self.populated = False  # every page faulted in (set by populate over the whole range)
        self.arena: HostBuffer | None = None  # the reserved arena this buffer was carved from

    @classmethod
    def carve(cls, arena: "HostBuffer", offset: int, nbytes: int) -> "HostBuffer":
        """Bytes [offset, offset + nbytes) of `arena` (page-aligned) as a buffer of their own."""
        part = cls.__new__(cls)
        part.capacity, part.mmap, part.offset = nbytes, arena.mmap, arena.offset + offset
        part.address = arena.address + offset
        part.populated = arena.populated
        part.arena = arena
        return part

    def view(self) -> memoryview:
        return memoryview(self.mmap)[self.offset:self.offset + self.capacity]

    def close(self) -> None:
        """Unmap a buffer nothing views (a reservation stopped before it completed)."""
        self.mmap.close()

    def huge_page_bytes(self) -> int:
        """Bytes of the underlying mapping backed by transparent huge pages now (AnonHugePages in smaps)."""
        return anon_huge_page_bytes(self.address - self.offset, len(self.mmap))

    def tensor(self):
        """A torch uint8 tensor over the whole buffer (shares the memory; keeps the mapping alive)."""
        import torch

        return torch.frombuffer(self.mmap, dtype=torch.uint8, count=self.capacity, offset=self.offset)

    def populate(self, start: int = 0, end: int | None = None) -> None:
        """Fault in [start, end) for writing so later reads into it cost no page faults."""
        end = self.capacity if end is None else min(end, self.capacity)
        start = start // PAGE_SIZE * PAGE_SIZE
        if start >= end:
            return
        populate_range(self.address + start, end - start, self.mmap, self.offset + start)
        if start == 0 and end == self.capacity:
            self.populated = True


class SharedHostBuffer(HostBuffer):
    """A HostBuffer in torch shared memory: one `torch.UntypedStorage._new_shared` storage (an shm segment mapped
    MAP_SHARED, page-aligned), or a page-aligned range of one (`carve`). Every tensor of it is a view of that one
    storage, so pickling the model for a model process sends one fd and copies nothing (its `share_memory_()` finds
    the storage shared already); the child maps the same pages."""

    shared = True

    def __init__(self, nbytes: int, huge_pages: bool = False):
        import torch

        self.capacity = max(round_up(nbytes, PAGE_SIZE), PAGE_SIZE)
        _check_shm_space(self.capacity)
        self.storage = torch.UntypedStorage._new_shared(self.capacity)
        self.whole = torch.empty(0, dtype=torch.uint8).set_(self.storage)  # uint8 view of the whole segment
        self.offset = 0
        self.address = self.storage.data_ptr()
        if self.address % PAGE_SIZE:  # mmap returns whole pages; O_DIRECT and madvise rely on it
            raise RuntimeError(f"torch shared memory at {self.address:#x} is not page-aligned")
        _advise_huge_pages(self.address, self.capacity, huge_pages)  # honoured where the shm mount allows them
        self.populated = False
        self.arena: HostBuffer | None = None
        self.mmap = None

    @classmethod
    def carve(cls, arena: "HostBuffer", offset: int, nbytes: int) -> "HostBuffer":
        part = super().carve(arena, offset, nbytes)
        part.storage, part.whole = arena.storage, arena.whole
        return part

    def _array(self):
        """This buffer's bytes as a writable numpy array (no copy)."""
        return self.whole[self.offset:self.offset + self.capacity].numpy()

    def view(self) -> memoryview:
        return memoryview(self._array())

    def close(self) -> None:
        self.whole = self.storage = None  # torch unmaps the segment with its last reference

    def huge_page_bytes(self) -> int:
        return shmem_huge_page_bytes(self.address - self.offset, self.whole.numel())

    def tensor(self):
        """A uint8 tensor over this buffer: a view of the shared storage (keeps it alive)."""
        return self.whole[self.offset:self.offset + self.capacity]

    def populate(self, start: int = 0, end: int | None = None) -> None:
        end = self.capacity if end is None else min(end, self.capacity)
        start = start // PAGE_SIZE * PAGE_SIZE
        if start >= end:
            return
        populate_range(self.address + start, end - start, self._array(), start)
        if start == 0 and end == self.capacity:
            self.populated = True

    def discard(self, address: int, length: int) -> int:
        """Free the whole pages of the range (MADV_REMOVE: the segment's pages go, for every process mapping it)."""
        if not self.holds(address, length):
            raise ValueError("the range is not inside this mapping")
        released = discard_pages(address, length, advice=_MADV_REMOVE)
        if released:
            self.populated = False
        return released


def _check_shm_space(nbytes: int) -> None:
    """Refuse up front what the shm filesystem cannot hold: past its size, a write to the segment is a SIGBUS (the
    process dies), and a read into it an EFAULT. Best effort: other processes may take the space meanwhile."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return  # no /dev/shm to check (torch will say what it can)
    available = stat.f_bavail * stat.f_frsize
    if nbytes > available:
        raise SharedMemoryFull(
            f"{SHM_DIR} has {available / 1e9:.2f} GB free, a shared-memory load needs {nbytes / 1e9:.2f} GB more for "
            f"the model process's weights: enlarge {SHM_DIR} (its tmpfs size=), free it, or set [worker] "
            f"model_process = false")


def _advise_huge_pages(address: int, length: int, huge_pages: bool) -> None:
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge_pages else "MADV_NOHUGEPAGE", None)
    if advice is not None:
        _libc.madvise(address, length, advice)  # a kernel without transparent huge pages: base pages regardless


def anon_huge_page_bytes(start: int, length: int, field: str = "AnonHugePages:") -> int:
    """Bytes of [start, start + length) backed by transparent huge pages now: the AnonHugePages of the memory areas
    of /proc/self/smaps overlapping that range (the kernel may split one mapping into several areas, or merge
    neighbouring mappings into one: then the count is the area's, capped at `length`). 0 where smaps cannot be
    read."""
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                head = line.split(None, 1)[0]
                if not head.endswith(":"):  # "start-end perms ..." opens the next memory area
                    low, _, high = head.partition("-")
                    inside = int(low, 16) < start + length and start < int(high, 16)
                elif inside and head == field:
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    return min(total, length)


def shmem_huge_page_bytes(start: int, length: int) -> int:
    """anon_huge_page_bytes for a shared-memory mapping (ShmemPmdMapped in smaps)."""
    return anon_huge_page_bytes(start, length, field="ShmemPmdMapped:")


def discard_pages(address: int, length: int, advice: int = mmap.MADV_DONTNEED) -> int:
    """madvise(MADV_DONTNEED) over the whole pages inside [address, address + length): their memory goes back to the
    OS (anonymous memory reads as zeros afterwards); advice=MADV_REMOVE for a shared-memory mapping, whose pages
    MADV_DONTNEED would only unmap. Returns the bytes released."""
    start, end = round_up(address, PAGE_SIZE), (address + length) // PAGE_SIZE * PAGE_SIZE
    if end <= start:
        return 0
    if _libc.madvise(start, end - start, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({advice}) failed: {errno.errorcode.get(err, err)}")
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
    arena_bytes: int = 0  # the reserved arena (reserve_bytes), carved or not
    arena_free_bytes: int = 0


class HostBufferPool:
    """Reusable, pre-faulted host buffers; one per checkpoint partition of a loaded CPU model.

    `acquire` hands out the smallest free buffer that fits (and wastes at most `max_waste` of it), else a range
    carved from the reserved arena (`reserve_bytes`) when one is free there, else a new, not yet faulted buffer (the
    loader faults it ahead of its readers). `shared=True` asks for torch shared memory (SharedHostBuffer: a model
    going to a model process): only shared buffers and a shared arena serve it; a plain request takes either. `release` returns a buffer once nothing uses its memory any more
    (LoadedModel.release does that); a carved range goes back to the arena. Thread-safe.
    """

    def __init__(self, max_waste: float = 0.25):
        self._lock = threading.Lock()
        self._free: list[HostBuffer] = []
        self._all_bytes = 0
        self._all_count = 0
        self.max_waste = max_waste
        self._arena: HostBuffer | None = None
        self._extents: list[tuple[int, int]] = []  # free (offset, length) ranges of the arena, sorted by offset

    def acquire(self, nbytes: int, shared: bool = False) -> HostBuffer:
        need = max(round_up(nbytes, PAGE_SIZE), PAGE_SIZE)
        with self._lock:
            best = _best_free(_serving(self._free, shared), need, self.max_waste)
            if best is not None:
                self._free.remove(best)
                return best
            extent = _best_extent(self._arena_extents(shared), need)
            if extent is not None:
                offset, length = self._extents.pop(extent)
                if length > need:
                    self._extents.insert(extent, (offset + need, length - need))
                return type(self._arena).carve(self._arena, offset, need)
            self._all_bytes += need
            self._all_count += 1
        return SharedHostBuffer(need) if shared else HostBuffer(need)

    def _arena_extents(self, shared: bool) -> list[tuple[int, int]]:
        """The arena's free ranges, if it can serve this request (a plain arena never serves a shared one)."""
        return self._extents if self._arena is not None and (self._arena.shared or not shared) else []

    def release(self, buffer: HostBuffer) -> None:
        if buffer.arena is not None and not buffer.populated:
            buffer.populate()  # its pages were discarded (LoadedModel.discard): the arena stays faulted in
        with self._lock:
            if buffer.arena is not None and buffer.arena is self._arena:
                self._give_back_extent(buffer.address - self._arena.address, buffer.capacity)
            elif buffer.arena is None and buffer not in self._free:
                self._free.append(buffer)
            # else: carved from an arena this pool dropped since; its memory goes when the last view does

    def _give_back_extent(self, offset: int, length: int) -> None:
        extents = sorted(self._extents + [(offset, length)])
        merged: list[tuple[int, int]] = []
        for start, size in extents:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((start, size))
        self._extents = merged

    def reserve_bytes(self, nbytes: int, huge_pages: bool = True, stop: threading.Event | None = None,
                      shared: bool = False) -> bool:
        """Allocate and fault in one arena of `nbytes` now (a worker before it knows its model); later loads carve
        their partition buffers out of it, so any model up to `nbytes` (less page rounding per partition) lands
        in memory that is already faulted in. Replaces an earlier arena (ranges carved from it stay valid).
        The arena asks for transparent huge pages (module docstring: O_DIRECT into them reads ~1.6x faster here;
        faulting them in takes longer, ~0.7 GB/s on this VM, which a spare pays before any request).
        `stop` set meanwhile (a spare got its assignment first): the faulting stops within one step, nothing is
        reserved (the pages go back) and False is returned, so a load never waits for a reservation.
        shared: the arena is torch shared memory (SharedHostBuffer), for loads that go to a model process; it serves
        plain loads too."""
        # slack: each partition is rounded up to whole pages; a last partial huge page stays in base pages
        kind = SharedHostBuffer if shared else HostBuffer
        arena = kind(nbytes + ARENA_SLACK_PAGES * PAGE_SIZE, huge_pages=huge_pages)
        for start in range(0, arena.capacity, RESERVE_STEP):
            if stop is not None and stop.is_set():
                arena.close()
                return False
            arena.populate(start, start + RESERVE_STEP)
        arena.populated = True
        with self._lock:
            self._arena, self._extents = arena, [(0, arena.capacity)]
        return True

    def prefaulted_for(self, sizes: list[int], shared: bool = False) -> bool:
        """Would buffers of these sizes all come pre-faulted (free buffers, the arena) if acquired now?"""
        with self._lock:
            free = [b for b in _serving(self._free, shared) if b.populated]
            extents = list(self._arena_extents(shared)) if self._arena is not None and self._arena.populated else []
        for size in sorted(sizes, reverse=True):
            need = max(round_up(size, PAGE_SIZE), PAGE_SIZE)
            best = _best_free(free, need, self.max_waste)
            if best is not None:
                free.remove(best)
                continue
            extent = _best_extent(extents, need)
            if extent is None:
                return False
            offset, length = extents.pop(extent)
            if length > need:
                extents.insert(extent, (offset + need, length - need))
        return True

    def reserve(self, sizes: list[int], shared: bool = False) -> None:
        """Allocate and fault in buffers of these sizes now (e.g. at worker start), ready for later loads."""
        buffers = [self.acquire(size, shared=shared) for size in sizes]  # all held at once: distinct buffers, one per size
        for buffer in buffers:
            buffer.populate()
        for buffer in buffers:
            self.release(buffer)

    def trim(self) -> int:
        """Drop every free buffer, and the arena when nothing is carved from it; returns their bytes. The memory
        goes back to the OS when the last reference (the pool's, or a tensor's that torch.frombuffer keeps on the
        mapping) goes: never unmapped under a view."""
        with self._lock:
            freed, self._free = self._free, []
            released = sum(b.capacity for b in freed)
            self._all_bytes -= released
            self._all_count -= len(freed)
            if self._arena is not None and self._extents == [(0, self._arena.capacity)]:
                released += self._arena.capacity
                self._arena, self._extents = None, []
        return released

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(buffers=self._all_count, free_buffers=len(self._free), bytes_total=self._all_bytes,
                             bytes_free=sum(b.capacity for b in self._free),
                             arena_bytes=self._arena.capacity if self._arena is not None else 0,
                             arena_free_bytes=sum(length for _, length in self._extents))


def _serving(free: list[HostBuffer], shared: bool) -> list[HostBuffer]:
    return [b for b in free if b.shared] if shared else free


def _best_free(free: list[HostBuffer], need: int, max_waste: float) -> HostBuffer | None:
    fitting = [b for b in free if need <= b.capacity <= need * (1 + max_waste) + PAGE_SIZE]
    return min(fitting, key=lambda b: b.capacity) if fitting else None


def _best_extent(extents: list[tuple[int, int]], need: int) -> int | None:
    """Index of the smallest free arena range that holds `need` bytes (best fit keeps large ranges whole)."""
    fitting = [i for i, (_, length) in enumerate(extents) if length >= need]
    return min(fitting, key=lambda i: extents[i][1]) if fitting else None


_default_pool = HostBufferPool()
HOST_POOL_ENV = "HPCLLM_HOST_POOL_BYTES"  # set by the node agent for its spare workers (hpcllm.node.workers)


def default_pool() -> HostBufferPool:
    """The process-wide pool load_model uses unless given another."""
    return _default_pool


def reserve_from_environment(stop: threading.Event | None = None, shared: bool = False) -> int:
    """Reserve the default pool's arena from $HPCLLM_HOST_POOL_BYTES (a spare worker at start-up); bytes reserved.
    A malformed or non-positive value reserves nothing (the worker loads into fresh memory, as without a pool), nor
    does a reservation `stop`ped before it completed (HostBufferPool.reserve_bytes). shared: in torch shared memory
    (a spare whose model will run in a model process)."""
    try:
        nbytes = int(os.environ.get(HOST_POOL_ENV, "0"))
    except ValueError:
        return 0
    if nbytes <= 0:
        return 0
    try:
        if not _default_pool.reserve_bytes(nbytes, stop=stop, shared=shared):
            return 0
    except SharedMemoryFull as exc:  # the load will say so again if it still does not fit
        logging.getLogger(__name__).warning("no host pool reserved: %s", exc)
        return 0
    return _default_pool.stats().arena_bytes


class MappedFile(_Discardable):
    """A file (on tmpfs, for the DRAM tier) mapped into memory, with HostBuffer's interface.

    shared=True: writes go to the file (filling the tier). shared=False: a private copy-on-write mapping, so a
    model that writes into a weight never changes the copy other processes map; reading costs no copy.
    Maps the file's current size, which must be > 0 (Python refuses to map past EOF or an empty file).
    """

    def __init__(self, path, shared: bool):
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
