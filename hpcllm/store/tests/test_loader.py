"""load_model gives exactly what from_pretrained gives, from every tier, with tensors as views of the load buffers."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import hpcllm
from hpcllm.store.loader import LoadedModel, load_model
from hpcllm.store.memory import HostBufferPool
from hpcllm.store.tests.conftest import ARCHS, cache_in_page_cache, evict_from_page_cache, reference

PROMPT = torch.tensor([[1, 5, 9, 33, 7, 100, 250, 3]])


def assert_same_model(ref, model) -> None:
    ref_state, state = ref.state_dict(), model.state_dict()
    assert ref_state.keys() == state.keys()
    for name in ref_state:
        assert state[name].dtype == ref_state[name].dtype, name
        assert torch.equal(state[name], ref_state[name]), name
    ref_buffers = dict(ref.named_buffers())
    buffers = dict(model.named_buffers())
    assert ref_buffers.keys() == buffers.keys()
    for name, buffer in buffers.items():  # non-persistent ones (rotary inv_freq) are not in the checkpoint
        assert buffer.device.type != "meta", name
        assert buffer.dtype == ref_buffers[name].dtype, name
        assert torch.equal(buffer, ref_buffers[name]), name
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, ref(PROMPT).logits)


def tied_pairs(model) -> list[tuple[str, str]]:
    return [(target, source) for target, source in getattr(model, "all_tied_weights_keys", {}).items()]


def assert_views_of(loaded: LoadedModel, ranges: list[tuple[int, int]]) -> None:
    """Every parameter's memory lies inside one of the given [start, end) address ranges (no private copy)."""
    for name, param in loaded.model.named_parameters():
        start = param.data_ptr()
        end = start + param.numel() * param.element_size()
        assert any(lo <= start and end <= hi for lo, hi in ranges), f"{name} is not a view of the load buffers"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tier", ["disk", "sharedfs"])
def test_file_tiers_match_from_pretrained(models, arch, tier, expected_disk_mode):
    hf, converted = models(arch)
    evict_from_page_cache(converted)  # a cold file: the disk tier reads it with O_DIRECT
    loaded = load_model(converted, tier=tier, tokenizer=False, unit_bytes=48 << 10)
    assert_same_model(reference(hf), loaded.model)
    for target, source in tied_pairs(loaded.model):
        assert loaded.model.get_parameter(target) is loaded.model.get_parameter(source)
    stats = loaded.stats
    assert stats.tier == tier and (stats.verified or stats.verified_earlier) and not stats.zero_copy
    assert stats.reader_mode == (expected_disk_mode if tier == "disk" else "buffered")
    assert stats.bytes == loaded.checkpoint.total_bytes and stats.gbps > 0
    ranges = [(b.address, b.address + b.capacity) for b in loaded._host_buffers]
    assert len(ranges) == len(loaded.checkpoint.partitions)
    assert_views_of(loaded, ranges)


@pytest.mark.parametrize("verify", [True, False])
def test_disk_tier_maps_a_file_the_page_cache_holds(models, verify):
    hf, converted = models("gpt2")
    cache_in_page_cache(converted)
    loaded = load_model(converted, tier="disk", tokenizer=False, verify=verify)
    stats = loaded.stats
    assert stats.reader_mode == "mmap" and stats.zero_copy and "page cache" in stats.fallback_reason
    assert stats.verified == (verify and not stats.verified_earlier)
    assert_same_model(reference(hf), loaded.model)
    assert_views_of(loaded, file_mappings(converted))


def test_cached_file_for_a_staged_target_is_read_buffered(models):
    hf, converted = models("gpt2")
    cache_in_page_cache(converted)
    loaded = load_model(converted, tier="disk", tokenizer=False, staged=True)
    assert loaded.stats.reader_mode == "buffered" and "page cache" in loaded.stats.fallback_reason
    assert_same_model(reference(hf), loaded.model)


