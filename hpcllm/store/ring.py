"""A bounded ring of staging slots between reader threads and an asynchronous copy engine.

Used whenever the final memory is not what the readers can write into directly (GPU memory; or host memory laid
out differently from the file under a device_map). Readers `acquire` a free slot, read one unit of chunks into
it, the loader verifies it, then `submit`s the slot's segments to a copy engine, which returns a fence. A slot is
reused only once its fence has signalled, so a model far larger than the staging memory streams through a few
slots while copies of earlier units overlap with reads of later ones.

Copy engines (the only piece that differs per device):
  HostCopyEngine    synchronous memcpy into host destinations (CPU entries of a device_map)
  CudaCopyEngine    (hpcllm.store.cuda) copy_(non_blocking=True) on a dedicated CUDA stream, fenced by events
  DeviceRouter      sends each copy to the engine of its destination's device
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol


@dataclass
class Slot:
    """One staging buffer: `view` for readers (page-aligned), `tensor` (uint8, same memory) for copy engines."""

    index: int
    view: memoryview
    tensor: object
    size: int


@dataclass(frozen=True)
class Copy:
    """Copy `nbytes` from slot offset `src_offset` to `dest` (a 1-D uint8 torch tensor) at `dest_offset`."""

    dest: object
    dest_offset: int
    src_offset: int
    nbytes: int


class Fence(Protocol):
    def done(self) -> bool: ...

    def wait(self) -> None: ...


class CopyEngine(Protocol):
    def copy(self, slot: Slot, copies: list[Copy]) -> Fence: ...

    def finish(self) -> None: ...


class DoneFence:
    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


@dataclass
class AllFence:
    fences: list = field(default_factory=list)

    def done(self) -> bool:
        return all(f.done() for f in self.fences)

    def wait(self) -> None:
        for fence in self.fences:
            fence.wait()


class HostCopyEngine:
    """Copies into host (CPU) tensors right away; the fence is already signalled."""

    def copy(self, slot: Slot, copies: list[Copy]) -> Fence:
        for c in copies:
            c.dest[c.dest_offset:c.dest_offset + c.nbytes].copy_(slot.tensor[c.src_offset:c.src_offset + c.nbytes])
        return DoneFence()

    def finish(self) -> None:
        return None


class DeviceRouter:
    """Routes each copy to the engine for its destination device (e.g. 'cpu', 'cuda:0', 'cuda:1')."""

    def __init__(self, engines: dict[str, CopyEngine]):
        self.engines = engines

    def copy(self, slot: Slot, copies: list[Copy]) -> Fence:
        by_device: dict[str, list[Copy]] = {}
        for c in copies:
            by_device.setdefault(str(c.dest.device), []).append(c)
        return AllFence([self.engines[device].copy(slot, group) for device, group in by_device.items()])

    def finish(self) -> None:
        for engine in self.engines.values():
            engine.finish()


@dataclass
class RingStats:
    slots: int
    slot_bytes: int
    submitted: int = 0
    waits_for_copy: int = 0  # acquires that had to wait for an in-flight copy to finish


class StagingRing:
    """Bounded staging slots recycled through copy fences. acquire() blocks; never deadlocks while the consumer
    keeps submitting or giving back the slots it took from readers."""

    def __init__(self, slots: list[Slot], engine: CopyEngine):
        if not slots:
            raise ValueError("a staging ring needs at least one slot")
        self.slots = list(slots)
        self.engine = engine
        self._free: deque[Slot] = deque(slots)
        self._inflight: deque[tuple[Fence, Slot]] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._grower: threading.Thread | None = None
        self.grow_error: BaseException | None = None  # why the ring has fewer slots than asked (it works with those)
        self.stats = RingStats(slots=len(slots), slot_bytes=slots[0].size)

    def grow(self, make_slot: Callable[[int], Slot], count: int) -> None:
        """Add slots up to `count` on a background thread while readers already use the first ones: pinning fresh
        memory is slow (0.12 s for 18 x 16 MiB slots on the H200 machine, a tenth of a 2 GB cold load), and a
        load's reads need not wait for all of it. drain() waits for the thread."""
        def add_slots() -> None:
            try:
                for index in range(len(self.slots), count):
                    if self._closed:
                        return
                    slot = make_slot(index)
                    with self._cv:
                        if self._closed:
                            return
                        self.slots.append(slot)
                        self._free.append(slot)
                        self.stats.slots += 1
                        self._cv.notify()
            except Exception as exc:  # noqa: BLE001 - e.g. no more pinned memory: the load goes on with fewer slots
                self.grow_error = exc

        self._grower = threading.Thread(target=add_slots, name="hpcllm-staging-slots", daemon=True)
        self._grower.start()

    def acquire(self) -> Slot:
        """A free slot; if none, the slot of the oldest in-flight copy once that copy has finished."""
        with self._cv:
            while True:
                if self._closed:
                    raise RingClosed("staging ring closed")
                if self._free:
                    return self._free.popleft()
                if self._inflight:
                    fence, slot = self._inflight.popleft()
                    if not fence.done():
                        self.stats.waits_for_copy += 1
                    break
                self._cv.wait()
        fence.wait()  # outside the lock: other threads keep submitting / acquiring meanwhile
        return slot

    def submit(self, slot: Slot, copies: list[Copy]) -> None:
        """Start copying a filled slot; it becomes reusable when the engine's fence signals."""
        fence = self.engine.copy(slot, copies) if copies else DoneFence()
        with self._cv:
            self._inflight.append((fence, slot))
            self.stats.submitted += 1
            self._cv.notify()

    def give_back(self, slot: Slot) -> None:
        """Return a slot without copying (a failed read)."""
        with self._cv:
            self._free.append(slot)
            self._cv.notify()

    def drain(self) -> None:
        """Wait for every submitted copy and the engine itself to finish."""
        while True:
            with self._cv:
                if not self._inflight:
                    break
                fence, slot = self._inflight.popleft()
            fence.wait()
            with self._cv:
                self._free.append(slot)
                self._cv.notify()
        if self._grower is not None:
            self._grower.join()
        self.engine.finish()

    def close(self) -> None:
        """Wake and fail every blocked acquire (used when a load is aborted)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()


def host_slots(count: int, size: int) -> list[Slot]:
    """Pageable staging slots (anonymous mmaps, pre-faulted) for rings whose destinations are all on the host."""
    return [host_slot(index, size) for index in range(count)]


def host_slot(index: int, size: int) -> Slot:
    from hpcllm.store.memory import HostBuffer

    buffer = HostBuffer(size)
    buffer.populate()
    return Slot(index=index, view=buffer.view()[:size], tensor=buffer.tensor()[:size], size=size)


class RingClosed(Exception):
    """acquire() on a ring closed because the load was aborted."""
