"""The chunked, pipelined read path shared by every tier and device.

    reader threads (N)            consuming thread                copy engine
    acquire target memory  -->    verify each chunk (xxh3)  -->   (staged targets only) async copy to the final
    preadv a unit of chunks       commit the unit                  memory; the slot is recycled after its fence

A *unit* is a run of whole checkpoint chunks (about `unit_bytes`) of one partition. Where readers write depends on
the target:

  DirectHostTarget  the final host buffer of the partition (CPU model): the unit lands where its tensors will live,
                    no copy at all; a prefault thread faults the fresh buffer in ahead of the readers.
  StagedTarget      a slot of a StagingRing (pinned for GPUs), then copied by segments to per-device buffers laid
                    out by a Placement (used for cuda:N and for device_map splits).

Checksums are verified on a consuming thread as units arrive (xxhash releases the GIL, so reads continue), before
a unit is committed: a staged unit with a bad chunk is never copied, and any error aborts the whole load. The
consumer runs while the caller builds the model skeleton (for a process's first model that includes importing the
model code, seconds), so a staged load keeps its few slots cycling instead of stalling until the skeleton exists.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from hpcllm.checkpoint import ALIGNMENT, Checkpoint, TensorEntry
from hpcllm.store.memory import HostBuffer, round_up
from hpcllm.store.readers import FileReader
from hpcllm.store.ring import Copy, RingClosed, Slot, StagingRing

PREFAULT_STEP = 8 << 20  # per madvise call: it holds the mmap lock that allocations in other threads need
MERGE_GAP = 64 << 10  # tensors closer than this in the file are copied as one segment (the gap is alignment padding)


@dataclass(frozen=True)
class ReadUnit:
    partition: int
    first_chunk: int
    last_chunk: int  # inclusive
    offset: int
    nbytes: int


def plan_units(ckpt: Checkpoint, partitions: list[int], unit_bytes: int) -> list[ReadUnit]:
    """Whole chunks grouped into read units of about unit_bytes, partition by partition, in file order."""
    units = []
    for p in partitions:
        part = ckpt.partitions[p]
        per_unit = max(1, unit_bytes // part.chunk_size)
        for first in range(0, part.num_chunks, per_unit):
            last = min(first + per_unit, part.num_chunks) - 1
            start = first * part.chunk_size
            end = min((last + 1) * part.chunk_size, part.size)
            units.append(ReadUnit(p, first, last, start, end - start))
    return units


# ------------------------------------------------------------------------------------------------------ placement


@dataclass(frozen=True)
class Run:
    """Bytes [start, end) of a partition file that go to `device`, at dest_offset of its (partition, device) buffer."""

    partition: int
    start: int
    end: int
    device: str
    dest_offset: int


@dataclass
class Placement:
    runs: dict[int, list[Run]]  # partition -> runs, sorted by start
    dest_bytes: dict[tuple[int, str], int]  # (partition, device) -> buffer size
    tensor_device: dict[str, str]  # stored tensor name -> device
    _run_of: dict[str, Run] = field(default_factory=dict)

    def locate(self, entry: TensorEntry) -> tuple[str, int]:
        """(device, offset in that device's buffer of the entry's partition)."""
        run = self._run_of[entry.name]
        return run.device, run.dest_offset + entry.offset - run.start

    def segments(self, unit: ReadUnit) -> list[tuple[Run, int, int, int]]:
        """(run, dest_offset, offset within the unit, nbytes) for each run overlapping the unit."""
        out = []
        unit_end = unit.offset + unit.nbytes
        for run in self.runs.get(unit.partition, []):
            lo, hi = max(run.start, unit.offset), min(run.end, unit_end)
            if lo < hi:
                out.append((run, run.dest_offset + lo - run.start, lo - unit.offset, hi - lo))
        return out


def whole_partition_placement(ckpt: Checkpoint, device: str) -> Placement:
    """Every partition copied whole to one device (direct CPU reads: the buffer mirrors the file)."""
    runs, dest_bytes, tensor_device, run_of = {}, {}, {}, {}
    for part in ckpt.partitions:
        run = Run(part.index, 0, part.size, device, 0)
        runs[part.index] = [run]
        dest_bytes[(part.index, device)] = part.size
    for entry in ckpt.tensors.values():
        tensor_device[entry.name] = device
        run_of[entry.name] = runs[entry.partition][0]
    return Placement(runs, dest_bytes, tensor_device, run_of)


def packed_placement(ckpt: Checkpoint, device_of: Callable[[str], str], merge_gap: int = MERGE_GAP) -> Placement:
    """Each tensor to its device; a partition's tensors for one device packed into one buffer.

    Neighbouring tensors bound for the same device become one run (one copy per chunk instead of one per tensor);
    runs start 4096-aligned in the destination buffer so every tensor view stays aligned.
    """
    runs: dict[int, list[Run]] = {}
    dest_bytes: dict[tuple[int, str], int] = {}
    tensor_device: dict[str, str] = {}
    run_of: dict[str, Run] = {}
    by_partition: dict[int, list[TensorEntry]] = {}
    for entry in ckpt.tensors.values():
        tensor_device[entry.name] = device_of(entry.name)
        by_partition.setdefault(entry.partition, []).append(entry)
    for p, entries in sorted(by_partition.items()):
        entries.sort(key=lambda e: e.offset)
        groups: list[tuple[str, int, int, list[TensorEntry]]] = []
        for entry in entries:
            device, end = tensor_device[entry.name], entry.offset + max(entry.nbytes, 1)
            if groups and groups[-1][0] == device and entry.offset - groups[-1][2] <= merge_gap:
                d, start, _, members = groups[-1]
                groups[-1] = (d, start, max(end, groups[-1][2]), members + [entry])
            else:
                groups.append((device, entry.offset, end, [entry]))
        part_runs = []
        for device, start, end, members in groups:
            end = min(end, ckpt.partitions[p].size)
            offset = round_up(dest_bytes.get((p, device), 0), ALIGNMENT)
            run = Run(p, start, end, device, offset)
            dest_bytes[(p, device)] = offset + end - start
            part_runs.append(run)
            for entry in members:
                run_of[entry.name] = run
        runs[p] = part_runs
    return Placement(runs, dest_bytes, tensor_device, run_of)


# -------------------------------------------------------------------------------------------------------- targets


class DirectHostTarget:
    """Readers write straight into the partition's final (page-aligned) host buffer."""

    staged = False

    def __init__(self, buffers: dict[int, HostBuffer]):
        self.buffers = buffers

    def acquire(self, unit: ReadUnit) -> memoryview:
        start = unit.offset
        return self.buffers[unit.partition].view()[start:start + round_up(unit.nbytes, ALIGNMENT)]

    def needs_prefault(self, unit: ReadUnit) -> bool:
        return not self.buffers[unit.partition].populated

    def prefault(self, unit: ReadUnit) -> None:
        buffer = self.buffers[unit.partition]
        end = unit.offset + round_up(unit.nbytes, ALIGNMENT)
        for start in range(unit.offset, end, PREFAULT_STEP):
            buffer.populate(start, min(start + PREFAULT_STEP, end))

    def commit(self, unit: ReadUnit, view: memoryview) -> None:
        return None

    def give_back(self, unit: ReadUnit, view: memoryview) -> None:
        return None

    def finish(self) -> None:
        for buffer in self.buffers.values():
            buffer.populated = True  # every page now holds data

    def abort(self) -> None:
        return None