def file_mappings(folder) -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith(str(folder) + "/data-"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def test_disk_tier_verifies_each_file_version_once(copy_checkpoint, models):
    hf, _ = models("opt")
    folder = copy_checkpoint("opt")
    first = load_model(folder, tier="disk", tokenizer=False)
    assert first.stats.verified and not first.stats.verified_earlier
    second = load_model(folder, tier="disk", tokenizer=False)
    assert not second.stats.verified and second.stats.verified_earlier
    assert_same_model(reference(hf), second.model)
    assert load_model(folder, tier="disk", tokenizer=False, verify=True).stats.verified  # explicit: always
    assert load_model(folder, tier="sharedfs", tokenizer=False).stats.verified  # only node-local disk trusts it
    data = folder / "data-00001.h5"
    os.utime(data)  # any change to a file brings verification back
    assert load_model(folder, tier="disk", tokenizer=False).stats.verified


def test_tied_weights_are_one_parameter(models):
    hf, converted = models("gpt2")
    model = load_model(converted, tokenizer=False).model
    assert model.lm_head.weight is model.transformer.wte.weight
    ref = reference(hf)
    assert ref.lm_head.weight is ref.transformer.wte.weight


def test_returns_tokenizer_and_unpacks(models):
    hf, converted = models("llama")
    model, tokenizer, stats = hpcllm.load_model(converted)
    from transformers import AutoTokenizer

    ref_tok = AutoTokenizer.from_pretrained(hf)
    text = "the quick brown fox on the cluster"
    assert tokenizer(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert "tokenizer" in stats.phases and stats.seconds > 0
    assert model.generation_config.eos_token_id == 2


def test_staged_path_streams_model_larger_than_staging(models):
    """The GPU path's machinery (ring, placement, copy engine) on host memory: 2 slots of one chunk each."""
    hf, converted = models("llama_sharded")
    loaded = load_model(converted, staged=True, unit_bytes=16 << 10, staging_slots=2, tokenizer=False)
    assert_same_model(reference(hf), loaded.model)
    staging = loaded.stats.staging
    assert staging["slots"] == 2 and staging["slot_bytes"] == 16 << 10
    assert staging["submitted"] == sum(p.num_chunks for p in loaded.checkpoint.partitions)
    assert staging["slots"] * staging["slot_bytes"] < loaded.stats.bytes / 4
    pipe = loaded.stats.pipeline  # where the read phase went: every unit read, verified and handed to the ring
    assert pipe["units"] == staging["submitted"] and pipe["bytes"] == loaded.stats.bytes
    assert pipe["io_thread_seconds"] > 0 and pipe["commit_seconds"] > 0
    assert (pipe["verify_seconds"] > 0) == loaded.stats.verified
    assert pipe["threads"] >= 1 and pipe["read_seconds"] <= loaded.stats.seconds


def test_a_staged_load_whose_slot_allocation_fails_goes_on_with_fewer_slots(models, monkeypatch, caplog):
    """Staging slots after the first are allocated while the readers run; a failure (no more pinned memory) only
    costs parallelism, and the log says so."""
    from hpcllm.store import loader as loader_module

    real_slot = loader_module.host_slot

    def failing_after_two(index, size):
        if index >= 2:
            raise RuntimeError("out of pinned memory")
        return real_slot(index, size)

    monkeypatch.setattr(loader_module, "host_slot", failing_after_two)
    hf, converted = models("llama_sharded")
    with caplog.at_level("WARNING", logger="hpcllm.store.loader"):
        loaded = load_model(converted, staged=True, unit_bytes=16 << 10, staging_slots=6, tokenizer=False)
    assert_same_model(reference(hf), loaded.model)
    assert loaded.stats.staging["slots"] == 2
    assert "through 2 of 6 staging slots" in caplog.text and "out of pinned memory" in caplog.text


def test_a_load_without_reads_has_no_pipeline_stats(models):
    _, converted = models("llama")
    for data in Path(converted).glob("*.h5"):
        data.read_bytes()  # into the page cache: the load maps the files instead of reading them
    stats = load_model(converted, tier="disk", tokenizer=False).stats
    assert stats.zero_copy and stats.pipeline is None


def test_device_map_places_modules(models):
    hf, converted = models("llama")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "": torch.device("cpu")}
    loaded = load_model(converted, device=device_map, staged=True, tokenizer=False)
    assert_same_model(reference(hf), loaded.model)
    assert loaded.stats.devices == ["cpu"]


def test_device_map_must_cover_every_tensor(models):
    _, converted = models("llama")
    with pytest.raises(hpcllm.store.loader.DeviceSpecError, match="does not place"):
        load_model(converted, device={"model.embed_tokens": "cpu"}, tokenizer=False)


def test_unknown_device_is_a_clear_error(models):
    _, converted = models("llama")
    with pytest.raises(hpcllm.store.loader.DeviceSpecError, match="not a device"):
        load_model(converted, device="gpu7", tokenizer=False)


def test_dtype_override_matches_from_pretrained(models):
    hf, converted = models("llama")
    loaded = load_model(converted, dtype=torch.float32, tokenizer=False)
    assert_same_model(reference(hf, dtype=torch.float32), loaded.model)


def test_release_recycles_prefaulted_buffers(models):
    _, converted = models("qwen2")
    pool = HostBufferPool()
    first = load_model(converted, tier="sharedfs", pool=pool, tokenizer=False)
    assert first.stats.pool_reused_bytes == 0
    addresses = {b.address for b in first._host_buffers}
    first.release()
    assert pool.stats().free_buffers == len(addresses)
    second = load_model(converted, tier="sharedfs", pool=pool, tokenizer=False)
    assert {b.address for b in second._host_buffers} == addresses
    assert second.stats.pool_reused_bytes >= second.stats.bytes
    hf, _ = models("qwen2")
    assert_same_model(reference(hf), second.model)


def test_odirect_refused_at_open_falls_back_and_says_so(models, monkeypatch):
    hf, converted = models("opt")
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    evict_from_page_cache(converted)
    monkeypatch.setattr(os, "open", refusing_open)
    loaded = load_model(converted, tier="disk", tokenizer=False)
    assert loaded.stats.reader_mode == "buffered"
    assert "O_DIRECT" in loaded.stats.fallback_reason
    assert_same_model(reference(hf), loaded.model)


def test_odirect_refused_at_read_falls_back(models, monkeypatch, expected_disk_mode):
    if expected_disk_mode != "odirect":
        pytest.skip("this filesystem refuses O_DIRECT already at open")
    hf, converted = models("llama")
    real_preadv = os.preadv
    direct_fds = set()
    real_open = os.open

    def tracking_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        else:
            direct_fds.discard(fd)  # the number of a closed O_DIRECT fd may be reused
        return fd

    def refusing_preadv(fd, buffers, offset, *args):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *args)

    evict_from_page_cache(converted)
    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "preadv", refusing_preadv)
    loaded = load_model(converted, tier="disk", tokenizer=False)
    assert loaded.stats.reader_mode == "buffered" and "O_DIRECT reads" in loaded.stats.fallback_reason
    assert_same_model(reference(hf), loaded.model)


