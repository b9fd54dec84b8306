"""Cache on load: a load from the shared FS leaves verified DRAM and NVMe copies (CacheManager.begin_load_fill ->
the loader's tee -> commit_load_fill), within the tiers' budgets, never visible half-written, never evicting a copy
in use, and the next load reads the fast tier without touching the origin."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

import hpcllm
from hpcllm.checkpoint import ChecksumMismatch, read_checkpoint
from hpcllm.node.cache import CacheCorrupt, CacheError, CacheManager, FillInProgress, checkpoint_bytes
from hpcllm.store import readers

CHUNK = 16 * 1024


@pytest.fixture(scope="module")
def converted(tiny_llama_dir, tmp_path_factory) -> Path:
    from hpcllm.checkpoint import convert

    out = tmp_path_factory.mktemp("converted") / "tiny-llama"
    convert(tiny_llama_dir, out, partitions=2, chunk_size=CHUNK, progress=False)
    return out


@pytest.fixture
def origin(converted, tmp_path) -> Path:
    """A private copy on the "shared FS": tests may delete or corrupt it."""
    return Path(shutil.copytree(converted, tmp_path / "shared" / "tiny-llama"))


@pytest.fixture(scope="module")
def model_bytes(converted) -> int:
    return checkpoint_bytes(read_checkpoint(converted))


def make_manager(tmp_path: Path, nvme: int = 10**9, dram: int = 10**9) -> CacheManager:
    return CacheManager(tmp_path / "nvme", nvme, dram, f"col-{uuid.uuid4().hex[:8]}", dram_root=tmp_path / "shm")


@pytest.fixture
def origin_reads(monkeypatch, origin):
    """Bytes read from the origin's data files by the loader's readers, per file name."""
    counts: dict[str, int] = {}
    real = readers.FileReader.read_into

    def counting(self, offset, view, nbytes, **kwargs):
        if Path(self.path).parent == origin:
            counts[Path(self.path).name] = counts.get(Path(self.path).name, 0) + nbytes
        return real(self, offset, view, nbytes, **kwargs)

    monkeypatch.setattr(readers.FileReader, "read_into", counting)
    return counts


def remove_origin_data(origin: Path) -> None:
    for part in read_checkpoint(origin).partitions:
        part.path.unlink()


def staging_folders(cm: CacheManager) -> list[str]:
    return [p.name for p in cm.nvme_dir.iterdir() if ".filling-" in p.name]


def test_load_from_shared_fs_leaves_verified_dram_and_nvme_copies(tmp_path, origin, origin_reads, model_bytes):
    cm = make_manager(tmp_path)
    fill = cm.begin_load_fill("llama", origin, ("dram", "nvme"))
    assert fill is not None and fill.tiers == ("dram", "nvme")
    assert cm.usage_bytes("nvme") == model_bytes and cm.usage_bytes("dram") == model_bytes  # reserved meanwhile

    loaded = hpcllm.load_model(origin, tier="sharedfs", tee_into=fill.staging, tokenizer=False)
    assert loaded.wait_for_tee(30)  # a CPU load writes its copy from the model's buffers once it is ready
    ckpt = read_checkpoint(origin)
    assert origin_reads == {p.file: p.size for p in ckpt.partitions if p.size}  # every byte read exactly once
    assert cm.list() == []  # nothing visible before the commit
    remove_origin_data(origin)  # the commit must not read the origin again
    copies = cm.commit_load_fill(fill)

    assert sorted((c.tier, c.verified, c.source) for c in copies) == [
        ("dram", True, str(origin.resolve())), ("nvme", True, str(origin.resolve()))]
    for tier in ("dram", "nvme"):
        copy = cm.get("llama", tier)
        read_checkpoint(copy.path).verify_files()
    assert staging_folders(cm) == [] and cm.usage_bytes("nvme") == cm.get("llama", "nvme").bytes
    loaded.release()

    # The second start on this node: the DRAM copy, no origin read (its data files are gone anyway).
    origin_reads.clear()
    path, tier = cm.path_for_load("llama", origin)
    assert tier == "dram"
    again = hpcllm.load_model(path, tier=tier, tokenizer=False)  # (the test's DRAM root is not a tmpfs)
    assert again.stats.tier == "dram" and origin_reads == {}
    again.release()


def test_a_dram_copy_kept_on_load_names_the_origin_as_its_source(tmp_path, origin):
    """The DRAM copy a load kept is filled from the load's staging folder, which goes right after: a manager that
    learns of the copy from the copy itself (a job-scoped agent's next job: a fresh NVMe folder and state file, the
    same DRAM namespace) names the origin as its source (it named the staging folder, which no longer exists)."""
    cm = make_manager(tmp_path)
    fill = cm.begin_load_fill("llama", origin, ("dram",))
    loaded = hpcllm.load_model(origin, tier="sharedfs", tee_into=fill.staging, tokenizer=False)
    assert loaded.wait_for_tee(30)
    cm.commit_load_fill(fill)
    loaded.release()

    next_job = CacheManager(tmp_path / "nvme-next-job", 10**9, 10**9, cm.dram.namespace, nvme_scope="job",
                            dram_root=cm.dram.dir.parent)
    assert [(c.tier, c.source) for c in next_job.list()] == [("dram", str(origin.resolve()))]


def test_a_load_through_the_staging_ring_is_kept_too(tmp_path, origin):
    # The GPU path's machinery on CPU: the tee takes each unit from its staging slot before the slot is reused.
    cm = make_manager(tmp_path)
    fill = cm.begin_load_fill("llama", origin, ("nvme",))
    loaded = hpcllm.load_model(origin, tier="sharedfs", staged=True, staging_slots=2, unit_bytes=CHUNK,
                               tee_into=fill.staging, tokenizer=False)
    assert loaded.stats.staging["submitted"] > 2  # the slots were reused
    cm.commit_load_fill(fill)
    copy = cm.get("llama", "nvme")
    read_checkpoint(copy.path).verify_files()
    for part in read_checkpoint(origin).partitions:
        assert (copy.path / part.file).read_bytes() == part.path.read_bytes()
    loaded.release()


def test_cpu_load_from_the_page_cache_is_kept_too(tmp_path, origin):
    # A disk-tier load whose files are in the page cache maps them (no pipeline): the tee writes the mappings.
    cm = make_manager(tmp_path)
    for part in read_checkpoint(origin).partitions:
        part.path.read_bytes()
    fill = cm.begin_load_fill("llama", origin, ("nvme",))
    loaded = hpcllm.load_model(origin, tier="disk", tee_into=fill.staging, tokenizer=False)
    assert loaded.stats.zero_copy and loaded.wait_for_tee(30)
    cm.commit_load_fill(fill)
    read_checkpoint(cm.get("llama", "nvme").path).verify_files()
    loaded.release()


def test_budget_too_small_keeps_nothing_and_the_load_succeeds(tmp_path, origin, model_bytes):
    cm = make_manager(tmp_path, nvme=model_bytes - 1, dram=model_bytes - 1)
    assert cm.begin_load_fill("llama", origin, ("dram", "nvme")) is None
    loaded = hpcllm.load_model(origin, tier="sharedfs", tokenizer=False)
    assert loaded.stats.bytes > 0 and cm.list() == [] and staging_folders(cm) == []
    loaded.release()

    # Only the tier with room is filled.
    cm = make_manager(tmp_path / "b", nvme=10**9, dram=model_bytes - 1)
    fill = cm.begin_load_fill("llama", origin, ("dram", "nvme"))
    assert fill.tiers == ("nvme",)
    hpcllm.load_model(origin, tier="sharedfs", tee_into=fill.staging, tokenizer=False).release()
    assert [(c.tier) for c in cm.commit_load_fill(fill)] == ["nvme"]
    assert [(c.model, c.tier) for c in cm.list()] == [("llama", "nvme")]


def test_a_failed_load_leaves_nothing_visible(tmp_path, origin):
    cm = make_manager(tmp_path)
    part = read_checkpoint(origin).partitions[0]
    with open(part.path, "r+b") as f:  # the origin is corrupt: the loader refuses it
        f.seek(part.size // 2)
        byte = f.read(1)
        f.seek(part.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    fill = cm.begin_load_fill("llama", origin, ("dram", "nvme"))
    with pytest.raises(ChecksumMismatch):
        hpcllm.load_model(origin, tier="sharedfs", tee_into=fill.staging, tokenizer=False)
    with pytest.raises(CacheCorrupt, match="no complete copy"):
        cm.commit_load_fill(fill)
    assert cm.list() == [] and staging_folders(cm) == []
    assert cm.usage_bytes("nvme") == 0 and cm.usage_bytes("dram") == 0  # reservations gone


def test_a_copy_corrupted_while_written_is_never_visible(tmp_path, origin):
    cm = make_manager(tmp_path)
    fill = cm.begin_load_fill("llama", origin, ("dram", "nvme"))
    hpcllm.load_model(origin, tier="sharedfs", tee_into=fill.staging, tokenizer=False).release()
    part = read_checkpoint(origin).partitions[0]
    written = fill.staging / part.file
    data = bytearray(written.read_bytes())
    data[part.size // 3] ^= 0xFF  # what the tee wrote is not what the load verified (a torn or bad write)
    written.write_bytes(bytes(data))
    with pytest.raises(CacheCorrupt, match="does not verify"):
        cm.commit_load_fill(fill)
    assert cm.list() == [] and staging_folders(cm) == []


def test_an_unfinished_tee_is_discarded(tmp_path, origin):
    cm = make_manager(tmp_path)
    fill = cm.begin_load_fill("llama", origin, ("nvme",))
    (fill.staging / "partial").write_bytes(b"x" * 100)  # a worker killed mid-load
    cm.discard_load_fill(fill)
    assert cm.list() == [] and staging_folders(cm) == [] and cm.usage_bytes("nvme") == 0


def test_a_model_in_use_is_not_evicted_to_make_room(tmp_path, origin, converted, model_bytes):
    cm = make_manager(tmp_path, nvme=int(model_bytes * 2.5), dram=10**9)
    cm.warm("held", converted, "nvme")
    cm.warm("idle", converted, "nvme")
    with cm.using("held", "nvme"):
        fill = cm.begin_load_fill("llama", origin, ("nvme",))
        assert fill is not None
        hpcllm.load_model(origin, tier="sharedfs", tee_into=fill.staging, tokenizer=False).release()
        cm.commit_load_fill(fill)
        assert sorted(c.model for c in cm.list()) == ["held", "llama"]  # the idle copy made room

        # Full of copies in use (2 of 2.5 models): the next load fills nothing and evicts nothing.
        with cm.using("llama", "nvme"):
            assert cm.begin_load_fill("other", origin, ("nvme",)) is None
            assert sorted(c.model for c in cm.list()) == ["held", "llama"]


def test_a_load_while_a_warm_copies_the_model_fills_no_second_copy(tmp_path, origin, converted, model_bytes):
    """A model started while `cache warm` still copies it: each fill reserved a whole copy's room, so another
    model's copy was evicted to hold this one twice. The load now leaves that tier to the warm."""
    cm = make_manager(tmp_path, nvme=int(model_bytes * 2.5), dram=10**9)
    cm.warm("other", converted, "nvme")
    warming = cm.reserve_fill("llama", "nvme", model_bytes)  # what a warm in progress holds
    fill = cm.begin_load_fill("llama", origin, ("dram", "nvme"))
    assert fill.tiers == ("dram",)
    assert [c.model for c in cm.list()] == ["other"]
    with pytest.raises(FillInProgress, match="being copied into the nvme tier already"):
        cm.reserve_fill("llama", "nvme", model_bytes)
    cm.end_fill(warming)
    cm.end_fill(fill.fill_ids[0])
    assert cm.reserve_fill("llama", "nvme", model_bytes)  # once the warm is over, a fill may start


