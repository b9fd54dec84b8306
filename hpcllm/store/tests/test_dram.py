"""The DRAM tier: verified atomic fills into /dev/shm, zero-copy loads shared across processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from hpcllm.checkpoint import ChecksumMismatch
from hpcllm.store.dram import MARKER_FILE, DramTier, DramTierError
from hpcllm.store.loader import load_model
from hpcllm.store.tests.conftest import ARCHS, reference
from hpcllm.store.tests.test_loader import assert_same_model, assert_views_of, file_mappings
from hpcllm.store.tests.tmpfs import mounted_tmpfs


def test_put_has_open_list_remove(models, dram_tier):
    _, converted = models("llama")
    assert not dram_tier.has("llama") and dram_tier.list() == []
    entry = dram_tier.put(converted, "llama")
    assert dram_tier.has("llama")
    assert entry.bytes == sum(p.stat().st_size for p in converted.glob("data-*.h5"))
    path = dram_tier.open("llama")
    assert path.parent == dram_tier.dir and path.is_relative_to("/dev/shm")
    for original in converted.iterdir():  # a complete, byte-identical checkpoint
        assert (path / original.name).read_bytes() == original.read_bytes()
    assert [e.model_id for e in dram_tier.list()] == ["llama"]
    assert dram_tier.usage_bytes() >= entry.bytes
    assert not [p for p in dram_tier.dir.iterdir() if p.name.startswith(".")]  # no temp folder left
    assert dram_tier.remove("llama") and not dram_tier.has("llama") and not dram_tier.remove("llama")
    with pytest.raises(DramTierError, match="not in the DRAM tier"):
        dram_tier.open("llama")


def test_bad_model_id_and_namespace_are_refused(models, dram_tier):
    _, converted = models("llama")
    with pytest.raises(DramTierError, match="model id"):
        dram_tier.put(converted, "../escape")
    with pytest.raises(DramTierError, match="namespace"):
        DramTier("a/b")


def test_corrupt_source_is_never_published(copy_checkpoint, dram_tier):
    damaged = copy_checkpoint("llama")
    data = damaged / "data-00001.h5"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(raw)
    with pytest.raises(ChecksumMismatch, match="data-00001.h5"):
        dram_tier.put(damaged, "damaged")
    assert not dram_tier.has("damaged")
    assert not list(dram_tier.dir.iterdir())  # the temporary fill was removed


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs: shared memory that runs out."""
    with mounted_tmpfs(tmp_path / "shm", "256k") as mount:
        yield mount


def test_shared_memory_running_out_during_a_fill_is_a_clear_error(models, small_tmpfs, monkeypatch):
    """The room is taken by another fill after the free-space check: the fill fails naming the tier, not the
    origin (a read into a mapping of a full tmpfs fails with EFAULT), and leaves nothing behind."""
    _, converted = models("llama")
    tier = DramTier("full", small_tmpfs)
    monkeypatch.setattr(DramTier, "_check_space", lambda self, nbytes: None)
    with pytest.raises(DramTierError, match=f"{tier.dir}: no shared memory left for llama"):
        tier.put(converted, "llama")
    assert not tier.has("llama") and list(tier.dir.iterdir()) == []
    assert shutil.disk_usage(small_tmpfs).used == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_dram_load_is_zero_copy_and_identical(models, dram_tier, arch):
    hf, converted = models(arch)
    dram_tier.put(converted, arch)
    loaded = load_model(dram_tier.open(arch), tokenizer=False)
    assert loaded.stats.tier == "dram" and loaded.stats.reader_mode == "mmap" and loaded.stats.zero_copy
    assert not loaded.stats.verified  # verified when the tier was filled
    assert_same_model(reference(hf), loaded.model)
    assert_views_of(loaded, file_mappings(dram_tier.open(arch)))


