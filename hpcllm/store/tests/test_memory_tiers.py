"""Aligned, pre-faulted host buffers, the pool, and tier detection."""

from __future__ import annotations

import pytest

from hpcllm.errors import ConfigError
from hpcllm.store.memory import PAGE_SIZE, HostBuffer, HostBufferPool
from hpcllm.store.tiers import detect_tier, filesystem_type, tier_settings


def test_host_buffer_is_page_aligned_and_populates():
    buffer = HostBuffer(3 * PAGE_SIZE + 5)
    assert buffer.address % PAGE_SIZE == 0 and buffer.capacity == 4 * PAGE_SIZE
    assert not buffer.populated
    buffer.view()[:4] = b"abcd"
    buffer.populate()
    assert buffer.populated and bytes(buffer.view()[:4]) == b"abcd"  # faulting in never changes contents
    tensor = buffer.tensor()
    assert tensor.data_ptr() == buffer.address and tensor.numel() == buffer.capacity


def test_pool_hands_back_the_best_fitting_buffer():
    pool = HostBufferPool(max_waste=0.25)
    small, large = pool.acquire(10 * PAGE_SIZE), pool.acquire(100 * PAGE_SIZE)
    pool.release(small)
    pool.release(large)
    assert pool.acquire(9 * PAGE_SIZE) is small
    assert pool.acquire(40 * PAGE_SIZE) is not large  # would waste more than 25 %: a new buffer
    assert pool.acquire(90 * PAGE_SIZE) is large
    assert pool.stats().buffers == 3


def test_reserved_arena_serves_any_partition_sizes_prefaulted_and_takes_them_back():
    from hpcllm.store.memory import ARENA_SLACK_PAGES

    pool = HostBufferPool()
    pool.reserve_bytes((100 - ARENA_SLACK_PAGES) * PAGE_SIZE)  # 100 pages with the slack for page rounding
    assert pool.prefaulted_for([60 * PAGE_SIZE, 40 * PAGE_SIZE])
    assert not pool.prefaulted_for([60 * PAGE_SIZE, 41 * PAGE_SIZE])  # does not fit: a load would fault fresh pages
    first, second = pool.acquire(60 * PAGE_SIZE - 100), pool.acquire(40 * PAGE_SIZE)
    assert first.populated and second.populated and first.arena is second.arena
    assert first.capacity == 60 * PAGE_SIZE and second.address == first.address + first.capacity  # no overlap
    assert not pool.prefaulted_for([PAGE_SIZE])  # the arena is used up
    first.view()[:5] = b"hello"
    assert bytes(first.tensor()[:5].numpy()) == b"hello" and first.tensor().numel() == first.capacity
    second.view()[-1:] = b"z"
    assert bytes(second.tensor()[-1:].numpy()) == b"z"
    fresh = pool.acquire(PAGE_SIZE)
    assert fresh.arena is None and not fresh.populated
    pool.release(first)
    pool.release(second)
    assert pool.stats().arena_free_bytes == 100 * PAGE_SIZE  # the ranges merged back: one model of 100 pages fits
    assert pool.prefaulted_for([100 * PAGE_SIZE])
    assert pool.trim() == 100 * PAGE_SIZE and pool.stats().arena_bytes == 0


def _transparent_huge_pages() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "never"
    return text[text.index("[") + 1:text.index("]")]


def test_reserved_arena_is_backed_by_huge_pages_and_load_time_buffers_are_not():
    """The arena is faulted in before any request, so it takes huge pages (a direct read into them is one large
    request per 2 MiB instead of one segment per 4 KiB page); buffers faulted during a load never do (slow faults).
    On a kernel with transparent huge pages off the arena is normal pages, reports none, and serves all the same."""
    pool = HostBufferPool()
    pool.reserve_bytes(32 << 20)
    carved = pool.acquire(16 << 20)
    carved.tensor().fill_(7)
    assert int(carved.tensor()[-1]) == 7
    if _transparent_huge_pages() == "never":
        assert carved.huge_page_bytes() == 0
    else:
        assert carved.huge_page_bytes() >= 16 << 20  # most of the 32 MiB arena (alignment may leave edges small)
    assert carved.huge_page_bytes() == pool.acquire(8 << 20).huge_page_bytes()  # both report their arena's
    fresh = HostBuffer(32 << 20)
    fresh.populate()
    assert fresh.huge_page_bytes() == 0
    small_pages = HostBufferPool()
    small_pages.reserve_bytes(32 << 20, huge_pages=False)
    assert small_pages.acquire(16 << 20).huge_page_bytes() == 0


