"""shared_memory=True: a CPU load whose weights are torch shared memory from the start (SharedHostBuffer), so a
model process gets them by fd; torch.multiprocessing would otherwise copy every weight into a new shm segment."""

from __future__ import annotations

import mmap

import pytest
import torch

from hpcllm.store import memory
from hpcllm.store.loader import load_model
from hpcllm.store.memory import PAGE_SIZE, HostBufferPool, SharedHostBuffer

from .conftest import cache_in_page_cache, evict_from_page_cache, reference
from .test_loader import assert_same_model, assert_views_of


def parameter_storages(model) -> dict[int, torch.UntypedStorage]:
    return {p.untyped_storage().data_ptr(): p.untyped_storage() for p in model.parameters()}


def assert_shared_without_copy(loaded) -> None:
    """Every weight is a view of the load's shared buffers, and sharing it (what pickling for another process does
    first) keeps it where it is: no new segment, no copy."""
    assert loaded._host_buffers and all(isinstance(b, SharedHostBuffer) for b in loaded._host_buffers)
    assert_views_of(loaded, [(b.address, b.address + b.capacity) for b in loaded._host_buffers])
    storages = parameter_storages(loaded.model)
    segments = {b.address - b.offset for b in loaded._host_buffers}  # a buffer each, or the one arena they share
    assert set(storages) == segments  # one storage per segment: pickling passes one fd for each
    assert all(storage.is_shared() for storage in storages.values())
    before = {name: p.data_ptr() for name, p in loaded.model.named_parameters()}
    for p in loaded.model.parameters():
        p.share_memory_()
    assert {name: p.data_ptr() for name, p in loaded.model.named_parameters()} == before


def test_a_shared_buffer_is_page_aligned_shared_memory_that_sharing_does_not_move():
    buffer = SharedHostBuffer(3 * PAGE_SIZE + 5)
    assert buffer.address % PAGE_SIZE == 0 and buffer.capacity == 4 * PAGE_SIZE and buffer.shared
    buffer.view()[:4] = b"abcd"
    buffer.populate()
    assert buffer.populated and bytes(buffer.view()[:4]) == b"abcd"
    tensor = buffer.tensor()
    assert tensor.data_ptr() == buffer.address and tensor.numel() == buffer.capacity and tensor.is_shared()
    weights = tensor[PAGE_SIZE:3 * PAGE_SIZE].view(torch.bfloat16)
    weights.share_memory_()
    assert weights.data_ptr() == buffer.address + PAGE_SIZE  # not copied into a segment of its own


def test_discarding_a_shared_buffer_frees_its_pages():
    """MADV_DONTNEED on a shared mapping only unmaps: the segment would keep the pages (and their bytes)."""
    buffer = SharedHostBuffer(4 * PAGE_SIZE)
    buffer.tensor().fill_(9)
    assert buffer.discard(buffer.address + PAGE_SIZE, 2 * PAGE_SIZE) == 2 * PAGE_SIZE
    data = buffer.tensor()
    assert int(data[0]) == 9 and int(data[-1]) == 9
    assert int(data[PAGE_SIZE:3 * PAGE_SIZE].count_nonzero()) == 0  # gone from the segment: reads as zeros
    assert not buffer.populated


def test_a_shared_arena_serves_shared_and_plain_requests_and_a_plain_one_serves_only_plain():
    shared = HostBufferPool()
    shared.reserve_bytes(32 * PAGE_SIZE, shared=True)
    assert shared.prefaulted_for([16 * PAGE_SIZE], shared=True) and shared.prefaulted_for([16 * PAGE_SIZE])
    first, second = shared.acquire(16 * PAGE_SIZE, shared=True), shared.acquire(8 * PAGE_SIZE)
    assert isinstance(first, SharedHostBuffer) and isinstance(second, SharedHostBuffer)
    assert first.populated and first.arena is second.arena and second.address == first.address + first.capacity
    first.view()[:5] = b"hello"
    assert bytes(first.tensor()[:5].numpy()) == b"hello"
    assert first.tensor().untyped_storage().data_ptr() == first.arena.address  # one storage: one fd to pass
    shared.release(first)
    shared.release(second)
    assert shared.stats().arena_free_bytes == shared.stats().arena_bytes

    plain = HostBufferPool()
    plain.reserve_bytes(32 * PAGE_SIZE)
    assert plain.prefaulted_for([16 * PAGE_SIZE]) and not plain.prefaulted_for([16 * PAGE_SIZE], shared=True)
    fresh = plain.acquire(16 * PAGE_SIZE, shared=True)
    assert isinstance(fresh, SharedHostBuffer) and fresh.arena is None and not fresh.populated
    plain.release(fresh)
    reused = plain.acquire(16 * PAGE_SIZE)  # a free shared buffer serves a plain request too
    assert reused is fresh
    plain.release(reused)
    plain.release(plain.acquire(8 * PAGE_SIZE))  # a free plain buffer never serves a shared request
    assert isinstance(plain.acquire(8 * PAGE_SIZE, shared=True), SharedHostBuffer)