def test_unverified_tmpfs_folder_is_verified_at_load(copy_checkpoint, tmp_path_factory):
    """A tmpfs copy that DramTier did not fill (no marker) is checked; a flipped byte is caught."""
    import shutil
    import uuid
    from pathlib import Path

    damaged = copy_checkpoint("gpt2")
    shm = Path("/dev/shm") / f"hpcllm-test-raw-{uuid.uuid4().hex[:8]}"
    shutil.copytree(damaged, shm)
    try:
        assert not (shm / MARKER_FILE).exists()
        assert load_model(shm, tokenizer=False).stats.verified
        data = shm / "data-00000.h5"
        raw = bytearray(data.read_bytes())
        raw[-100] ^= 0x01
        data.write_bytes(raw)
        with pytest.raises(ChecksumMismatch, match="data-00000.h5"):
            load_model(shm, tokenizer=False)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_dram_to_staged_path(models, dram_tier):
    """A device target reads the DRAM copy through the staging ring (buffered reads of /dev/shm)."""
    hf, converted = models("qwen2")
    dram_tier.put(converted, "qwen2")
    loaded = load_model(dram_tier.open("qwen2"), staged=True, tokenizer=False)
    assert loaded.stats.reader_mode == "buffered" and not loaded.stats.zero_copy
    assert_same_model(reference(hf), loaded.model)


def test_copies_out_of_the_dram_tier_use_a_thread_per_usable_cpu_up_to_eight(models, dram_tier, monkeypatch):
    """A staged (GPU) load copies the DRAM copy with memcpy-bound threads: as many as the CPUs it may use, at most
    MEMORY_COPY_THREADS; explicit threads still win."""
    hf, converted = models("qwen2")
    dram_tier.put(converted, "qwen2")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    many = load_model(dram_tier.open("qwen2"), staged=True, tokenizer=False, unit_bytes=8 << 10)
    assert many.stats.threads == 8
    assert_same_model(reference(hf), many.model)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert load_model(dram_tier.open("qwen2"), staged=True, tokenizer=False).stats.threads == 3
    assert load_model(dram_tier.open("qwen2"), staged=True, tokenizer=False, threads=1).stats.threads == 1


SECOND_PROCESS = textwrap.dedent("""
    import json, sys, torch
    from hpcllm.store.dram import DramTier
    from hpcllm.store.loader import load_model

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    tier = DramTier(sys.argv[1])
    folder = tier.open(sys.argv[2])
    warm = load_model(folder, tokenizer=False)  # pays the one-time imports (transformers' model code)
    with torch.no_grad():
        warm.model(torch.tensor([[1, 5, 9, 33, 7]]))
    anon_before = status("RssAnon")
    loaded = load_model(folder, tokenizer=False)
    with torch.no_grad():
        logits = loaded.model(torch.tensor([[1, 5, 9, 33, 7]])).logits
        touched = sum(float(p.sum()) for p in loaded.model.parameters())  # reads every weight page
    ranges = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith(str(folder) + "/data-"):
            ranges.append([int(x, 16) for x in fields[0].split("-")])
    inside = all(any(lo <= p.data_ptr() and p.data_ptr() + p.numel() * p.element_size() <= hi
                     for lo, hi in ranges) for p in loaded.model.parameters())
    print(json.dumps({"inside": inside, "mappings": len(ranges), "anon_growth": status("RssAnon") - anon_before,
                      "shmem": status("RssShmem"), "bytes": loaded.stats.bytes, "mode": loaded.stats.reader_mode,
                      "seconds": loaded.stats.seconds, "checksum": float(logits.float().sum())}))
""")


