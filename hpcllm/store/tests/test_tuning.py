"""Read settings from the node's probe: the sweep, the choice per tier and target, and loads that honour it."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from hpcllm.store.loader import load_model
from hpcllm.store.readers import cached_fraction
from hpcllm.store.tests.conftest import evict_from_page_cache, reference
from hpcllm.store.tests.test_loader import assert_same_model, assert_views_of
from hpcllm.store.tuning import (TUNING_ENV, ReadConfig, ReadTuning, TierTuning, choose_read_plan, sweep_read)

KiB, MiB = 1 << 10, 1 << 20
DEFAULTS = dict(reader="odirect", threads=2, block_bytes=16 * MiB)


def tuning_for(folder, tier="disk", device=None, **best) -> ReadTuning:
    """A tuning as the probe writes it, for `folder`'s filesystem: mode=(threads, block bytes, GB/s)."""
    device = os.stat(folder).st_dev if device is None else device
    configs = {mode: ReadConfig(mode, threads, block, gbps) for mode, (threads, block, gbps) in best.items()}
    return ReadTuning({tier: TierTuning(folder=str(folder), device=device, best=configs)})


# ------------------------------------------------------------------------------------------------- the choice


def test_host_load_on_disk_takes_the_fastest_mode_it_may_use(tmp_path):
    tuning = tuning_for(tmp_path, odirect=(8, 4 * MiB, 1.2), mmap=(4, MiB, 1.6), buffered=(16, MiB, 2.4))
    plan = choose_read_plan(tuning, "disk", host_target=True, checkpoint_device=os.stat(tmp_path).st_dev,
                            **DEFAULTS)
    # buffered and mapped measured faster, but a CPU model on the disk tier is read O_DIRECT into its own memory:
    # not copied out of the page cache, and not mapped (a 128 MiB probe over-promises a 2 GB mapped load)
    assert (plan.mode, plan.threads, plan.block_bytes) == ("odirect", 8, 4 * MiB)
    assert plan.source.startswith("probe: odirect 8x4 MiB 1.20 GB/s")
    only_mapped = tuning_for(tmp_path, mmap=(4, MiB, 1.6), buffered=(16, MiB, 2.4))  # O_DIRECT refused
    plan = choose_read_plan(only_mapped, "disk", host_target=True, checkpoint_device=os.stat(tmp_path).st_dev,
                            **DEFAULTS)
    assert (plan.mode, plan.threads, plan.block_bytes) == ("mmap", 4, MiB)


def test_staged_load_never_maps_and_takes_the_fastest_reader(tmp_path):
    tuning = tuning_for(tmp_path, odirect=(8, 4 * MiB, 1.2), mmap=(4, MiB, 1.6), buffered=(16, MiB, 2.4))
    plan = choose_read_plan(tuning, "disk", host_target=False, checkpoint_device=os.stat(tmp_path).st_dev,
                            **DEFAULTS)
    assert (plan.mode, plan.threads, plan.block_bytes) == ("buffered", 16, MiB)


def test_shared_fs_stays_buffered_whatever_else_was_measured(tmp_path):
    tuning = tuning_for(tmp_path, tier="sharedfs", buffered=(4, 4 * MiB, 0.5), mmap=(8, MiB, 3.0),
                        odirect=(8, MiB, 3.0))
    plan = choose_read_plan(tuning, "sharedfs", reader="buffered", threads=2, block_bytes=16 * MiB,
                            host_target=True, checkpoint_device=os.stat(tmp_path).st_dev)
    assert (plan.mode, plan.threads, plan.block_bytes) == ("buffered", 4, 4 * MiB)


@pytest.mark.parametrize("case, reason", [
    ("no tuning", "default: no read tuning (no probe on this node)"),
    ("other tier", "default: the probe did not measure the disk tier"),
    ("other filesystem", "default: the probe measured another filesystem"),
    ("no allowed mode", "default: the probe measured none of odirect, mmap"),
])
def test_without_a_usable_probe_the_tier_defaults_stay_and_say_why(tmp_path, case, reason):
    device = os.stat(tmp_path).st_dev
    tuning = {"no tuning": None,
              "other tier": tuning_for(tmp_path, tier="sharedfs", buffered=(4, MiB, 1.0)),
              "other filesystem": tuning_for(tmp_path, device=device + 1, odirect=(8, MiB, 1.0)),
              "no allowed mode": tuning_for(tmp_path, buffered=(8, MiB, 1.0))}[case]
    plan = choose_read_plan(tuning, "disk", host_target=True, checkpoint_device=device, **DEFAULTS)
    assert (plan.mode, plan.threads, plan.block_bytes) == ("odirect", 2, 16 * MiB)
    assert plan.source.startswith(reason)


