"""Slice copies in the node cache: `CacheManager.warm_slices` keeps one tensor-parallel rank's slices on a node,
verified and atomic, listed, verified again, refilled when corrupt, evicted with the model, LRU-accounted."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from hpcllm.checkpoint import read_checkpoint
from hpcllm.config import NodeConfig
from hpcllm.node.cache import (MARKER_FILE, CacheError, CacheInUse, CacheManager, node_model_copy, node_slice_copy,
                               slice_key)
from hpcllm.tp.slicecache import SLICES_DATA, open_slice_copy


@pytest.fixture(scope="module")
def origin(tiny_llama_dir, tmp_path_factory) -> Path:
    from hpcllm.checkpoint import convert

    out = tmp_path_factory.mktemp("origin") / "tiny-llama"
    convert(tiny_llama_dir, out, progress=False, chunk_size=16384)
    return out


@pytest.fixture
def manager(tmp_path) -> CacheManager:
    return CacheManager(tmp_path / "nvme", 10**9, 10**9, f"test-{uuid.uuid4().hex[:8]}", dram_root=tmp_path / "shm")


def _visible(nvme_dir: Path) -> list[str]:
    return sorted(p.name for p in nvme_dir.iterdir() if not p.name.startswith(".hpcllm-cache.db"))


def test_each_rank_s_slices_are_kept_listed_and_verified_apart_from_whole_copies(manager, origin):
    total = read_checkpoint(origin).total_bytes
    copies = [manager.warm_slices("tiny", origin, 2, rank) for rank in (0, 1)]

    assert _visible(manager.nvme_dir) == ["tiny+tp2.r0", "tiny+tp2.r1"]
    for rank, copy in enumerate(copies):
        assert (copy.model, copy.tier, copy.tensor_parallel, copy.rank) == ("tiny", "nvme", 2, rank)
        assert copy.verified and copy.source == str(origin.resolve())
        assert copy.bytes < 0.75 * total  # about half of the model (+ the replicated tensors on rank 0)
        assert open_slice_copy(copy.path).rank == rank
    assert copies[1].bytes < copies[0].bytes
    listed = {(c.model, c.tensor_parallel, c.rank) for c in manager.list()}
    assert listed == {("tiny", 2, 0), ("tiny", 2, 1)}
    # a slice copy is not a copy of the model: a 1-rank load still reads the origin
    assert manager.path_for_load("tiny", origin) == (origin, "sharedfs")
    assert manager.slice_copy("tiny", 2, 1).path == copies[1].path
    assert manager.slice_copy("tiny", 4, 1) is None
    # warming again reuses the copy
    assert manager.warm_slices("tiny", origin, 2, 0).path == copies[0].path
    assert [r.action for r in manager.verify("tiny")] == ["ok", "ok"]


def test_a_corrupt_slice_copy_is_found_by_verify_and_refilled(manager, origin):
    copy = manager.warm_slices("tiny", origin, 2, 1)
    with open(copy.path / SLICES_DATA, "r+b") as f:
        f.seek(4096 + 10)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))

    results = manager.verify("tiny")

    assert [(r.model, r.action) for r in results] == [("tiny+tp2.r1", "refilled")]
    assert "is corrupt" in results[0].message
    assert [r.action for r in manager.verify("tiny")] == ["ok"]


def test_a_failed_slice_fill_leaves_nothing_visible(manager, origin, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(origin, broken)
    ckpt = read_checkpoint(broken)
    entry = ckpt.tensors["model.layers.0.mlp.down_proj.weight"]
    with open(ckpt.partitions[entry.partition].path, "r+b") as f:
        f.seek(entry.offset + 4 * 100)  # row 0, column 100: rank 1's half
        f.write(b"\xff\xff")

    manager.warm_slices("tiny", broken, 2, 0)  # rank 0's slices do not hold the byte
    with pytest.raises(CacheError, match=r"rank 1 of 2's slices do not verify: .*down_proj\.weight strip \d+/\d+ "
                                         r"along dim 1 is corrupt"):
        manager.warm_slices("tiny", broken, 2, 1)
    assert _visible(manager.nvme_dir) == ["tiny+tp2.r0"]
    assert manager.usage_bytes("nvme") == manager.get("tiny+tp2.r0", "nvme").bytes  # no reservation left


def test_a_degree_that_does_not_split_the_model_is_a_clear_error(manager, origin):
    with pytest.raises(CacheError, match=r"cannot keep rank 0 of 4's slices: tensor_parallel = 4 does not fit "
                                         r"model type 'llama': KV heads"):
        manager.warm_slices("tiny", origin, 4, 0)
    with pytest.raises(CacheError, match="the rank 0..tensor_parallel-1"):
        slice_key("tiny", 2, 2)
    assert _visible(manager.nvme_dir) == []


def test_evicting_the_model_removes_its_slice_copies_and_lru_counts_them(manager, origin, tmp_path):
    whole = manager.warm("tiny", origin, "nvme")
    manager.warm_slices("tiny", origin, 2, 0)
    manager.warm_slices("tiny", origin, 2, 1)
    assert manager.usage_bytes("nvme") == sum(c.bytes for c in manager.list() if c.tier == "nvme")

    evicted = manager.evict("tiny", "nvme")

    assert sorted((c.tensor_parallel or 0, c.rank or 0) for c in evicted) == [(0, 0), (2, 0), (2, 1)]
    assert _visible(manager.nvme_dir) == [] and whole.path.exists() is False
    # a capacity of one slice copy: the next rank's fill evicts the least recently used one (not in use)
    first = manager.warm_slices("tiny", origin, 2, 0)
    small = CacheManager(manager.nvme_dir, first.bytes + 8192, 10**9, manager.dram.namespace,
                         dram_root=manager.dram.dir.parent)
    small.warm_slices("tiny", origin, 2, 1)
    assert _visible(manager.nvme_dir) == ["tiny+tp2.r1"]


def test_a_rank_finds_its_node_s_slice_copy_and_holds_it_in_use(manager, origin, monkeypatch):
    manager.warm_slices("tiny", origin, 2, 1)
    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    config = NodeConfig(nvme_dir=str(manager.nvme_dir))

    found = node_slice_copy(config, "tiny", 2, 1)

    assert found == manager.nvme_dir / "tiny+tp2.r1" and (found / MARKER_FILE).is_file()
    assert manager.get("tiny+tp2.r1", "nvme").in_use == 1
    assert node_slice_copy(config, "tiny", 2, 0) is None
    assert node_slice_copy(NodeConfig(nvme_dir=str(manager.nvme_dir.parent / "%n")), "tiny", 2, 1) is None


def test_a_rank_of_a_spanning_instance_finds_its_node_s_whole_copy_of_the_same_checkpoint(manager, origin, tmp_path,
                                                                                           monkeypatch):
    """The agent gives a spanning instance's ranks the origin's path; a rank whose node keeps a whole NVMe copy of
    that checkpoint reads there (held in use), never a copy of other content."""
    import shutil

    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    config = NodeConfig(nvme_dir=str(manager.nvme_dir.parent / "%n"))
    assert node_model_copy(config, "tiny", origin) is None  # nothing on n7 yet
    on_n7 = CacheManager(tmp_path / "n7", 10**9, 10**9, None)
    on_n7.warm("tiny", origin, "nvme")

    found = node_model_copy(config, "tiny", origin)
    assert found == tmp_path / "n7" / "tiny" and on_n7.get("tiny", "nvme").in_use == 1
    other = tmp_path / "other"
    shutil.copytree(origin, other)
    (other / "manifest.json").write_text((other / "manifest.json").read_text() + "\n")  # another version
    assert node_model_copy(config, "tiny", other) is None  # redeployed from another checkpoint: not this one


def test_a_rank_does_not_take_a_node_copy_found_corrupt_while_in_use(manager, origin, monkeypatch):
    """A slice copy or whole copy that failed a check while a running instance held it is kept for that instance
    only: a rank starting later reads the origin (it was handed the corrupt copy)."""
    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    config = NodeConfig(nvme_dir=str(manager.nvme_dir))
    manager.warm_slices("tiny", origin, 2, 1)
    manager.warm("tiny", origin, "nvme")
    for key in ("tiny+tp2.r1", "tiny"):
        manager.acquire(key, "nvme", pid=1)  # a running instance holds it
        assert manager.handle_corrupt(key, "nvme", "a chunk failed its checksum").action == "kept-in-use"

    assert node_slice_copy(config, "tiny", 2, 1) is None
    assert node_model_copy(config, "tiny", origin) is None
    assert [manager.get(key, "nvme").in_use for key in ("tiny+tp2.r1", "tiny")] == [1, 1]  # only the first holder


def test_cache_warm_tensor_parallel_puts_each_rank_s_slices_on_the_node_that_runs_it(tmp_path, origin, capsys):
    """`hpcllm cache warm M --tensor-parallel 2 --nodes n[1-2]` through two real agents: n1 keeps rank 0's slices,
    n2 rank 1's; `cache ls` and the agents' heartbeats show them as slice copies."""
    from hpcllm.cli.main import main
    from hpcllm.node.tests.test_agent import agents_over_http

    with agents_over_http(tmp_path) as (agents, urls, config):
        common = ["--config", str(config), "--agent-url", urls[1], "--agent-url", urls[0]]  # ranks follow --nodes

        code = main(["cache", "warm", "tiny", "--nodes", "n[1-2]", "--tensor-parallel", "2", "--source", str(origin),
                     *common])

        out = capsys.readouterr().out
        assert code == 0, out
        assert "n1: tiny rank 0 of 2:" in out and "n2: tiny rank 1 of 2:" in out
        for rank, agent in enumerate(agents):
            assert [(c.model, c.tensor_parallel, c.rank) for c in agent.cache.list()] == [("tiny", 2, rank)]
            assert [(e.model, e.tier, e.tensor_parallel, e.rank) for e in agent.cache_entries()] == [("tiny", "nvme", 2,
                                                                                                      rank)]
        assert main(["cache", "ls", *common]) == 0
        listed = capsys.readouterr().out
        assert "(slices: rank 0 of 2)" in listed and "(slices: rank 1 of 2)" in listed
        # 3 ranks do not share 2 nodes evenly; 4 would (2 each), but this model's 2 KV heads refuse 4
        assert main(["cache", "warm", "tiny", "--nodes", "n[1-2]", "--tensor-parallel", "3", "--source", str(origin),
                     *common]) != 0
        assert "cannot be spread evenly over 2 node(s)" in capsys.readouterr().err
        assert main(["cache", "warm", "tiny", "--nodes", "n[1-2]", "--tensor-parallel", "4", "--source", str(origin),
                     *common]) != 0
        err = capsys.readouterr().err
        assert "KV heads (num_key_value_heads) = 2 is not divisible by 4" in err and "Traceback" not in err
        # evicting the model through the agents removes its slice copies
        assert main(["cache", "evict", "tiny", *common]) == 0
        assert all(agent.cache.list() == [] for agent in agents)


def test_refreshing_the_whole_copy_leaves_the_slice_copies_a_running_rank_reads(manager, origin):
    """A corrupt whole copy found by verify, or one replaced by warm --force, is the whole copy's business: the
    slice copies beside it (another TP instance's ranks read them) stay, and one held in use never blocks it."""
    manager.warm("tiny", origin, "nvme")
    held = manager.warm_slices("tiny", origin, 2, 0)
    idle = manager.warm_slices("tiny", origin, 2, 1)
    manager.acquire(held.key, "nvme")  # a running rank reads it
    part = read_checkpoint(origin).partitions[0]
    with open(manager.nvme_dir / "tiny" / part.file, "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))

    results = {r.model: r.action for r in manager.verify("tiny")}

    assert results == {"tiny": "refilled", "tiny+tp2.r0": "ok", "tiny+tp2.r1": "ok"}
    assert manager.warm("tiny", origin, "nvme", force=True).verified
    assert _visible(manager.nvme_dir) == ["tiny", "tiny+tp2.r0", "tiny+tp2.r1"]
    assert manager.get(held.key, "nvme").in_use == 1 and manager.get(idle.key, "nvme") is not None


def test_a_slice_copy_a_rank_holds_is_not_replaced_under_it(manager, origin):
    """warm_slices --force (or over a copy of another checkpoint version) while a rank holds the slice copy: refused
    with CacheInUse, as for a whole copy, instead of deleting the folder the rank reads."""
    held = manager.warm_slices("tiny", origin, 2, 0)
    manager.acquire(held.key, "nvme")
    pieces = (held.path / SLICES_DATA).stat().st_ino

    with pytest.raises(CacheInUse, match="in use"):
        manager.warm_slices("tiny", origin, 2, 0, force=True)

    assert (held.path / SLICES_DATA).stat().st_ino == pieces and manager.get(held.key, "nvme").in_use == 1
    manager.release(held.key, "nvme")
    assert manager.warm_slices("tiny", origin, 2, 0, force=True).verified


def test_verify_keeps_a_slice_copy_whose_origin_cannot_be_read(manager, origin, tmp_path):
    """A slice copy is checked against its origin's strip hashes: with the origin away (the shared FS unmounted,
    the folder moved), verify says it could not check the copy and keeps it, instead of dropping it as corrupt."""
    import shutil

    own = tmp_path / "own-origin"
    shutil.copytree(origin, own)
    copy = manager.warm_slices("tiny", own, 2, 1)
    own.rename(tmp_path / "away")

    [result] = manager.verify("tiny")

    assert (result.model, result.ok, result.action) == ("tiny+tp2.r1", False, "unchecked")
    assert str(own.resolve()) in result.message and (copy.path / SLICES_DATA).is_file()
    (tmp_path / "away").rename(own)
    assert [r.action for r in manager.verify("tiny")] == ["ok"]


@pytest.mark.parametrize("gone", ["slice-hashes.json", "config.json"])
def test_verify_keeps_a_slice_copy_whose_origin_misses_what_checks_it(manager, origin, tmp_path, gone):
    """The origin readable but its strip hashes or config gone (what verify reads to check the copy): the copy is
    unchecked and kept; it was taken for corrupt and dropped (strip hashes: MissingFile), or the node's whole verify
    failed (config: transformers' ValueError, or an OSError)."""
    import shutil

    own = tmp_path / "own-origin"
    shutil.copytree(origin, own)
    copy = manager.warm_slices("tiny", own, 2, 1)
    (own / gone).rename(tmp_path / gone)

    [result] = manager.verify("tiny")

    assert (result.model, result.ok, result.action) == ("tiny+tp2.r1", False, "unchecked")
    assert gone in result.message and (copy.path / SLICES_DATA).is_file()
    (tmp_path / gone).rename(own / gone)
    assert [r.action for r in manager.verify("tiny")] == ["ok"]


def _flip_a_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(4096 + 10)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_failed_tensor_parallel_load_re_hashes_the_copies_its_error_names_not_every_whole_copy(manager, origin):
    """After a tensor-parallel load failed on a copy's bytes or files the agent re-hashed every copy the ranks may
    have read, the model's whole copies (the whole model's bytes, 100+ GB for a large one) included, on any such
    exit, one that names the origin too: first the copies the error names now, the slice copies of that degree when
    none of those is corrupt, a whole copy only when the error names it."""
    whole = manager.warm("tiny", origin, "nvme")
    slices = [manager.warm_slices("tiny", origin, 2, rank) for rank in (0, 1)]
    _flip_a_byte(slices[1].path / SLICES_DATA)
    failed_on = f"rank 1: {slices[1].path / SLICES_DATA}: tensor lm_head.weight strip 48/64 along dim 0 is corrupt"

    results = manager.verify_tensor_parallel_copies("tiny", 2, "nvme", f"worker exited with status 4: {failed_on}")
    assert [(r.model, r.action) for r in results] == [("tiny+tp2.r1", "refilled")]

    origin_missing = f"worker exited with status 3: rank 0: {origin}/data-00000.h5: No such file or directory"
    results = manager.verify_tensor_parallel_copies("tiny", 2, "nvme", origin_missing)
    assert sorted((r.model, r.action) for r in results) == [("tiny+tp2.r0", "ok"), ("tiny+tp2.r1", "ok")]

    partition = read_checkpoint(whole.path).partitions[0].path
    _flip_a_byte(partition)
    results = manager.verify_tensor_parallel_copies("tiny", 2, "nvme", f"rank 0: {partition}: tensor x is corrupt")
    assert [(r.model, r.action) for r in results] == [("tiny", "refilled")]


def test_a_slice_copy_an_instance_takes_while_a_failed_load_s_copies_are_checked_is_kept_and_the_rest_checked(
        manager, origin, monkeypatch):
    """A rank of an instance starting meanwhile takes a corrupt slice copy between its check and its removal: the
    CacheInUse escaped (a traceback in the agent's log) and the other copies went unchecked; now it is reported
    kept-in-use (the rank reads it: not removed under it) and the next copy is still replaced."""
    slices = [manager.warm_slices("tiny", origin, 2, rank) for rank in (0, 1)]
    for copy in slices:
        _flip_a_byte(copy.path / SLICES_DATA)
    looked_up = manager.get

    def found_then_taken(model, tier):  # the new instance's rank 0 takes the copy right after it was looked up
        copy = looked_up(model, tier)
        if model == slices[0].key:
            manager.acquire(model, tier)
        return copy

    monkeypatch.setattr(manager, "get", found_then_taken)
    results = {r.model: r for r in manager.verify_tensor_parallel_copies("tiny", 2, "nvme", "an origin's error")}

    assert results[slices[0].key].action == "kept-in-use" and "in use" in results[slices[0].key].message, results
    assert (slices[0].path / SLICES_DATA).is_file()
    assert results[slices[1].key].action == "refilled", results
