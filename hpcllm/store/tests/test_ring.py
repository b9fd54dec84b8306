"""The staging ring and pipeline scheduling that the GPU path uses, driven by a slow asynchronous copy engine.

AsyncCopyEngine stands in for a CUDA stream: copies run later on a worker thread and a fence says when they are
done. If the ring reused a slot before its copy finished, the reader would overwrite bytes still to be copied and
the destination would differ from the file.
"""

from __future__ import annotations

import queue
import random
import threading
import time

import pytest
import torch

from hpcllm.checkpoint import ChecksumMismatch, read_checkpoint
from hpcllm.store.pipeline import Pipeline, StagedTarget, packed_placement, plan_units
from hpcllm.store.readers import BUFFERED, FileReader
from hpcllm.store.ring import (Copy, DeviceRouter, HostCopyEngine, RingClosed, StagingRing, host_slot,
                               host_slots)


class ThreadFence:
    def __init__(self):
        self.event = threading.Event()

    def done(self) -> bool:
        return self.event.is_set()

    def wait(self) -> None:
        self.event.wait()


class AsyncCopyEngine:
    """Copies in submission order on one worker thread, each after a random delay (like a busy copy stream)."""

    def __init__(self, max_delay: float = 0.003, seed: int = 0):
        self.jobs: queue.Queue = queue.Queue()
        self.random = random.Random(seed)
        self.max_delay = max_delay
        self.copies_done = 0
        self.worker = threading.Thread(target=self._run, daemon=True)
        self.worker.start()

    def _run(self):
        while (job := self.jobs.get()) is not None:
            slot, copies, fence = job
            time.sleep(self.random.uniform(0, self.max_delay))
            for c in copies:
                c.dest[c.dest_offset:c.dest_offset + c.nbytes].copy_(
                    slot.tensor[c.src_offset:c.src_offset + c.nbytes])
            self.copies_done += len(copies)
            fence.event.set()

    def copy(self, slot, copies):
        fence = ThreadFence()
        self.jobs.put((slot, copies, fence))
        return fence

    def finish(self):
        return None  # StagingRing.drain has waited on every fence already

    def stop(self):
        self.jobs.put(None)
        self.worker.join()


def test_ring_never_reuses_a_slot_before_its_copy_finished():
    engine = AsyncCopyEngine()
    slots = host_slots(3, 4096)
    ring = StagingRing(slots, engine)
    dest = torch.zeros(200 * 4096, dtype=torch.uint8)
    for block in range(200):
        slot = ring.acquire()
        slot.tensor.fill_(block % 251)
        ring.submit(slot, [Copy(dest, block * 4096, 0, 4096)])
    ring.drain()
    engine.stop()
    expected = torch.arange(200, dtype=torch.int64).remainder(251).to(torch.uint8).repeat_interleave(4096)
    assert torch.equal(dest, expected)
    assert ring.stats.submitted == 200 and ring.stats.waits_for_copy > 0


def _copy_blocks(ring: StagingRing, blocks: int) -> torch.Tensor:
    dest = torch.zeros(blocks * 4096, dtype=torch.uint8)
    for block in range(blocks):
        slot = ring.acquire()
        slot.tensor.fill_(block % 251)
        ring.submit(slot, [Copy(dest, block * 4096, 0, 4096)])
    ring.drain()
    return dest


def _expected(blocks: int) -> torch.Tensor:
    return torch.arange(blocks, dtype=torch.int64).remainder(251).to(torch.uint8).repeat_interleave(4096)


def _grown_ring_copies(make_slot, count: int, blocks: int) -> StagingRing:
    """A ring of one slot growing to `count` through make_slot while `blocks` blocks go through it to an async engine;
    every block must land where it belongs whatever the growth did."""
    engine = AsyncCopyEngine()
    ring = StagingRing([host_slot(0, 4096)], engine)
    ring.grow(make_slot, count)
    dest = _copy_blocks(ring, blocks)
    engine.stop()
    assert torch.equal(dest, _expected(blocks))
    return ring


def test_a_ring_grows_its_slots_while_it_is_used():
    """The loader starts with one slot and allocates the rest in the background (pinning memory is slow)."""
    allocated = []

    def slow_slot(index: int):
        time.sleep(0.01)
        allocated.append(index)
        return host_slot(index, 4096)

    ring = _grown_ring_copies(slow_slot, 4, 100)
    assert allocated == [1, 2, 3] and ring.stats.slots == 4 and len(ring.slots) == 4 and ring.grow_error is None


def test_a_ring_whose_growth_fails_keeps_working_with_the_slots_it_has():
    def third_slot_fails(index: int):
        if index == 2:
            raise RuntimeError("CUDA error: out of memory (pinned)")
        return host_slot(index, 4096)

    ring = _grown_ring_copies(third_slot_fails, 5, 50)
    assert ring.stats.slots == 2 and "out of memory" in str(ring.grow_error)


def test_a_closed_ring_stops_growing():
    ring = StagingRing([host_slot(0, 4096)], HostCopyEngine())
    release = threading.Event()
    made = []

    def slot_after_release(index: int):
        release.wait(timeout=5)
        made.append(index)
        return host_slot(index, 4096)

    ring.grow(slot_after_release, 10)
    ring.close()
    release.set()
    ring.drain()  # joins the growing thread
    assert made == [1] and ring.stats.slots == 1  # the slot being made when it closed is dropped, no more made


def test_acquire_waits_for_a_slot_given_back_by_another_thread():
    ring = StagingRing(host_slots(1, 4096), HostCopyEngine())
    held = ring.acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(ring.acquire()))
    waiter.start()
    time.sleep(0.05)
    assert not got  # blocked: the only slot is held
    ring.give_back(held)
    waiter.join(timeout=5)
    assert got == [held]