def test_tuning_file_round_trips_and_a_broken_one_reads_as_none(tmp_path):
    tuning = tuning_for(tmp_path, odirect=(8, 4 * MiB, 1.25), mmap=(2, MiB, 1.5))
    path = tmp_path / "run" / "read-tuning.json"
    tuning.save(path)
    assert ReadTuning.load(path) == tuning
    assert [p.name for p in path.parent.iterdir()] == ["read-tuning.json"]  # no temporary file left
    path.write_text("{not json")
    assert ReadTuning.load(path) is None
    assert ReadTuning.load(tmp_path / "missing.json") is None


# -------------------------------------------------------------------------------------------------- the sweep


def test_sweep_measures_every_configuration_of_every_mode_from_a_cold_cache(disk_dir):
    path = disk_dir / "sweep-file"
    path.write_bytes(os.urandom(3 * MiB + 4 * KiB))  # not a multiple of the blocks: last requests are short
    try:
        results = sweep_read([path], threads=(1, 3), blocks=(256 * KiB, MiB))
        modes = {r.mode for r in results}
        assert {"buffered", "mmap"} <= modes
        for mode in modes:
            assert sorted((r.threads, r.block_bytes) for r in results if r.mode == mode) == \
                [(1, 256 * KiB), (1, MiB), (3, 256 * KiB), (3, MiB)]
        assert all(r.gbps > 0 for r in results)
        assert cached_fraction(path) < 0.5  # left cold, as a probe must leave the tier
    finally:
        path.unlink()


def test_probe_keeps_the_configuration_that_stays_fast_not_a_lucky_first_read(tmp_path, monkeypatch):
    """The node probe measures each mode's fastest configurations again and ranks them by their median: a
    configuration that was fastest once (a quiet moment of a shared disk) loses to one that is fast every time."""
    from hpcllm.store import tuning as tuning_module

    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * MiB)
    figures = {  # (mode, threads, block) -> GB/s of its successive reads
        ("odirect", 1, 4 * MiB): [3.0, 1.0, 1.1],  # the lucky one
        ("odirect", 16, 4 * MiB): [2.0, 2.1, 1.9],
        ("odirect", 4, MiB): [1.5, 1.4, 1.6],
        ("odirect", 2, MiB): [0.5],  # not among the three fastest: never measured again
        ("buffered", 8, MiB): [1.2, 5.0, 1.3],
    }
    reads: list[tuple] = []

    def measure(files, mode, threads, block, max_bytes, evict, gate, whole=None):
        key = (mode, threads, block)
        reads.append(key)
        return ReadConfig(mode, threads, block, figures[key][sum(k == key for k in reads)])  # [0]: the sweep

    monkeypatch.setattr(tuning_module, "_measure_config", measure)
    first = [ReadConfig(mode, threads, block, gbps[0]) for (mode, threads, block), gbps in figures.items()]
    best = tuning_module.confirmed_best([probe], first)
    assert best["odirect"] == ReadConfig("odirect", 16, 4 * MiB, 2.0)  # median of 2.0, 2.1, 1.9
    assert best["buffered"] == ReadConfig("buffered", 8, MiB, 1.3)  # its median, not its best read
    assert ("odirect", 2, MiB) not in reads and len(reads) == 2 * 4


def test_sweep_leaves_out_a_mode_the_filesystem_refuses(disk_dir, monkeypatch):
    path = disk_dir / "sweep-file-einval"
    path.write_bytes(os.urandom(MiB))
    real_open = os.open

    def no_direct(file, flags, *args, **kwargs):  # what tmpfs / some NFS mounts answer
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_direct)
    try:
        results = sweep_read([path], threads=(1, 2), blocks=(MiB,))
        assert {r.mode for r in results} == {"buffered", "mmap"}
    finally:
        path.unlink()


# --------------------------------------------------------------------------------------------- the loader obeys


