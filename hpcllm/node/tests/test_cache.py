"""CacheManager: verified atomic fills, crash safety, corruption refill, LRU eviction, refcounts across processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from hpcllm.checkpoint import read_checkpoint
from hpcllm.node.cache import (CacheCorrupt, CacheError, CacheInUse, CacheManager, FillInProgress, NotEnoughSpace,
                               UnknownModel, checkpoint_bytes)
from hpcllm.store.tests.tmpfs import mounted_tmpfs

CHUNK = 16 * 1024  # small chunks so a tiny model has many of them


@pytest.fixture(scope="module")
def origin(tiny_llama_dir, tmp_path_factory) -> Path:
    """A converted tiny llama on the "shared FS" (tests must not modify it)."""
    from hpcllm.checkpoint import convert

    out = tmp_path_factory.mktemp("origin") / "tiny-llama"
    convert(tiny_llama_dir, out, partitions=2, chunk_size=CHUNK, progress=False)
    return out


@pytest.fixture(scope="module")
def model_bytes(origin) -> int:
    return checkpoint_bytes(read_checkpoint(origin))


@pytest.fixture
def manager(tmp_path) -> CacheManager:
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    cm = CacheManager(tmp_path / "nvme", 10**9, 10**9, namespace, dram_root=tmp_path / "shm")
    yield cm


def _manager_like(cm: CacheManager, nvme_cap: int | None = None, dram_cap: int | None = None) -> CacheManager:
    return CacheManager(cm.nvme_dir, nvme_cap or cm.capacity["nvme"], dram_cap or cm.capacity["dram"],
                        cm.dram.namespace, dram_root=cm.dram.dir.parent)


def _copy_model(origin: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(origin, dest)
    return dest


def _visible(nvme_dir: Path) -> list[str]:
    return sorted(p.name for p in nvme_dir.iterdir() if not p.name.startswith(".hpcllm-cache.db"))


def test_warm_nvme_copies_verifies_and_lists(manager, origin, model_bytes):
    seen = []
    copy = manager.warm("llama", origin, "nvme", progress=lambda done, total: seen.append((done, total)))

    assert copy.path == manager.nvme_dir / "llama" and copy.tier == "nvme" and copy.verified
    read_checkpoint(copy.path).verify_files()
    for part in read_checkpoint(origin).partitions:
        assert (copy.path / part.file).read_bytes() == part.path.read_bytes()
    assert seen[-1] == (model_bytes, model_bytes) and len(seen) > 3
    assert [(c.model, c.tier, c.verified, c.source) for c in manager.list()] == [
        ("llama", "nvme", True, str(origin.resolve()))]
    assert manager.path_for_load("llama", origin) == (copy.path, "nvme")
    assert manager.path_for_load("other", origin / "x") == (origin / "x", "sharedfs")


def test_warm_dram_prefers_dram_copy(manager, origin):
    manager.warm("llama", origin, "nvme")
    dram = manager.warm("llama", origin, "dram")

    assert dram.tier == "dram" and dram.path.is_dir()
    read_checkpoint(dram.path).verify_files()
    assert manager.best_copy("llama").tier == "dram"
    assert {c.tier for c in manager.list()} == {"nvme", "dram"}
    manager.evict("llama")
    assert manager.list() == [] and not dram.path.exists()


def _next_job_manager(cm: CacheManager) -> CacheManager:
    """The manager of a job-scoped agent's next job on the node: a fresh NVMe folder (and state file), the same DRAM
    namespace."""
    return CacheManager(cm.nvme_dir.parent / "nvme-next-job", cm.capacity["nvme"], cm.capacity["dram"],
                        cm.dram.namespace, nvme_scope="job", dram_root=cm.dram.dir.parent)


def test_a_dram_copy_filled_from_the_nvme_copy_names_the_origin_as_its_source(manager, origin):
    """A DRAM copy keeps its origin when it was filled from the node's NVMe copy: the next job's agent, which learns
    of the copy from the copy itself, lists the origin as its source and refills it from there when it is found
    corrupt (it named the NVMe copy, gone with the job's scratch folder, and could not be refilled)."""
    import shutil

    manager.warm("llama", origin, "nvme")
    manager.warm("llama", origin, "dram")
    shutil.rmtree(manager.nvme_dir)  # the job's scratch goes with the job
    next_job = _next_job_manager(manager)

    [copy] = next_job.list()
    assert (copy.tier, copy.source) == ("dram", str(origin.resolve()))
    data_file = copy.path / "data-00001.h5"
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data_file.write_bytes(raw)
    [result] = next_job.verify()
    assert result.action == "refilled", result.message
    read_checkpoint(next_job.get("llama", "dram").path).verify_files()


def test_a_dram_copy_under_an_id_no_model_can_have_leaves_the_cache_working(manager, origin):
    """A copy put into the node's DRAM namespace by hand (`hpcllm store dram put --namespace`) under an id longer
    than a model name may be (DRAM ids: 200 characters, model names: 128) is no cache entry: every listing, warm and
    reservation of the node failed on its name ("model name 'xxx...' must ...")."""
    manager.warm("llama", origin, "nvme")
    manager.dram.ensure_private()
    manager.dram.put(origin, "x" * 150)

    assert [(c.model, c.tier) for c in manager.list()] == [("llama", "nvme")]
    assert manager.warm("llama", origin, "dram").tier == "dram"


def test_a_dram_warm_from_a_corrupt_nvme_copy_reads_the_origin_and_replaces_that_copy(manager, origin):
    """The DRAM tier is filled from the node's NVMe copy when it has one: a chunk of it that fails its checksum is
    that copy's fault, not the origin's; the warm failed (CacheCorrupt naming the NVMe copy) and left it there."""
    nvme = manager.warm("llama", origin, "nvme")
    data_file = nvme.path / "data-00001.h5"
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data_file.write_bytes(raw)

    dram = manager.warm("llama", origin, "dram")

    read_checkpoint(dram.path).verify_files()
    read_checkpoint(nvme.path).verify_files()  # refilled from the origin
    assert {(c.tier, c.verified) for c in manager.list()} == {("nvme", True), ("dram", True)}


def test_a_dram_warm_replaces_a_corrupt_nvme_copy_first_and_fills_from_the_new_copy(manager, origin):
    """The origin (on the shared FS) is read once: by the NVMe copy's refill, which the DRAM fill then reads; it was
    read twice (the DRAM fill from the origin, then the refill)."""
    nvme = manager.warm("llama", origin, "nvme")
    data_file = nvme.path / "data-00001.h5"
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data_file.write_bytes(raw)
    sources, put = [], manager.dram.put
    manager.dram.put = lambda source, *args, **kwargs: sources.append(Path(source)) or put(source, *args, **kwargs)

    dram = manager.warm("llama", origin, "dram")

    assert sources == [nvme.path, nvme.path]
    read_checkpoint(dram.path).verify_files()
    read_checkpoint(nvme.path).verify_files()


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_dram_warm_beside_a_broken_nvme_copy_fills_from_the_origin(manager, origin, damage):
    """A file of the NVMe copy cut short or gone: the DRAM fill does not take that copy (it failed with
    TruncatedFile / MissingFile, so warm --tier dram and the move to DRAM after a load failed); the copy goes."""
    nvme = manager.warm("llama", origin, "nvme")
    data_file = nvme.path / "data-00001.h5"
    if damage == "truncated":
        os.truncate(data_file, data_file.stat().st_size // 2)
    else:
        data_file.unlink()

    dram = manager.warm("llama", origin, "dram")

    read_checkpoint(dram.path).verify_files()
    assert [(c.tier, c.verified) for c in manager.list()] == [("dram", True)]


def test_interrupted_fill_leaves_nothing_visible(manager, origin):
    def crash(done, total):
        if done > total // 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        manager.warm("llama", origin, "nvme", progress=crash)

    assert _visible(manager.nvme_dir) == []
    assert manager.list() == [] and manager.usage_bytes("nvme") == 0


@contextlib.contextmanager
def fill_hanging_in_another_process(manager_args: str, model: str, origin, tmp_path):
    """`hpcllm cache warm` in another process (a CacheManager(manager_args)), stopped a third of the way into its NVMe
    fill until the block ends, then SIGKILLed."""
    started = tmp_path / "started"
    started.unlink(missing_ok=True)
    script = f"""
import time
from pathlib import Path
from hpcllm.node.cache import CacheManager
cm = CacheManager({manager_args})
def hang(done, total):
    if done > total // 3:
        Path({str(started)!r}).touch()
        time.sleep(60)
cm.warm({model!r}, {str(origin)!r}, "nvme", progress=hang)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None, "the filling process exited early"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_killed_fill_is_invisible_and_cleaned_on_start_and_on_list(manager, origin, tmp_path):
    args = (f"{str(manager.nvme_dir)!r}, 10**9, 10**9, {manager.dram.namespace!r}, "
            f"dram_root={str(tmp_path / 'shm')!r}")
    with fill_hanging_in_another_process(args, "llama", origin, tmp_path):
        leftovers = [p.name for p in manager.nvme_dir.iterdir() if ".filling-" in p.name]
        assert len(leftovers) == 1
        assert manager.list() == []  # a fill in progress is not a cache entry

    # A long-lived manager (the node agent) removes it the next time it lists the cache.
    assert [p for p in manager.nvme_dir.iterdir() if ".filling-" in p.name]
    assert manager.list() == [] and _visible(manager.nvme_dir) == []
    assert manager.usage_bytes("nvme") == 0  # the dead fill's reservation is gone too

    # Start-up removes such a folder too (a fill killed while no manager was running).
    with fill_hanging_in_another_process(args, "llama", origin, tmp_path):
        assert [p for p in manager.nvme_dir.iterdir() if ".filling-" in p.name]  # a new fill, killed on leaving
    fresh = _manager_like(manager)
    assert _visible(fresh.nvme_dir) == []
    assert fresh.list() == []
    assert fresh.warm("llama", origin, "nvme").verified


def test_a_killed_dram_fill_is_cleaned_on_list(manager, origin):
    """A SIGKILLed `hpcllm store dram put` into the agent's namespace leaves its temporary folder in /dev/shm, memory
    that a long-lived agent would otherwise keep until it restarts."""
    manager.warm("llama", origin, "dram")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = manager.dram.dir / f".tmp-other-{dead.pid}-0123abcd"
    leftover.mkdir()
    (leftover / "data-00000.h5").write_bytes(b"\0" * 4096)
    assert [(c.model, c.tier) for c in manager.list()] == [("llama", "dram")]
    assert sorted(p.name for p in manager.dram.dir.iterdir()) == ["llama"]


def test_flipped_byte_is_caught_by_verify_and_refilled(manager, origin):
    copy = manager.warm("llama", origin, "nvme")
    data_file = copy.path / "data-00001.h5"
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data_file.write_bytes(raw)

    results = manager.verify()

    assert [(r.model, r.tier, r.ok, r.action) for r in results] == [("llama", "nvme", False, "refilled")]
    assert "corrupt" in results[0].message
    read_checkpoint(copy.path).verify_files()  # the refilled copy is good again
    assert manager.verify("llama")[0].action == "ok"


def _break(copy_path: Path, damage: str) -> None:
    data_file = copy_path / "data-00001.h5"
    if damage == "truncated":
        os.truncate(data_file, data_file.stat().st_size // 2)
    elif damage == "file missing":
        data_file.unlink()
    else:
        (copy_path / "index.json").write_text("{}")


@pytest.mark.parametrize("tier", ["nvme", "dram"])
def test_a_copy_found_corrupt_while_in_use_is_never_loaded_again(manager, origin, tier):
    """A copy that failed a checksum (verify, or another instance's load) while an instance used it is kept for that
    instance only: once released, the next load reads the origin and the copy goes (it was chosen again: a disk
    copy whose files a load had verified before is not re-hashed, so its bad bytes became the model)."""
    copy = manager.warm("llama", origin, tier)
    with manager.using("llama", tier):
        assert manager.handle_corrupt("llama", tier, "a chunk failed its checksum").action == "kept-in-use"
        assert manager.path_for_load("llama", origin) == (origin, "sharedfs")
    assert manager.path_for_load("llama", origin) == (origin, "sharedfs")
    assert manager.list() == [] and not copy.path.exists()


@pytest.mark.parametrize("damage", ["found corrupt in use", "truncated", "file missing"])
def test_a_warm_refills_a_copy_that_is_corrupt_or_broken(manager, origin, damage):
    """`hpcllm cache warm` on a node whose copy failed a checksum while in use, or lost or cut a file, makes a good
    copy (it answered with the bad one, which the CLI reports as verified)."""
    copy = manager.warm("llama", origin, "nvme")
    if damage == "found corrupt in use":
        with manager.using("llama", "nvme"):
            manager.handle_corrupt("llama", "nvme", "a chunk failed its checksum")
    else:
        _break(copy.path, damage)

    again = manager.warm("llama", origin, "nvme")

    assert again.verified and again.path == copy.path
    read_checkpoint(again.path).verify_files()


@pytest.mark.parametrize("damage", ["truncated", "file missing", "index damaged"])
def test_a_broken_copy_is_not_loaded_and_is_dropped(manager, origin, damage):
    """A load of a broken copy fails with TruncatedFile/MissingFile, which the agent does not take for a corrupt copy
    to replace: every start of the model on the node would fail."""
    nvme = manager.warm("llama", origin, "nvme")
    dram = manager.warm("llama", origin, "dram")
    _break(dram.path, damage)
    assert manager.path_for_load("llama", origin) == (nvme.path, "nvme")
    assert [(c.model, c.tier) for c in manager.list()] == [("llama", "nvme")]
    _break(nvme.path, damage)
    assert manager.path_for_load("llama", origin) == (origin, "sharedfs")
    assert manager.list() == []


def test_a_broken_copy_in_use_is_kept_for_its_instance_but_not_loaded(manager, origin):
    copy = manager.warm("llama", origin, "nvme")
    with manager.using("llama", "nvme"):
        _break(copy.path, "truncated")
        assert manager.path_for_load("llama", origin) == (origin, "sharedfs")
        [kept] = manager.list()
        assert kept.path == copy.path and not kept.verified
    assert manager.path_for_load("llama", origin) == (origin, "sharedfs")
    assert manager.list() == []


def test_a_cache_whose_state_cannot_be_used_loads_from_the_origin(manager, origin):
    """The cache's disk failing (here its state file is garbage) must not stop the model's starts on the node."""
    manager.warm("llama", origin, "nvme")
    for state in manager.nvme_dir.glob(".hpcllm-cache.db*"):
        state.unlink()
    (manager.nvme_dir / ".hpcllm-cache.db").write_bytes(b"\xff" * 4096)
    assert manager.path_for_load("llama", origin) == (origin, "sharedfs")
    with pytest.raises(CacheError, match=r"\.hpcllm-cache\.db: file is not a database; .* \(node\.nvme_dir\)"):
        manager.list()


def test_a_copy_evicted_while_a_load_chooses_it_is_not_handed_out(manager, origin, monkeypatch):
    """A start chose a copy, an eviction removed it, then the start acquired it: UnknownModel (a 404) instead of a
    load from the next tier or the origin. hold=True acquires in the transaction that finds the copy."""
    nvme = manager.warm("llama", origin, "nvme")
    manager.warm("llama", origin, "dram")
    whole = manager._whole

    def evicted_after_the_check(model, tier, path):
        ok = whole(model, tier, path)
        if tier == "dram":
            _manager_like(manager).evict("llama", "dram")  # the agent's API, another thread or process
        return ok

    monkeypatch.setattr(manager, "_whole", evicted_after_the_check)
    assert manager.path_for_load("llama", origin, hold=True) == (nvme.path, "nvme")
    assert [(c.tier, c.in_use) for c in manager.list()] == [("nvme", 1)]
    with pytest.raises(CacheInUse):
        manager.evict("llama")
    manager.release("llama", "nvme")
    assert manager.path_for_load("llama", origin) == (nvme.path, "nvme")
    assert [(c.tier, c.in_use) for c in manager.list()] == [("nvme", 0)]  # no hold without hold=True


def test_choosing_where_to_load_reads_the_origins_manifest_once(manager, origin, monkeypatch):
    # On a start's path: the origin is on the shared FS, where each small read is a round trip. It was read twice
    # per cached tier (once to drop stale copies, once to choose).
    from hpcllm.node import cache as cache_module

    manager.warm("llama", origin, "nvme")
    manager.warm("llama", origin, "dram")
    reads, read = [], cache_module.content_id
    monkeypatch.setattr(cache_module, "content_id", lambda root: (reads.append(Path(root)), read(root))[1])
    assert manager.path_for_load("llama", origin)[1] == "dram"
    assert reads.count(Path(origin)) == 1


def test_corrupt_copy_whose_origin_is_gone_is_dropped(manager, origin, tmp_path):
    movable = _copy_model(origin, tmp_path / "movable")
    copy = manager.warm("llama", movable, "nvme")
    (copy.path / "index.json").write_text("{}")
    import shutil

    shutil.rmtree(movable)

    [result] = manager.verify()

    assert (result.ok, result.action) == (False, "dropped")
    assert "does not exist" in result.message
    assert manager.list() == [] and not copy.path.exists()


def test_lru_eviction_keeps_in_use_models(manager, origin, model_bytes):
    cm = _manager_like(manager, nvme_cap=int(model_bytes * 2.5))
    cm.warm("a", origin, "nvme")
    cm.warm("b", origin, "nvme")
    cm.acquire("a", "nvme")  # a is the least recently used, but in use
    time.sleep(0.01)
    cm.best_copy("b")

    cm.warm("c", origin, "nvme")

    assert sorted(c.model for c in cm.list()) == ["a", "c"]  # b (not in use) made room, a stayed
    with pytest.raises(CacheInUse, match="in use"):
        cm.evict("a")
    cm.release("a", "nvme")
    time.sleep(0.01)
    cm.best_copy("c")
    cm.warm("d", origin, "nvme")
    assert sorted(c.model for c in cm.list()) == ["c", "d"]


def test_two_warms_of_one_model_at_once_evict_no_other_copy(manager, origin, model_bytes, monkeypatch):
    import threading

    import hpcllm.node.cache as cache_module

    cm = _manager_like(manager, nvme_cap=int(model_bytes * 2.5))
    cm.warm("other", origin)
    # Each copy waits for a second one to start beside it: when nothing keeps the warms apart they meet there; when
    # they take turns the first waits alone until the barrier gives up, and the second finds its copy.
    both = threading.Barrier(2, timeout=3)
    copy = cache_module.copy_checkpoint
    met: list[bool] = []

    def copy_side_by_side(*args, **kwargs):
        try:
            both.wait()
            met.append(True)
        except threading.BrokenBarrierError:
            met.append(False)
        return copy(*args, **kwargs)

    monkeypatch.setattr(cache_module, "copy_checkpoint", copy_side_by_side)
    errors = []
    threads = [threading.Thread(target=lambda: _record_errors(errors, cm.warm, "m", origin)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert met == [False]  # one copy, never two side by side
    assert {(c.model, c.tier) for c in cm.list()} == {("other", "nvme"), ("m", "nvme")}


def test_an_evict_while_the_model_is_being_copied_in_is_refused(manager, origin):
    """The eviction found nothing to remove and answered so, then the copy appeared: the model was cached after all."""
    with warm_held_in_a_thread(manager, "llama", origin, after=0) as errors:
        for tier in ("nvme", None):
            with pytest.raises(FillInProgress, match="'llama' is being copied into the nvme tier .* then evict it"):
                manager.evict("llama", tier)
        assert manager.evict("llama", "dram") == []  # another tier than the copy's: nothing to wait for
    assert errors == [] and [c.tier for c in manager.list()] == ["nvme"]
    assert [c.tier for c in manager.evict("llama")] == ["nvme"] and manager.list() == []


@contextlib.contextmanager
def warm_held_in_a_thread(manager, model: str, origin, after: float):
    """A warm into the NVMe tier in a thread, held once more than `after` of its bytes are copied until the block
    ends; yields the list its errors go to."""
    import threading

    holding, go_on = threading.Event(), threading.Event()

    def hold(done: int, total: int) -> None:
        if done > total * after:
            holding.set()
            go_on.wait(timeout=60)

    errors = []
    warm = threading.Thread(target=lambda: _record_errors(errors, manager.warm, model, origin, "nvme", hold))
    warm.start()
    try:
        assert holding.wait(timeout=60)
        yield errors
    finally:
        go_on.set()
        warm.join()


def _record_errors(errors: list, call, *args) -> None:
    try:
        call(*args)
    except Exception as exc:  # noqa: BLE001 (the test reports it)
        errors.append(exc)


def test_not_enough_space_names_sizes_and_holders(manager, origin, model_bytes):
    cm = _manager_like(manager, nvme_cap=int(model_bytes * 1.5))
    cm.warm("a", origin, "nvme")
    cm.acquire("a", "nvme")

    with pytest.raises(NotEnoughSpace) as err:
        cm.warm("b", origin, "nvme")

    message = str(err.value)
    assert "'b' needs" in message and "capacity" in message and "in use" in message and ": a)" in message
    assert [c.model for c in cm.list()] == ["a"]
    assert _visible(cm.nvme_dir) == ["a"]

    tiny = _manager_like(manager, nvme_cap=model_bytes // 2)
    tiny.release("a", "nvme")
    with pytest.raises(NotEnoughSpace, match="capacity"):
        tiny.warm("b", origin, "nvme")


@pytest.fixture
def small_nvme(tmp_path, model_bytes):
    """An NVMe cache folder on a filesystem with room for 1.7 copies of the model (and the state file), a capacity
    setting far above it: only the free space on the disk limits the fills."""
    with mounted_tmpfs(tmp_path / "small", f"{int(model_bytes * 1.7) // 1024 + 256}k") as mount:
        yield CacheManager(mount / "nvme", 10**9, 10**9, f"test-{uuid.uuid4().hex[:8]}", dram_root=tmp_path / "shm")


def assert_second_fill_refused(cm: CacheManager, origin: Path) -> None:
    """A fill of another model while the first is a third written: the free space the filesystem shows holds a
    copy, but not once the first has written the rest, so the second is refused before it writes a byte."""
    with pytest.raises(NotEnoughSpace, match="once the fills in progress have written their last"):
        cm.warm("second", origin, "nvme")
    assert not [p for p in cm.nvme_dir.iterdir() if p.name.startswith(".second.")]


def test_two_fills_at_once_do_not_count_the_same_free_space_twice(small_nvme, origin):
    """Two warms side by side on one disk: each checked the free space without the other's bytes still to come, so
    one ran out of room (ENOSPC) midway."""
    with warm_held_in_a_thread(small_nvme, "first", origin, after=1 / 3) as errors:
        assert_second_fill_refused(small_nvme, origin)
    assert errors == []
    assert small_nvme.verify("first")[0].ok


def test_a_load_s_copy_holds_its_room_until_its_bytes_are_written(small_nvme, origin):
    """A cache-on-load copy a third written: the worker's tee sizes its files up front (sparse), so their sizes
    said the copy was written while the disk had not given its room yet, and a warm beside it ran out of room."""
    from hpcllm.store.tee import LoadTee

    fill = small_nvme.begin_load_fill("first", origin, ("nvme",))
    ckpt = read_checkpoint(origin)
    tee = LoadTee(ckpt, fill.staging)
    part = ckpt.partitions[0]
    tee.write(part.index, 0, part.path.read_bytes()[:part.size // 3])
    try:
        assert_second_fill_refused(small_nvme, origin)
    finally:
        tee.close()
        small_nvme.discard_load_fill(fill)


def test_a_fill_in_another_process_holds_its_room_until_it_ends_or_dies(small_nvme, origin, tmp_path):
    """`hpcllm cache warm` in another process: its unwritten bytes count against the free space here too, and once
    it is killed its reservation does not outlive it."""
    with fill_hanging_in_another_process(f"{str(small_nvme.nvme_dir)!r}, 10**9, 0, None", "first", origin, tmp_path):
        assert_second_fill_refused(small_nvme, origin)
    assert small_nvme.warm("second", origin, "nvme").verified  # the dead fill's folder and reservation are gone


def test_a_state_file_from_before_fill_folders_were_recorded_is_upgraded(tmp_path, origin):
    import sqlite3

    nvme = tmp_path / "nvme"
    nvme.mkdir(mode=0o700)
    with sqlite3.connect(nvme / ".hpcllm-cache.db") as db:
        db.execute("CREATE TABLE fills (id TEXT PRIMARY KEY, model TEXT NOT NULL, tier TEXT NOT NULL, "
                   "pid INTEGER NOT NULL, bytes INTEGER NOT NULL)")
    cm = CacheManager(nvme, 10**9, 10**9, f"test-{uuid.uuid4().hex[:8]}", dram_root=tmp_path / "shm")
    assert cm.warm("llama", origin, "nvme").verified


def test_unknown_origin_and_not_converted_are_clear_errors(manager, tmp_path, tiny_llama_dir):
    with pytest.raises(UnknownModel, match="does not exist"):
        manager.warm("ghost", tmp_path / "nowhere", "nvme")
    with pytest.raises(UnknownModel, match="hpcllm convert"):
        manager.warm("hf", tiny_llama_dir, "nvme")
    with pytest.raises(UnknownModel, match="not cached"):
        manager.verify("ghost")


def test_corrupt_origin_is_refused_without_a_partial_copy(manager, origin, tmp_path):
    bad = _copy_model(origin, tmp_path / "bad")
    raw = bytearray((bad / "data-00000.h5").read_bytes())
    raw[-10] ^= 0xFF
    (bad / "data-00000.h5").write_bytes(raw)

    with pytest.raises(CacheCorrupt, match="does not match"):
        manager.warm("bad", bad, "nvme")
    assert _visible(manager.nvme_dir) == []


def test_refcount_is_visible_across_processes(manager, origin, tmp_path):
    manager.warm("llama", origin, "nvme")
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    script = f"""
import time
from pathlib import Path
from hpcllm.node.cache import CacheManager
cm = CacheManager({str(manager.nvme_dir)!r}, 10**9, 10**9, {manager.dram.namespace!r}, dram_root={str(tmp_path / 'shm')!r})
cm.acquire("llama", "nvme")
Path({str(ready)!r}).touch()
while not Path({str(stop)!r}).exists():
    time.sleep(0.05)
cm.release("llama", "nvme")
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert manager.get("llama", "nvme").in_use == 1
        with pytest.raises(CacheInUse):
            manager.evict("llama")
        stop.touch()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert manager.get("llama", "nvme").in_use == 0
    assert [c.model for c in manager.evict("llama")] == ["llama"]


def test_references_of_dead_processes_are_dropped(manager, origin):
    manager.warm("llama", origin, "nvme")
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    manager.acquire("llama", "nvme", pid=dead_pid)

    assert manager.get("llama", "nvme").in_use == 0
    assert manager.evict("llama")


def test_copy_written_by_another_tool_is_picked_up(manager, origin):
    """The MPI warmer writes nvme_dir/<model>/ with the marker directly; the manager lists it."""
    from hpcllm.node.cache import copy_checkpoint, write_marker

    tmp = manager.nvme_dir / ".x.filling-1-00000000"
    tmp.mkdir()
    copy_checkpoint(read_checkpoint(origin), tmp)
    write_marker(tmp, "x", str(origin), 123, time.time())
    os.rename(tmp, manager.nvme_dir / "x")

    [copy] = manager.list()
    assert (copy.model, copy.tier, copy.verified, copy.source) == ("x", "nvme", True, str(origin))


def test_an_nvme_only_manager_leaves_the_agents_dram_entries_alone(manager, origin):
    """The MPI warmer opens the node's state file without the agent's DRAM namespace: the DRAM tier's LRU order
    (last use) and references must survive it."""
    manager.warm("a", origin, "dram")
    manager.warm("b", origin, "dram")
    time.sleep(0.01)
    manager.acquire("a", "dram")  # a: most recently used, and in use
    before = {c.model: c for c in manager.list()}

    warmer = CacheManager(manager.nvme_dir, 10**9, 0, dram_namespace=None)
    assert warmer.list() == [] and warmer.warm("c", origin, "nvme").verified
    with pytest.raises(Exception, match="only the nvme tier"):
        warmer.warm("d", origin, "dram")

    after = {c.model: c for c in manager.list() if c.tier == "dram"}
    assert {m: (c.last_used, c.in_use) for m, c in after.items()} == \
        {m: (c.last_used, c.in_use) for m, c in before.items()}
    assert after["a"].last_used > after["b"].last_used
    assert manager.get("c", "nvme").verified  # and the agent sees the warmer's NVMe copy


def test_a_folder_removed_while_a_cache_folder_is_counted_is_skipped(tmp_path, monkeypatch):
    """A fill's staging folder (or a copy) is removed while folder_bytes counts the folder holding it (a node's
    usage, a marker's bytes): Path.rglob raised FileNotFoundError for the folder gone before it was read; what went
    is now skipped and the rest counted."""
    import shutil

    from hpcllm.node.cache import folder_bytes

    (tmp_path / "manifest.json").write_bytes(b"m" * 100)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data-00000.h5").write_bytes(b"x" * 4096)
    real_stat = os.stat
    removed = []

    def stat_while_a_folder_is_removed(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        parent = Path(os.fspath(path)).parent
        subfolders = (tmp_path / "a", tmp_path / "b")
        if not removed and parent in subfolders:  # the first file in a subfolder: the other one goes meanwhile
            removed.extend(folder for folder in subfolders if folder != parent)
            shutil.rmtree(removed[0])
        return result

    monkeypatch.setattr(os, "stat", stat_while_a_folder_is_removed)
    assert folder_bytes(tmp_path) == 100 + 4096  # the manifest and the subfolder left
    assert removed and not removed[0].exists()