def test_close_wakes_blocked_acquire():
    ring = StagingRing(host_slots(1, 4096), HostCopyEngine())
    ring.acquire()
    errors = []

    def blocked():
        try:
            ring.acquire()
        except RingClosed as exc:
            errors.append(exc)

    thread = threading.Thread(target=blocked)
    thread.start()
    time.sleep(0.05)
    ring.close()
    thread.join(timeout=5)
    assert not thread.is_alive() and errors


def staged_pipeline(ckpt, engine, slots: int, verify: bool = True):
    units = plan_units(ckpt, [p.index for p in ckpt.partitions], ckpt.partitions[0].chunk_size)
    placement = packed_placement(ckpt, lambda name: "cpu")
    dests = {key: torch.zeros(n, dtype=torch.uint8) for key, n in placement.dest_bytes.items()}
    ring = StagingRing(host_slots(slots, max(u.nbytes for u in units) + 4096), engine)
    readers = {p.index: FileReader(p.path, BUFFERED, p.size) for p in ckpt.partitions}
    pipeline = Pipeline(ckpt, units, readers, StagedTarget(ring, placement, dests), verify=verify, threads=2)
    return pipeline, placement, dests, ring, readers


def test_pipeline_through_async_engine_places_every_tensor(models):
    _, converted = models("llama_sharded")
    ckpt = read_checkpoint(converted)
    engine = AsyncCopyEngine()
    pipeline, placement, dests, ring, readers = staged_pipeline(ckpt, DeviceRouter({"cpu": engine}), slots=2)
    pipeline.start().finish()
    engine.stop()
    assert ring.stats.submitted == len(pipeline.units) > 2 * ring.stats.slots
    for entry in ckpt.tensors.values():
        with open(ckpt.partitions[entry.partition].path, "rb") as f:
            f.seek(entry.offset)
            expected = f.read(entry.nbytes)
        device, offset = placement.locate(entry)
        got = dests[(entry.partition, device)][offset:offset + entry.nbytes].numpy().tobytes()
        assert got == expected, entry.name
    for reader in readers.values():
        reader.close()


def test_staged_units_stream_through_the_ring_before_finish_is_called(models):
    """The caller builds the model (for a fresh process: seconds of imports) between start() and finish(); the
    few staging slots must keep cycling meanwhile, not wait for finish()."""
    _, converted = models("llama_sharded")
    ckpt = read_checkpoint(converted)
    engine = AsyncCopyEngine(max_delay=0.001)
    pipeline, _, _, ring, readers = staged_pipeline(ckpt, DeviceRouter({"cpu": engine}), slots=2)
    pipeline.start()
    deadline = time.monotonic() + 30
    while ring.stats.submitted < len(pipeline.units) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ring.stats.submitted == len(pipeline.units) > 2 * ring.stats.slots  # all before finish()
    pipeline.finish()
    engine.stop()
    for reader in readers.values():
        reader.close()


def test_abort_while_the_caller_is_still_building_stops_every_thread(models):
    _, converted = models("llama_sharded")
    ckpt = read_checkpoint(converted)
    # slow copies (0.25 s on average): readers block on a full ring, and even on a loaded machine, where the 0.05 s
    # sleep below can last much longer, the abort comes before every unit went through (0.02 s did not, once)
    engine = AsyncCopyEngine(max_delay=0.5)
    pipeline, _, _, ring, readers = staged_pipeline(ckpt, DeviceRouter({"cpu": engine}), slots=2)
    pipeline.start()
    time.sleep(0.05)
    pipeline.abort()  # what load_model does when the skeleton build fails
    assert not any(t.is_alive() for t in threading.enumerate() if t.name.startswith(("hpcllm-read", "hpcllm-commit")))
    assert ring.stats.submitted < len(pipeline.units)
    engine.stop()
    for reader in readers.values():
        reader.close()


def test_pipeline_aborts_on_bad_chunk_without_hanging(copy_checkpoint):
    folder = copy_checkpoint("llama_sharded")
    ckpt = read_checkpoint(folder)
    part = ckpt.partitions[1]
    with open(part.path, "r+b") as f:
        f.seek(part.size // 3)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    engine = AsyncCopyEngine(max_delay=0.01)
    pipeline, _, _, ring, readers = staged_pipeline(ckpt, DeviceRouter({"cpu": engine}), slots=2)
    started = time.monotonic()
    with pytest.raises(ChecksumMismatch, match=part.file):
        pipeline.start().finish()
    assert time.monotonic() - started < 30
    assert not any(t.is_alive() for t in threading.enumerate() if t.name.startswith("hpcllm-read"))
    engine.stop()
    for reader in readers.values():
        reader.close()


def test_placement_packs_per_device_and_keeps_alignment(models):
    _, converted = models("llama")
    ckpt = read_checkpoint(converted)
    placement = packed_placement(ckpt, lambda name: "cuda:1" if ".layers.1." in name else "cpu")
    seen = {}
    for entry in ckpt.tensors.values():
        device, offset = placement.locate(entry)
        assert device == ("cuda:1" if ".layers.1." in entry.name else "cpu")
        assert offset % 4096 == 0
        assert offset + entry.nbytes <= placement.dest_bytes[(entry.partition, device)]
        seen.setdefault((entry.partition, device), []).append((offset, offset + entry.nbytes))
    for spans in seen.values():  # no two tensors overlap in a destination buffer
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    # a device's share is smaller than the whole partition: only its tensors are copied there
    total = {p.index: p.size for p in ckpt.partitions}
    assert all(n <= total[p] for (p, _), n in placement.dest_bytes.items())