def test_second_process_maps_the_same_pages(disk_dir, dram_tier):
    """A load in another process is zero-copy: weights inside the shm mapping, anonymous memory does not grow."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hpcllm.checkpoint import convert

    torch.manual_seed(1)  # ~24 MB of float32 weights, large enough that a private copy would show in RssAnon
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    hf = disk_dir / "hf-rss"
    if not hf.exists():
        LlamaForCausalLM(config).save_pretrained(hf)
        convert(hf, disk_dir / "ckpt-rss", progress=False)
    dram_tier.put(disk_dir / "ckpt-rss", "rss")
    result = subprocess.run([sys.executable, "-c", SECOND_PROCESS, dram_tier.namespace, "rss"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["mode"] == "mmap" and info["inside"] and info["mappings"] >= 1
    assert info["bytes"] > 20e6
    assert info["anon_growth"] < 0.25 * info["bytes"], info
    assert info["shmem"] > 0.9 * info["bytes"], info  # the weights are the shared pages themselves
    with torch.no_grad():
        expected = reference(hf)(torch.tensor([[1, 5, 9, 33, 7]])).logits.float().sum()
    assert info["checksum"] == pytest.approx(float(expected), rel=1e-6)


def test_remove_while_mapped_keeps_the_model_working(models, dram_tier):
    import torch

    hf, converted = models("gpt2")
    dram_tier.put(converted, "gpt2")
    loaded = load_model(dram_tier.open("gpt2"), tokenizer=False)
    assert dram_tier.remove("gpt2")
    with torch.no_grad():
        prompt = torch.tensor([[3, 4, 5]])
        assert torch.equal(loaded.model(prompt).logits, reference(hf)(prompt).logits)


def test_marker_records_the_fill(models, dram_tier):
    _, converted = models("opt")
    entry = dram_tier.put(converted, "opt")
    info = json.loads((entry.path / MARKER_FILE).read_text())
    assert info["verified"] and info["bytes"] == entry.bytes and entry.fill_seconds > 0
    assert dram_tier.put(converted, "opt") == entry  # present already: left as is


# ------------------------------------------------------------------------------- ours, private, unchanged (issue 15)


def mode(path) -> int:
    import stat

    return stat.S_IMODE(path.stat().st_mode)


def test_the_tier_is_private(models, dram_tier):
    _, converted = models("llama")
    entry = dram_tier.put(converted, "llama")
    assert mode(dram_tier.dir) == 0o700 and mode(entry.path) == 0o700
    assert {mode(f) for f in entry.path.iterdir()} == {0o600}


def test_a_namespace_folder_someone_else_created_first_is_refused(models, dram_tier, monkeypatch):
    import os

    _, converted = models("llama")
    dram_tier.dir.mkdir(mode=0o777)
    dram_tier.dir.chmod(0o777)  # as a local user could leave it, waiting for the service to fill it
    if os.getuid() == 0:
        os.chown(dram_tier.dir, 65534, 65534)  # nobody's
    else:
        monkeypatch.setattr(os, "getuid", lambda: os.stat(dram_tier.dir).st_uid + 1)
    with pytest.raises(DramTierError, match="belongs to another user .* choose another node.dram_namespace"):
        dram_tier.put(converted, "llama")
    assert not list(dram_tier.dir.iterdir())


def test_a_dram_copy_altered_after_its_fill_fails_verification_instead_of_loading(models, dram_tier):
    _, converted = models("llama")
    path = dram_tier.put(converted, "llama").path
    data = path / "data-00001.h5"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    with open(data, "r+b") as f:  # in place, same size, same inode: only its ctime tells
        f.write(raw)
    assert dram_tier.has("llama")  # the marker is still there...
    with pytest.raises(ChecksumMismatch, match="data-00001.h5"):  # ...but it no longer vouches for the bytes
        load_model(dram_tier.open("llama"), tokenizer=False)


def test_a_planted_copy_carrying_the_marker_is_verified(models, dram_tier):
    """Weights copied in by hand (or by another user) beside a marker copied from a real fill: the files are not
    the ones the fill verified, so every chunk is checked and altered weights are refused."""
    import shutil

    _, converted = models("llama")
    real = dram_tier.put(converted, "llama").path
    planted = dram_tier.dir / "planted"
    shutil.copytree(real, planted)
    assert load_model(planted, tokenizer=False).stats.verified  # intact content loads, after a full check
    data = planted / "data-00000.h5"
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0x01
    data.write_bytes(raw)
    with pytest.raises(ChecksumMismatch, match="data-00000.h5"):
        load_model(planted, tokenizer=False)
    # The real copy still loads without a checksum pass.
    assert not load_model(real, tokenizer=False).stats.verified


def test_a_copy_others_may_write_is_verified(models, dram_tier):
    _, converted = models("llama")
    path = dram_tier.put(converted, "llama").path
    (path / "data-00000.h5").chmod(0o666)
    assert load_model(path, tokenizer=False).stats.verified