class StagedTarget:
    """Readers write into ring slots; committed units are copied by segments to the placement's buffers."""

    staged = True

    def __init__(self, ring: StagingRing, placement: Placement, dests: dict[tuple[int, str], object]):
        self.ring = ring
        self.placement = placement
        self.dests = dests  # (partition, device) -> 1-D uint8 torch tensor
        self._slot_of: dict[int, Slot] = {}
        self._lock = threading.Lock()

    def acquire(self, unit: ReadUnit) -> memoryview:
        slot = self.ring.acquire()
        if slot.size < round_up(unit.nbytes, ALIGNMENT):
            self.ring.give_back(slot)
            raise ValueError(f"staging slot of {slot.size} bytes cannot hold a {unit.nbytes}-byte read unit")
        with self._lock:
            self._slot_of[id(slot.view)] = slot
        return slot.view

    def _take_slot(self, view: memoryview) -> Slot:
        with self._lock:
            return self._slot_of.pop(id(view))

    def needs_prefault(self, unit: ReadUnit) -> bool:
        return False

    def prefault(self, unit: ReadUnit) -> None:
        return None

    def commit(self, unit: ReadUnit, view: memoryview) -> None:
        slot = self._take_slot(view)
        copies = [Copy(self.dests[(unit.partition, run.device)], dest_offset, src_offset, nbytes)
                  for run, dest_offset, src_offset, nbytes in self.placement.segments(unit)]
        self.ring.submit(slot, copies)

    def give_back(self, unit: ReadUnit, view: memoryview) -> None:
        self.ring.give_back(self._take_slot(view))

    def finish(self) -> None:
        self.ring.drain()

    def abort(self) -> None:
        self.ring.close()