# ------------------------------------------------------------------------------ through the node agent's workers


def test_second_start_on_the_node_is_local_without_a_warm(tmp_path, origin):
    from hpcllm.node.app import create_app
    from hpcllm.node.tests.test_agent import AUTH, make_agent, ready_spare, wait_for

    # One spare, for the second start alone (the first and third take fresh workers): the staging folder also
    # reaches a spare worker through its assignment.
    agent = make_agent(tmp_path, cache_on_load=["dram", "nvme"], spare_workers=0)
    client = create_app(agent).test_client()

    def start(**extra) -> str:
        resp = client.post("/v1/internal/instances", json={"model": "tiny-llama", "source": str(origin), **extra},
                           headers=AUTH)
        assert resp.status_code == 202, resp.get_json()
        return resp.get_json()

    def ready(iid):
        info = next(i for i in client.get("/v1/internal/instances", headers=AUTH).get_json()["instances"]
                    if i["instance_id"] == iid)
        assert info["state"] in ("loading", "ready"), info
        return info if info["state"] == "ready" else None

    def cached_tiers():
        return sorted(c.tier for c in agent.registration().cached if c.model == "tiny-llama")  # what heartbeats send

    try:
        # The model's own cache_on_load = [] wins over the node's: nothing is kept.
        first = start(cache_on_load=[])
        assert first["load_tier"] == "sharedfs"
        wait_for(lambda: ready(first["instance_id"]), what="the first worker")
        client.delete(f"/v1/internal/instances/{first['instance_id']}", headers=AUTH)
        assert cached_tiers() == []

        agent.config.node.spare_workers = 1
        spare = ready_spare(agent)
        second = start()
        agent.config.node.spare_workers = 0  # no spare after this load: the third start is a fresh worker
        assert agent.workers.get(second["instance_id"]).process.pid == spare.process.pid, "the spare takes it"
        assert second["load_tier"] == "sharedfs"
        wait_for(lambda: ready(second["instance_id"]), what="the worker loading from the shared FS")
        wait_for(lambda: cached_tiers() == ["dram", "nvme"], 60, "the copies kept on load")
        assert "spare worker ready" in agent.workers.get(second["instance_id"]).log_path.read_text()
        for copy in agent.cache.list():
            assert copy.verified and copy.source == str(origin.resolve())
            read_checkpoint(copy.path).verify_files()
        client.delete(f"/v1/internal/instances/{second['instance_id']}", headers=AUTH)
        assert cached_tiers() == ["dram", "nvme"]  # scaled to zero: the copies stay

        remove_origin_data(origin)  # the third start cannot touch the shared FS's data
        third = start()
        assert third["load_tier"] == "dram"
        assert wait_for(lambda: ready(third["instance_id"]), what="the worker loading from DRAM")["load_tier"] == "dram"
        assert not [p for p in agent.cache.nvme_dir.iterdir() if ".filling-" in p.name]
    finally:
        agent.workers.stop_all(timeout=5)
        agent.workers.close()


def test_a_reservation_failing_midway_leaves_no_other_reserved(tmp_path, origin, monkeypatch):
    """The state file failing on the NVMe reservation (SQLite locked past its timeout, the disk failing) after the
    DRAM one was made: the agent's start goes on without a copy (it catches the CacheError), and the DRAM room
    reserved is free again instead of held until the agent exits."""
    cm = make_manager(tmp_path)
    reserve = cm.reserve_fill

    def failing_on_nvme(model, tier, need, folder=None):
        if tier == "nvme":
            raise CacheError("cannot use the cache state file: database is locked")
        return reserve(model, tier, need, folder)

    monkeypatch.setattr(cm, "reserve_fill", failing_on_nvme)
    with pytest.raises(CacheError, match="database is locked"):
        cm.begin_load_fill("llama", origin, ("dram", "nvme"))
    assert cm.usage_bytes("dram") == 0