def test_reserve_from_environment_in_shared_memory(monkeypatch):
    pool = HostBufferPool()
    monkeypatch.setattr(memory, "_default_pool", pool)
    monkeypatch.setenv(memory.HOST_POOL_ENV, str(10 * PAGE_SIZE))
    assert memory.reserve_from_environment(shared=True) == (10 + memory.ARENA_SLACK_PAGES) * PAGE_SIZE
    assert pool.prefaulted_for([4 * PAGE_SIZE, 6 * PAGE_SIZE], shared=True)
    assert isinstance(pool.acquire(PAGE_SIZE, shared=True), SharedHostBuffer)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_cold_disk_load_reads_into_shared_memory(models, arch, expected_disk_mode):
    hf, converted = models(arch)
    evict_from_page_cache(converted)
    loaded = load_model(converted, tier="disk", tokenizer=False, unit_bytes=48 << 10, pool=HostBufferPool(),
                        shared_memory=True)
    assert loaded.stats.reader_mode == expected_disk_mode and not loaded.stats.zero_copy
    assert_same_model(reference(hf), loaded.model)
    assert_shared_without_copy(loaded)


def test_a_plain_load_is_copied_by_sharing(models):
    """The contrast the shared load removes: a normal load's weights move to new memory when shared."""
    _, converted = models("llama")
    loaded = load_model(converted, tier="disk", tokenizer=False, pool=HostBufferPool())
    weight = next(loaded.model.parameters())
    before = weight.data_ptr()
    assert not weight.untyped_storage().is_shared()
    weight.share_memory_()
    assert weight.data_ptr() != before


def test_a_file_the_page_cache_holds_is_read_not_mapped(models):
    """A plain load would map it (zero copy in this process, a full copy when shared)."""
    hf, converted = models("qwen2")
    cache_in_page_cache(converted)
    loaded = load_model(converted, tier="disk", tokenizer=False, pool=HostBufferPool(), shared_memory=True)
    assert not loaded.stats.zero_copy and loaded.stats.reader_mode != "mmap" and not loaded._mappings
    assert_same_model(reference(hf), loaded.model)
    assert_shared_without_copy(loaded)


def test_the_dram_tier_is_read_into_shared_memory(models, dram_tier):
    hf, converted = models("llama_sharded")
    dram_tier.put(converted, "shm-model")
    copy = dram_tier.open("shm-model")
    loaded = load_model(copy, tier="dram", tokenizer=False, pool=HostBufferPool(), shared_memory=True)
    assert loaded.stats.tier == "dram" and loaded.stats.reader_mode == "buffered" and not loaded._mappings
    assert_same_model(reference(hf), loaded.model)
    assert_shared_without_copy(loaded)


def test_a_reserved_shared_arena_serves_the_load_prefaulted(models, expected_disk_mode):
    hf, converted = models("llama")
    evict_from_page_cache(converted)
    pool = HostBufferPool()
    pool.reserve_bytes(sum(p.stat().st_size for p in converted.glob("data-*.h5")), shared=True)
    loaded = load_model(converted, tier="disk", tokenizer=False, pool=pool, shared_memory=True)
    assert loaded.stats.pool_reused_bytes > 0 and loaded.stats.reader_mode == expected_disk_mode
    assert all(b.arena is not None for b in loaded._host_buffers)
    assert_same_model(reference(hf), loaded.model)
    assert_shared_without_copy(loaded)
    loaded.release()
    assert pool.stats().arena_free_bytes == pool.stats().arena_bytes


def test_discard_frees_the_shared_pages_of_dropped_weights(models):
    _, converted = models("llama")
    loaded = load_model(converted, tier="disk", tokenizer=False, pool=HostBufferPool(), shared_memory=True)
    weight = max(loaded.model.parameters(), key=lambda p: p.numel()).detach()
    nbytes = weight.numel() * weight.element_size()
    assert nbytes >= 2 * mmap.PAGESIZE and weight.abs().sum() > 0
    assert loaded.discard([(weight.data_ptr(), nbytes)]) > 0
    start = -(-weight.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE  # the whole pages inside the weight are gone
    inner = (start - weight.data_ptr()) // weight.element_size()
    assert float(weight.view(-1)[inner:inner + mmap.PAGESIZE // weight.element_size()].abs().sum()) == 0


def test_a_full_shm_filesystem_is_a_clear_error_not_a_crash(monkeypatch):
    """Past /dev/shm's size a write into the segment would kill the process (SIGBUS): refused up front, saying what
    to change; a spare's reservation then reserves nothing instead of failing."""
    import os

    from hpcllm.errors import HpcllmError

    real = os.statvfs(memory.SHM_DIR)
    small = os.statvfs_result((real.f_bsize, PAGE_SIZE, 10, 4, 4, 100, 50, 50, 0, 255))  # 4 free pages
    monkeypatch.setattr(memory.os, "statvfs", lambda path: small)
    assert SharedHostBuffer(4 * PAGE_SIZE).capacity == 4 * PAGE_SIZE
    with pytest.raises(memory.SharedMemoryFull, match="model_process = false") as refused:
        SharedHostBuffer(5 * PAGE_SIZE)
    assert isinstance(refused.value, HpcllmError) and "/dev/shm" in str(refused.value)
    pool = HostBufferPool()
    monkeypatch.setattr(memory, "_default_pool", pool)
    monkeypatch.setenv(memory.HOST_POOL_ENV, str(16 * PAGE_SIZE))
    assert memory.reserve_from_environment(shared=True) == 0 and pool.stats().arena_bytes == 0