class RecordingPreadv:
    """os.preadv that records each request's length and the thread that made it."""

    def __init__(self, monkeypatch, delay: float = 0.0):
        self.delay = delay  # seconds per request, as a disk takes: other reader threads get to claim units meanwhile
        self.real = os.preadv
        self.lengths: list[int] = []
        self.threads: set[str] = set()
        self.lock = threading.Lock()
        monkeypatch.setattr(os, "preadv", self)

    def __call__(self, fd, buffers, offset, *args):
        with self.lock:
            self.lengths.append(sum(len(b) for b in buffers))
            self.threads.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        return self.real(fd, buffers, offset, *args)


def test_load_reads_with_the_probes_threads_and_block_size(models, monkeypatch, expected_disk_mode):
    """A worker with its pool reserved (a spare) reads O_DIRECT into the reserved arena, even where the probe
    measured mapping faster."""
    hf, converted = models("llama")
    evict_from_page_cache(converted)
    tuning = tuning_for(converted, odirect=(3, 32 * KiB, 5.0), mmap=(2, 16 * KiB, 9.0))
    pool = _fresh_pool()
    pool.reserve_bytes(2 * _checkpoint_bytes(converted))
    calls = RecordingPreadv(monkeypatch, delay=0.002)  # reads into faulted memory: else one thread may do them all
    loaded = load_model(converted, tier="disk", tokenizer=False, read_tuning=tuning, pool=pool)
    assert_same_model(reference(hf), loaded.model)
    stats = loaded.stats
    assert (stats.reader_mode, stats.threads, stats.request_bytes) == (expected_disk_mode, 3, 32 * KiB)
    assert stats.read_plan.startswith("probe: odirect 3x32 KiB 5.00 GB/s")
    assert stats.read_plan.endswith("into the pre-faulted pool")
    assert stats.pool_reused_bytes >= stats.bytes  # no fresh page faulted during the load
    assert max(calls.lengths) == 32 * KiB and len(calls.lengths) > 10  # many requests, none larger than a block
    assert len({t for t in calls.threads if t.startswith("hpcllm-read-")}) >= 2


def test_host_load_into_fresh_memory_reads_odirect_even_when_mapping_measured_faster(models, monkeypatch,
                                                                                      expected_disk_mode):
    """Without a reserved pool a CPU load still reads O_DIRECT (into memory it faults in as it goes): a 128 MiB
    probe's mapped figure over-promises a model-sized mapped load (docs/loader.md)."""
    hf, converted = models("llama")
    evict_from_page_cache(converted)
    tuning = tuning_for(converted, odirect=(3, 32 * KiB, 1.0), mmap=(2, 16 * KiB, 9.0))
    calls = RecordingPreadv(monkeypatch, delay=0.002)
    loaded = load_model(converted, tier="disk", tokenizer=False, read_tuning=tuning, pool=_fresh_pool())
    assert_same_model(reference(hf), loaded.model)
    stats = loaded.stats
    assert (stats.reader_mode, stats.zero_copy, stats.threads) == (expected_disk_mode, False, 3)
    assert stats.read_plan.startswith("probe: odirect 3x32 KiB")
    assert not stats.read_plan.endswith("into the pre-faulted pool")
    assert max(calls.lengths) == 32 * KiB  # read into the model's own memory, a block per request


def test_plan_with_a_prefaulted_pool_reads_odirect_into_it_even_when_mapping_measured_faster(tmp_path):
    tuning = tuning_for(tmp_path, odirect=(8, 4 * MiB, 1.2), mmap=(4, MiB, 1.6))
    plan = choose_read_plan(tuning, "disk", host_target=True, checkpoint_device=os.stat(tmp_path).st_dev,
                            prefaulted=True, **DEFAULTS)
    assert (plan.mode, plan.threads, plan.block_bytes) == ("odirect", 8, 4 * MiB)
    assert plan.source == f"probe: odirect 8x4 MiB 1.20 GB/s ({tmp_path}) into the pre-faulted pool"
    only_mapped = tuning_for(tmp_path, mmap=(4, MiB, 1.6))  # no O_DIRECT figure: the pool cannot help
    plan = choose_read_plan(only_mapped, "disk", host_target=True, checkpoint_device=os.stat(tmp_path).st_dev,
                            prefaulted=True, **DEFAULTS)
    assert plan.mode == "mmap"


def test_plan_without_a_prefaulted_pool_reads_odirect(tmp_path):
    tuning = tuning_for(tmp_path, odirect=(8, 4 * MiB, 1.2))
    plan = choose_read_plan(tuning, "disk", host_target=True, checkpoint_device=os.stat(tmp_path).st_dev,
                            prefaulted=False, **DEFAULTS)
    assert (plan.mode, plan.threads, plan.block_bytes) == ("odirect", 8, 4 * MiB)
    assert not plan.source.endswith("into the pre-faulted pool")


