"""Node caches keyed by checkpoint content, in private folders (issue 15).

A model name redeployed from a new checkpoint must not be served the old weights from a node's NVMe or DRAM copy;
the cache folders belong to the service user alone."""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from pathlib import Path

import pytest

from hpcllm.checkpoint import convert, read_checkpoint
from hpcllm.node.cache import CacheCorrupt, CacheError, CacheManager, content_id
from hpcllm.store.dram import DramTier

CHUNK = 16 * 1024


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """Two converted tiny Llamas with different weights (seeds 0 and 1): the old and the new checkpoint."""
    from hpcllm.devmodels import make_model

    root = tmp_path_factory.mktemp("redeploy")
    out = []
    for seed in (0, 1):
        hf = make_model("llama", root / f"hf-{seed}", seed=seed)
        convert(hf, root / f"ckpt-{seed}", chunk_size=CHUNK, progress=False)
        out.append(root / f"ckpt-{seed}")
    return out[0], out[1]


@pytest.fixture
def manager(tmp_path) -> CacheManager:
    return CacheManager(tmp_path / "nvme", 10**9, 10**9, f"test-{uuid.uuid4().hex[:8]}", dram_root=tmp_path / "shm")


def weights_of(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(path.glob("data-*")))


def test_a_redeploy_from_a_new_checkpoint_never_loads_the_old_copies(manager, checkpoints):
    old, new = checkpoints
    assert content_id(old) != content_id(new)
    manager.warm("llama", old, "nvme")
    manager.warm("llama", old, "dram")
    assert manager.path_for_load("llama", old)[1] == "dram"

    # The name now means the new checkpoint: the load goes to it, and the old copies are gone.
    assert manager.path_for_load("llama", new) == (Path(new), "sharedfs")
    assert manager.list() == []

    # Warming the name again copies the new weights; a warm of present, current content is a no-op.
    nvme = manager.warm("llama", new, "nvme")
    dram = manager.warm("llama", new, "dram")
    assert weights_of(nvme.path) == weights_of(dram.path) == weights_of(new) != weights_of(old)
    assert manager.warm("llama", new, "nvme").path == nvme.path
    assert manager.path_for_load("llama", new) == (dram.path, "dram")


def test_a_warm_replaces_a_copy_of_another_checkpoint(manager, checkpoints):
    old, new = checkpoints
    manager.warm("llama", old, "nvme")
    copy = manager.warm("llama", new, "nvme")  # no force needed: the copy is not of this checkpoint
    assert content_id(copy.path) == content_id(new) and copy.source == str(Path(new).resolve())
    # DRAM is filled from the node's NVMe copy only when it holds the same checkpoint.
    manager.warm("llama", new, "dram")
    assert content_id(manager.best_copy("llama").path) == content_id(new)


@pytest.mark.parametrize("tier", ["nvme", "dram"])
def test_an_origin_reconverted_while_it_is_copied_leaves_no_copy(manager, checkpoints, tmp_path, tier, monkeypatch):
    """The data files were copied and verified with the old manifest; the small files are read afterwards. A copy
    holding the new manifest beside the old weights would be taken for the new checkpoint (and a DRAM copy is loaded
    without a checksum pass)."""
    old, new = checkpoints
    origin = tmp_path / "origin"
    shutil.copytree(old, origin)
    data_bytes = read_checkpoint(origin).total_bytes

    def reconvert():  # `hpcllm convert --overwrite` renames the new checkpoint into place
        if not (tmp_path / "replaced").exists():
            os.rename(origin, tmp_path / "replaced")
            shutil.copytree(new, origin)

    fill_data = DramTier._fill_data
    monkeypatch.setattr(DramTier, "_fill_data", lambda *args: (fill_data(*args), reconvert()))
    with pytest.raises(CacheCorrupt, match="changed while it was being copied"):
        manager.warm("llama", origin, tier, progress=lambda done, total: done >= data_bytes and reconvert())
    assert manager.list() == [] and manager.usage_bytes(tier) == 0
    assert manager.path_for_load("llama", origin) == (origin, "sharedfs")
    assert weights_of(manager.warm("llama", origin, tier).path) == weights_of(new)


def test_a_stale_copy_in_use_is_kept_for_its_instance_but_not_loaded(manager, checkpoints):
    old, new = checkpoints
    manager.warm("llama", old, "nvme")
    with manager.using("llama", "nvme") as running:
        assert manager.path_for_load("llama", new) == (Path(new), "sharedfs")
        assert running.path.is_dir()  # the running instance's copy stays until it is released
    assert manager.path_for_load("llama", new) == (Path(new), "sharedfs")
    assert manager.list() == []


def test_cache_on_load_replaces_a_stale_copy(manager, checkpoints):
    old, new = checkpoints
    manager.warm("llama", old, "nvme")
    fill = manager.begin_load_fill("llama", new, ("nvme",))
    assert fill is not None and fill.tiers == ("nvme",)  # the old copy does not count as "already cached"
    manager.discard_load_fill(fill)


def test_cache_folders_are_private(manager, checkpoints, tmp_path):
    old, _ = checkpoints
    manager.warm("llama", old, "dram")
    for folder in (manager.nvme_dir, manager.dram.dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)  # left readable by an older version: tightened
    CacheManager(loose, 10**9, 0, None)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700


def test_an_nvme_folder_of_another_user_is_refused(tmp_path, monkeypatch):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o777)
    if os.getuid() == 0:
        os.chown(theirs, 65534, 65534)  # nobody's
    else:
        monkeypatch.setattr(os, "getuid", lambda: os.stat(theirs).st_uid + 1)
    with pytest.raises(CacheError, match=f"the NVMe cache folder {theirs} belongs to another user .* node.nvme_dir"):
        CacheManager(theirs, 10**9, 0, None)


def test_a_dram_namespace_of_another_user_is_refused(tmp_path, monkeypatch):
    shm = tmp_path / "shm"
    theirs = shm / "hpcllm-shared-name"
    theirs.mkdir(parents=True, mode=0o777)
    if os.getuid() == 0:
        os.chown(theirs, 65534, 65534)
    else:
        monkeypatch.setattr(os, "getuid", lambda: os.stat(theirs).st_uid + 1)
    with pytest.raises(CacheError, match="the DRAM tier folder .* belongs to another user"):
        CacheManager(tmp_path / "nvme", 10**9, 10**9, "shared-name", dram_root=shm)