# ------------------------------------------------------------------------------------------------------- pipeline


@dataclass
class PipelineStats:
    """Where a load's time went. The *_thread_seconds are summed over the reader threads (divide by `threads` for
    the share of the wall time); the consumer's are its own (one thread verifies and commits in arrival order)."""

    bytes: int = 0
    units: int = 0
    threads: int = 0
    read_seconds: float = 0.0  # from start() until the last unit was committed
    verify_seconds: float = 0.0  # consumer: checksums
    prefault_seconds: float = 0.0
    commit_seconds: float = 0.0  # consumer: handing units to the target (a staged load: submitting the copies)
    consumer_idle_seconds: float = 0.0  # consumer: waiting for the next read unit
    acquire_thread_seconds: float = 0.0  # readers: waiting for destination memory (a staging slot to free up)
    io_thread_seconds: float = 0.0  # readers: in the read calls

    def as_dict(self) -> dict[str, float]:
        return {name: round(value, 4) if isinstance(value, float) else value
                for name, value in asdict(self).items()}


_ABORTED = object()  # queued by abort() so the consuming thread stops waiting for units that will never come


class Pipeline:
    """Runs reader threads over `units` into `target` and a consuming thread that verifies and commits each unit
    as it arrives (so copies to the device start while the caller is still building the model); `finish()` waits
    for all of it and re-raises the first error."""

    def __init__(self, ckpt: Checkpoint, units: list[ReadUnit], readers: dict[int, FileReader], target,
                 verify: bool, threads: int = 2, prefault: bool = True, tee=None, request_bytes: int | None = None):
        self.ckpt = ckpt
        self.request_bytes = request_bytes  # bytes per preadv (None: a whole unit per request)
        self.tee = tee  # hpcllm.store.tee.LoadTee: gets each unit after it was verified (cache on load)
        self.units = units
        self.readers = readers
        self.target = target
        self.verify = verify
        self.threads = max(1, threads)
        self.prefault = prefault
        self.stats = PipelineStats(bytes=sum(u.nbytes for u in units), units=len(units),
                                   threads=min(self.threads, max(1, len(units))))
        self._done: queue.Queue = queue.Queue()
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._consumer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._started_at = 0.0

    def start(self) -> "Pipeline":
        self._started_at = time.perf_counter()
        if self.prefault and any(self.target.needs_prefault(u) for u in self.units):
            self._workers.append(threading.Thread(target=self._prefault_loop, name="hpcllm-prefault", daemon=True))
        for i in range(min(self.threads, max(1, len(self.units)))):
            self._workers.append(threading.Thread(target=self._read_loop, name=f"hpcllm-read-{i}", daemon=True))
        for worker in self._workers:
            worker.start()
        self._consumer = threading.Thread(target=self._consume, name="hpcllm-commit", daemon=True)
        self._consumer.start()
        return self

    def _claim(self) -> ReadUnit | None:
        with self._lock:
            if self._stop.is_set() or self._next >= len(self.units):
                return None
            unit = self.units[self._next]
            self._next += 1
            return unit

    def _read_loop(self) -> None:
        acquiring = reading = 0.0
        try:
            while (unit := self._claim()) is not None:
                began = time.perf_counter()
                try:
                    view = self.target.acquire(unit)
                except RingClosed:
                    return
                except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
                    self._done.put(exc)
                    return
                acquired = time.perf_counter()
                try:
                    reader = self.readers[unit.partition]
                    reader.read_into(unit.offset, view[:round_up(unit.nbytes, ALIGNMENT)], unit.nbytes,
                                     max_request=self.request_bytes)
                except BaseException as exc:  # noqa: BLE001
                    self.target.give_back(unit, view)
                    self._done.put(exc)
                    return
                acquiring += acquired - began
                reading += time.perf_counter() - acquired
                self._done.put((unit, view))
        finally:
            with self._lock:
                self.stats.acquire_thread_seconds += acquiring
                self.stats.io_thread_seconds += reading

    def _prefault_loop(self) -> None:
        # Fault destination pages in ahead of the readers; skip units readers already claimed (they fault those
        # themselves), so the two never work on the same memory.
        started = time.perf_counter()
        position = 0
        while not self._stop.is_set():
            with self._lock:
                position = max(position, self._next)
            if position >= len(self.units):
                break
            unit = self.units[position]
            if self.target.needs_prefault(unit):
                self.target.prefault(unit)
            position += 1
        self.stats.prefault_seconds = time.perf_counter() - started

    def _consume(self) -> None:
        """Verify + commit every unit in arrival order; on the first error stop the readers and keep the error."""
        try:
            for _ in range(len(self.units)):
                began = time.perf_counter()
                item = self._done.get()
                self.stats.consumer_idle_seconds += time.perf_counter() - began
                if item is _ABORTED:
                    return
                if isinstance(item, BaseException):
                    raise item
                unit, view = item
                if self.verify:
                    self._verify(unit, view)
                if self.tee is not None:  # before commit: a staged slot is reused once its copy is done
                    self.tee.write(unit.partition, unit.offset, view[:unit.nbytes])
                began = time.perf_counter()
                self.target.commit(unit, view)
                self.stats.commit_seconds += time.perf_counter() - began
            self.target.finish()
            self.stats.read_seconds = time.perf_counter() - self._started_at
        except BaseException as exc:  # noqa: BLE001 - re-raised by finish() on the caller's thread
            self._error = exc
            self._stop.set()
            self.target.abort()  # wakes readers blocked on a full staging ring

    def finish(self) -> PipelineStats:
        """Wait until every unit is verified and committed; re-raises the first error after stopping all threads."""
        if self._consumer is not None:
            self._consumer.join()
        if self._error is not None:
            self.abort()
            raise self._error
        self._join()
        return self.stats

    def _verify(self, unit: ReadUnit, view: memoryview) -> None:
        started = time.perf_counter()
        part = self.ckpt.partitions[unit.partition]
        for chunk in range(unit.first_chunk, unit.last_chunk + 1):
            start, length = part.chunk_range(chunk)
            local = start - unit.offset
            self.ckpt.verify_chunk(unit.partition, chunk, view[local:local + length])
        self.stats.verify_seconds += time.perf_counter() - started

    def abort(self) -> None:
        """Stop readers and the consumer, wait for them and for in-flight copies, so no thread writes into freed
        memory once this returns."""
        self._stop.set()
        self.target.abort()
        self._join()
        if self._consumer is not None:
            self._done.put(_ABORTED)
            self._consumer.join()
            self._consumer = None
        if self.target.staged:
            try:
                self.target.ring.drain()
            except Exception:  # noqa: BLE001 - already failing; the original error is what matters
                pass

    def _join(self) -> None:
        for worker in self._workers:
            worker.join()
        self._workers = []