def test_plan_with_a_prefaulted_pool_reads_buffered_into_it_where_the_page_cache_measured_faster(tmp_path):
    device = os.stat(tmp_path).st_dev
    tuning = tuning_for(tmp_path, odirect=(8, 4 * MiB, 1.2), buffered=(16, MiB, 2.0), mmap=(4, MiB, 3.0))
    plan = choose_read_plan(tuning, "disk", host_target=True, checkpoint_device=device, prefaulted=True, **DEFAULTS)
    assert (plan.mode, plan.threads, plan.block_bytes) == ("buffered", 16, MiB)
    assert plan.source == f"probe: buffered 16x1 MiB 2.00 GB/s ({tmp_path}) into the pre-faulted pool"
    # the same figures without a pool: buffered reads into fresh memory would fault it in (and copy): O_DIRECT
    assert choose_read_plan(tuning, "disk", host_target=True, checkpoint_device=device, prefaulted=False,
                            **DEFAULTS).mode == "odirect"
    # a filesystem that refuses O_DIRECT (the sweep left the mode out): the pool is still read into, buffered
    no_direct = tuning_for(tmp_path, buffered=(4, 4 * MiB, 0.8), mmap=(4, MiB, 3.0))
    plan = choose_read_plan(no_direct, "disk", host_target=True, checkpoint_device=device, prefaulted=True,
                            **DEFAULTS)
    assert (plan.mode, plan.threads) == ("buffered", 4) and plan.source.endswith("into the pre-faulted pool")


def test_buffered_load_into_the_reserved_pool(models, monkeypatch):
    """Where the probe measured the page cache faster into model-sized memory, a spare reads buffered (page cache ->
    its reserved arena): the weights are views of the arena, no fresh page is faulted in, the files end up in the
    page cache (an O_DIRECT load leaves them out), the model is from_pretrained's."""
    hf, converted = models("llama")
    evict_from_page_cache(converted)
    tuning = tuning_for(converted, odirect=(3, 32 * KiB, 1.0), buffered=(2, 64 * KiB, 5.0), mmap=(2, 16 * KiB, 9.0))
    pool = _fresh_pool()
    pool.reserve_bytes(2 * _checkpoint_bytes(converted))
    arena = pool._arena
    calls = RecordingPreadv(monkeypatch, delay=0.002)
    loaded = load_model(converted, tier="disk", tokenizer=False, read_tuning=tuning, pool=pool)
    assert_same_model(reference(hf), loaded.model)
    stats = loaded.stats
    assert (stats.reader_mode, stats.zero_copy, stats.threads, stats.request_bytes) == ("buffered", False, 2, 64 * KiB)
    assert stats.read_plan == f"probe: buffered 2x64 KiB 5.00 GB/s ({converted}) into the pre-faulted pool"
    assert stats.fallback_reason is None
    assert stats.pool_reused_bytes >= stats.bytes
    assert_views_of(loaded, [(arena.address, arena.address + arena.capacity)])
    assert max(calls.lengths) <= 64 * KiB and len(calls.lengths) > 5
    assert min(cached_fraction(p) for p in converted.glob("data-*")) > 0.9  # read through the page cache
    loaded.release()
    assert pool.stats().arena_free_bytes == arena.capacity  # every carved range went back


def test_shared_fs_load_reads_buffered_into_the_reserved_pool(models):
    """The shared FS is never mapped nor read O_DIRECT: with a reserved pool its buffered reads land in the arena."""
    hf, converted = models("gpt2")
    pool = _fresh_pool()
    pool.reserve_bytes(_checkpoint_bytes(converted))
    arena = pool._arena
    loaded = load_model(converted, tier="sharedfs", tokenizer=False, pool=pool)
    assert_same_model(reference(hf), loaded.model)
    assert loaded.stats.reader_mode == "buffered" and loaded.stats.pool_reused_bytes >= loaded.stats.bytes
    assert_views_of(loaded, [(arena.address, arena.address + arena.capacity)])