def test_a_reader_thread_racing_the_o_direct_fallback_still_reads_the_file(models, monkeypatch):
    """Two reader threads meet a filesystem that opens O_DIRECT but refuses its reads: one switches the reader to a
    buffered descriptor while the other is about to read through the O_DIRECT one. That descriptor stays open (the
    other read retries on the new one), instead of being closed under it: EBADF failed the load, and a number
    reused by another open meanwhile read another file. Such a filesystem is faked (the O_DIRECT open too, so
    the test runs where O_DIRECT is refused at open)."""
    import mmap
    import threading

    from hpcllm.checkpoint import read_checkpoint
    from hpcllm.store.readers import ODIRECT, FileReader

    _, converted = models("llama")
    part = read_checkpoint(converted).partitions[0]
    real_open, real_preadv = os.open, os.preadv
    direct_fds: set[int] = set()
    second_waits, switched = threading.Event(), threading.Event()

    def opening_o_direct(path, flags, *args, **kwargs):  # opened buffered, but taken for O_DIRECT by its reads
        fd = real_open(path, flags & ~os.O_DIRECT, *args, **kwargs)
        (direct_fds.add if flags & os.O_DIRECT else direct_fds.discard)(fd)
        return fd

    def refusing_preadv(fd, buffers, offset, *args):
        if fd in direct_fds:
            if threading.current_thread().name == "second":  # took the O_DIRECT fd, not in the read call yet
                second_waits.set()
                switched.wait(timeout=60)
                os.fstat(fd)  # the read call itself: EBADF once the descriptor was closed under it
            else:
                second_waits.wait(timeout=60)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "open", opening_o_direct)
    monkeypatch.setattr(os, "preadv", refusing_preadv)
    reader = FileReader(part.path, ODIRECT, expected_size=part.size, use_page_cache=False)
    assert reader.mode == ODIRECT
    half = part.size // 2 // 4096 * 4096
    results, errors = {}, []

    def read(name: str, offset: int, length: int) -> None:
        buffer = memoryview(mmap.mmap(-1, length + 8192))
        try:
            reader.read_into(offset, buffer[:length + 4096], length)
            results[name] = bytes(buffer[:length])
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)
        finally:
            if name == "first":
                switched.set()

    threads = [threading.Thread(target=read, args=("first", 0, half), name="first"),
               threading.Thread(target=read, args=("second", half, 4096), name="second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reader.close()

    data = part.path.read_bytes()
    assert errors == [] and reader.mode == "buffered"
    assert results == {"first": data[:half], "second": data[half:half + 4096]}


def test_a_failed_buffered_reopen_closes_the_o_direct_descriptor_once(models, monkeypatch, tmp_path):
    """The O_DIRECT reads are refused and the buffered reopen fails too (the file was deleted meanwhile): the read
    says the file is missing, and closing the reader closes its descriptor once. Closing it twice closed whatever
    another thread had opened with that number in between (its reads then failed, or read another file). Such a
    filesystem is faked as in the test above."""
    import mmap
    import shutil

    from hpcllm.checkpoint import MissingFile, read_checkpoint
    from hpcllm.store.readers import ODIRECT, FileReader

    _, converted = models("llama")
    copy = shutil.copytree(converted, tmp_path / "copy")
    part = read_checkpoint(copy).partitions[0]
    real_open, real_preadv, real_close = os.open, os.preadv, os.close
    direct_fds: set[int] = set()
    closed: list[int] = []

    def opening_o_direct(path, flags, *args, **kwargs):
        fd = real_open(path, flags & ~os.O_DIRECT, *args, **kwargs)
        (direct_fds.add if flags & os.O_DIRECT else direct_fds.discard)(fd)
        return fd

    def refusing_preadv(fd, buffers, offset, *args):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *args)

    def recording_close(fd):
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(os, "open", opening_o_direct)
    monkeypatch.setattr(os, "preadv", refusing_preadv)
    monkeypatch.setattr(os, "close", recording_close)
    reader = FileReader(part.path, ODIRECT, expected_size=part.size, use_page_cache=False)
    assert reader.mode == ODIRECT
    part.path.unlink()
    with pytest.raises(MissingFile, match="missing"):
        reader.read_into(0, memoryview(mmap.mmap(-1, 8192)), 4096)
    reader.close()
    assert len(closed) == 1 and closed[0] in direct_fds