def test_reserve_from_environment(monkeypatch):
    from hpcllm.store import memory

    pool = HostBufferPool()
    monkeypatch.setattr(memory, "_default_pool", pool)
    for value in ("", "0", "-5", "lots"):
        monkeypatch.setenv(memory.HOST_POOL_ENV, value)
        assert memory.reserve_from_environment() == 0
    monkeypatch.setenv(memory.HOST_POOL_ENV, str(10 * PAGE_SIZE))
    assert memory.reserve_from_environment() == (10 + memory.ARENA_SLACK_PAGES) * PAGE_SIZE
    assert pool.prefaulted_for([4 * PAGE_SIZE + 1, 6 * PAGE_SIZE - 1])  # page-rounded partitions still fit


def test_a_stopped_reservation_reserves_nothing(monkeypatch):
    """A spare assigned while it still faults its pool in stops the reservation: the load then finds no arena
    (it uses fresh memory) instead of waiting, and the stop is seen between steps."""
    import threading

    from hpcllm.store import memory

    pool, stop = HostBufferPool(), threading.Event()
    stop.set()
    assert pool.reserve_bytes(64 << 20, stop=stop) is False
    assert pool.stats().arena_bytes == 0 and not pool.prefaulted_for([PAGE_SIZE])
    steps = []
    real_populate = HostBuffer.populate

    def populate_then_stop(buffer, start=0, end=None):  # the assignment arrives during the second step
        steps.append(start)
        real_populate(buffer, start, end)
        if len(steps) == 2:
            stop.set()

    stop.clear()
    monkeypatch.setattr(memory, "RESERVE_STEP", 4 << 20)
    monkeypatch.setattr(HostBuffer, "populate", populate_then_stop)
    assert pool.reserve_bytes(64 << 20, stop=stop) is False
    assert steps == [0, 4 << 20] and pool.stats().arena_bytes == 0
    monkeypatch.setattr(memory, "_default_pool", pool)
    monkeypatch.setenv(memory.HOST_POOL_ENV, str(64 << 20))
    assert memory.reserve_from_environment(stop) == 0
    stop.clear()
    assert memory.reserve_from_environment(stop) >= 64 << 20 and pool.prefaulted_for([64 << 20])


def test_pool_reserve_prefaults_for_later_loads():
    pool = HostBufferPool()
    pool.reserve([8 * PAGE_SIZE, 16 * PAGE_SIZE])
    stats = pool.stats()
    assert stats.free_buffers == 2 and stats.bytes_free == 24 * PAGE_SIZE
    assert pool.acquire(16 * PAGE_SIZE).populated
    assert pool.trim() == 8 * PAGE_SIZE and pool.stats().buffers == 1


def test_tier_detection_from_filesystem_type():
    assert filesystem_type("/dev/shm") == "tmpfs" and detect_tier("/dev/shm") == "dram"
    assert detect_tier("/var/tmp") in ("disk", "sharedfs", "dram")
    assert filesystem_type("/proc") == "proc"


def test_unknown_tier_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown storage tier"):
        tier_settings("tape")
    assert tier_settings("disk").reader == "odirect" and tier_settings("sharedfs").reader == "buffered"


def _resident_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))


def test_a_carved_range_whose_pages_were_discarded_comes_back_faulted_in():
    """A model's dropped weights give their pages back (LoadedModel.discard); the arena they go back to must still
    be pre-faulted, or the next load into it pays the faults the arena exists to avoid."""
    pool = HostBufferPool()
    size = 64 * PAGE_SIZE * 16  # 4 MiB
    pool.reserve_bytes(size)
    part = pool.acquire(size)
    assert part.populated
    before = _resident_kib()
    assert part.discard(part.address, part.capacity) == part.capacity
    assert not part.populated and _resident_kib() <= before - size // 1024 // 2
    pool.release(part)
    assert _resident_kib() >= before - 256  # faulted in again (a little slack for other allocations)
    assert pool.prefaulted_for([size]) and pool.acquire(size).populated