def test_probe_reads_each_block_to_its_own_place_in_one_buffer(disk_dir):
    """The node probe's destination (into_one_buffer): one model-sized buffer, every block where a load into the
    pool puts it - after the read the buffer holds the file's bytes in order."""
    from hpcllm.store.memory import HostBuffer
    from hpcllm.store.tuning import _timed_read

    path = disk_dir / f"probe-order-{os.getpid()}"
    data = os.urandom(5 * MiB + 3 * KiB)  # not a multiple of the block: the last block is short
    path.write_bytes(data)
    try:
        for mode in ("buffered", "odirect"):
            whole = HostBuffer(8 * MiB, huge_pages=True)
            whole.populate()
            try:
                _timed_read([path], mode, 3, MiB, None, whole)
            except Exception as exc:  # O_DIRECT refused where the tests' folder is on tmpfs
                assert mode == "odirect", exc
                continue
            assert bytes(whole.view()[:len(data)]) == data
        results = sweep_read([path], modes=("buffered",), threads=(2,), blocks=(MiB,), into_one_buffer=True)
        assert [(r.mode, r.threads, r.block_bytes) for r in results] == [("buffered", 2, MiB)]
    finally:
        path.unlink()


def _checkpoint_bytes(folder) -> int:
    from hpcllm.checkpoint import read_checkpoint

    return read_checkpoint(folder).total_bytes


def test_mmap_plan_maps_cold_files_and_faults_them_in_during_the_load(models):
    hf, converted = models("qwen2")
    evict_from_page_cache(converted)
    tuning = tuning_for(converted, mmap=(4, 32 * KiB, 2.0))  # a disk that refused O_DIRECT to the probe
    loaded = load_model(converted, tier="disk", tokenizer=False, read_tuning=tuning, verify=True)
    stats = loaded.stats
    assert (stats.reader_mode, stats.zero_copy, stats.threads, stats.request_bytes) == ("mmap", True, 4, 32 * KiB)
    assert stats.verified  # every chunk hashed from the mapping
    data_files = sorted(converted.glob("data-*.h5"))
    assert all(cached_fraction(f) == 1.0 for f in data_files)  # read while loading, not on first use
    mapped = _mapped_ranges(data_files)
    assert_views_of(loaded, mapped)
    assert_same_model(reference(hf), loaded.model)


def test_mmap_plan_still_catches_a_corrupt_chunk(copy_checkpoint):
    from hpcllm.checkpoint import ChecksumMismatch

    damaged = copy_checkpoint("llama")
    data = sorted(damaged.glob("data-*.h5"))[0]
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    evict_from_page_cache(damaged)
    tuning = tuning_for(damaged, mmap=(3, 16 * KiB, 2.0))
    with pytest.raises(ChecksumMismatch, match="data-"):
        load_model(damaged, tier="disk", tokenizer=False, read_tuning=tuning, verify=True)


def test_env_points_a_worker_at_the_agents_tuning_file(models, monkeypatch, tmp_path, expected_disk_mode):
    _, converted = models("llama")
    evict_from_page_cache(converted)
    path = tmp_path / "read-tuning.json"
    tuning_for(converted, odirect=(5, 64 * KiB, 1.0)).save(path)
    monkeypatch.setenv(TUNING_ENV, str(path))
    stats = load_model(converted, tier="disk", tokenizer=False, pool=_fresh_pool()).stats
    assert (stats.threads, stats.request_bytes) == (5, 64 * KiB) and stats.read_plan.startswith("probe:")
    monkeypatch.setenv(TUNING_ENV, str(tmp_path / "gone.json"))
    evict_from_page_cache(converted)
    stats = load_model(converted, tier="disk", tokenizer=False, pool=_fresh_pool()).stats
    assert (stats.threads, stats.request_bytes) == (2, 16 * MiB)
    assert stats.read_plan == f"default: no read tuning at {tmp_path / 'gone.json'}"


def test_explicit_arguments_win_over_the_probe(models):
    _, converted = models("llama")
    evict_from_page_cache(converted)
    tuning = tuning_for(converted, odirect=(7, 64 * KiB, 1.0), mmap=(7, 64 * KiB, 9.0))
    stats = load_model(converted, tier="disk", tokenizer=False, read_tuning=tuning, threads=1,
                       unit_bytes=48 * KiB, pool=_fresh_pool()).stats
    assert (stats.threads, stats.request_bytes, stats.zero_copy) == (1, 48 * KiB, False)
    assert stats.read_plan.startswith("arguments")


def _fresh_pool():
    from hpcllm.store.memory import HostBufferPool

    return HostBufferPool()


def _mapped_ranges(files) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of `files` (from /proc/self/maps)."""
    names = {str(f.resolve()) for f in files}
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] in names:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    return ranges
