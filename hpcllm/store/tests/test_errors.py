"""A damaged checkpoint never becomes a model: every problem is a CheckpointError naming the file."""

from __future__ import annotations

import json
import os
import re

import pytest

from hpcllm.checkpoint import (ChecksumMismatch, InvalidIndex, InvalidManifest, MissingFile, NotAConvertedCheckpoint,
                               TruncatedFile, UnsupportedDtype, UnsupportedFormatVersion, read_checkpoint)
from hpcllm.checkpoint.layout import checksum
from hpcllm.store.loader import load_model
from hpcllm.store.memory import HostBufferPool
from hpcllm.store.readers import FileReader
from hpcllm.store.tests.conftest import cache_in_page_cache, evict_from_page_cache


def flip_byte_in_tensor(folder, name: str) -> str:
    ckpt = read_checkpoint(folder)
    entry = ckpt.tensors[name]
    path = ckpt.partitions[entry.partition].path
    with open(path, "r+b") as f:
        f.seek(entry.offset + entry.nbytes // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    return path.name


@pytest.mark.parametrize("tier", ["disk", "sharedfs"])
@pytest.mark.parametrize("staged", [False, True])
def test_flipped_byte_raises_checksum_mismatch(copy_checkpoint, tier, staged):
    folder = copy_checkpoint("llama")
    damaged_file = flip_byte_in_tensor(folder, "model.layers.1.mlp.down_proj.weight")
    evict_from_page_cache(folder)  # the disk tier then reads the damaged bytes with O_DIRECT
    pool = HostBufferPool()
    with pytest.raises(ChecksumMismatch, match=damaged_file):
        load_model(folder, tier=tier, staged=staged, pool=pool, tokenizer=False, unit_bytes=32 << 10)
    # the destination buffers went back to the pool: a failed load leaks nothing
    stats = pool.stats()
    assert stats.buffers == stats.free_buffers


def test_flipped_byte_in_a_cached_file_is_caught_when_mapped(copy_checkpoint):
    folder = copy_checkpoint("gpt2")
    damaged_file = flip_byte_in_tensor(folder, "transformer.h.0.mlp.c_fc.weight")
    cache_in_page_cache(folder)
    with pytest.raises(ChecksumMismatch, match=damaged_file):
        load_model(folder, tier="disk", tokenizer=False)


def test_flipped_byte_after_a_verified_load_is_still_caught(copy_checkpoint):
    folder = copy_checkpoint("llama")
    assert load_model(folder, tier="disk", tokenizer=False).stats.verified  # writes the verification record
    damaged_file = flip_byte_in_tensor(folder, "model.embed_tokens.weight")
    with pytest.raises(ChecksumMismatch, match=damaged_file):
        load_model(folder, tier="disk", tokenizer=False)


def test_truncated_data_file(copy_checkpoint):
    folder = copy_checkpoint("gpt2")
    data = folder / "data-00001.h5"
    os.truncate(data, data.stat().st_size - 5000)
    with pytest.raises(TruncatedFile, match="data-00001.h5"):
        load_model(folder, tokenizer=False)


def test_file_shrinking_under_the_reader_is_truncation(copy_checkpoint, expected_disk_mode):
    folder = copy_checkpoint("gpt2")
    data = folder / "data-00000.h5"
    size = data.stat().st_size
    import mmap

    with FileReader(data, expected_disk_mode, expected_size=size) as reader:
        os.truncate(data, size // 2)
        with pytest.raises(TruncatedFile, match="data-00000.h5"):
            reader.read_into(0, memoryview(mmap.mmap(-1, size + 4096)), size)


def test_missing_data_file(copy_checkpoint):
    folder = copy_checkpoint("opt")
    (folder / "data-00000.h5").unlink()
    with pytest.raises(MissingFile, match="data-00000.h5"):
        load_model(folder, tokenizer=False)


def test_bad_manifest(copy_checkpoint):
    folder = copy_checkpoint("opt")
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(InvalidManifest, match="manifest.json"):
        load_model(folder, tokenizer=False)


def test_unknown_format_version(copy_checkpoint):
    folder = copy_checkpoint("opt")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedFormatVersion, match="manifest.json"):
        load_model(folder, tokenizer=False)


def rewrite_index(folder, edit) -> None:
    """Edit index.json and re-record its checksum, as a buggy converter would have written it."""
    index = json.loads((folder / "index.json").read_text())
    edit(index)
    raw = json.dumps(index).encode()
    (folder / "index.json").write_bytes(raw)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["index"].update(size=len(raw), xxh3_64=checksum(raw))
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_unsupported_dtype(copy_checkpoint):
    folder = copy_checkpoint("opt")
    rewrite_index(folder, lambda index: index["tensors"]["lm_head.weight" if "lm_head.weight" in index["tensors"]
                                                           else next(iter(index["tensors"]))].update(dtype="int4"))
    with pytest.raises(UnsupportedDtype, match="index.json"):
        load_model(folder, tokenizer=False)


def test_tampered_index_is_caught(copy_checkpoint):
    folder = copy_checkpoint("opt")
    text = (folder / "index.json").read_text()
    tampered = re.sub(r'"offset": (\d+)', lambda m: f'"offset": {int(m.group(1)) + 4096}', text, count=1)
    assert tampered != text
    (folder / "index.json").write_text(tampered)
    with pytest.raises((ChecksumMismatch, InvalidIndex), match="index.json"):
        load_model(folder, tokenizer=False)


def test_checkpoint_missing_a_tensor_the_model_needs(copy_checkpoint):
    folder = copy_checkpoint("llama")
    rewrite_index(folder, lambda index: index["tensors"].pop("model.norm.weight"))
    with pytest.raises(InvalidIndex, match="model.norm.weight"):
        load_model(folder, tokenizer=False)


def edit_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_modified_config_is_caught(copy_checkpoint):
    folder = copy_checkpoint("llama")
    edit_config(folder, intermediate_size=128)
    with pytest.raises((ChecksumMismatch, TruncatedFile), match="config.json"):
        load_model(folder, tokenizer=False)


def test_shape_not_matching_config(copy_checkpoint):
    """A config that disagrees with the weights (recorded as such in the manifest) is refused, naming the tensor."""
    folder = copy_checkpoint("llama")
    edit_config(folder, intermediate_size=96)
    manifest = json.loads((folder / "manifest.json").read_text())
    raw = (folder / "config.json").read_bytes()
    for side in manifest["side_files"]:
        if side["file"] == "config.json":
            side.update(size=len(raw), xxh3_64=checksum(raw))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidIndex, match="mlp.*do not match"):
        load_model(folder, tokenizer=False)


def test_hf_folder_is_not_a_converted_checkpoint(models):
    hf, _ = models("llama")
    with pytest.raises(NotAConvertedCheckpoint, match="convert"):
        load_model(hf)


@pytest.mark.parametrize("enabled_before", [True, False])
def test_garbage_collector_state_is_restored_after_a_load_and_after_a_failed_one(copy_checkpoint, enabled_before):
    import gc

    folder = copy_checkpoint("llama")
    (folder / "data-00001.h5").unlink()
    (gc.enable if enabled_before else gc.disable)()
    try:
        load_model(copy_checkpoint("llama"), tokenizer=False)
        assert gc.isenabled() == enabled_before
        with pytest.raises(MissingFile):
            load_model(folder, tokenizer=False)
        assert gc.isenabled() == enabled_before
    finally:
        gc.enable()


def test_a_tokenizer_that_does_not_load_fails_the_load_and_leaks_nothing(copy_checkpoint, tmp_path):
    """The tokenizer is read after the weights: a failure there hands the host buffers back to the pool, once the
    cache-on-load copy (the tee) written from them is done, like any other failed load."""
    folder = copy_checkpoint("llama")
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_bytes(b"{" + b" " * (tokenizer.stat().st_size - 1))  # its size, not JSON: not verified here
    tee = tmp_path / "tee"
    tee.mkdir()
    pool = HostBufferPool()
    with pytest.raises(ValueError):  # json's, through AutoTokenizer
        load_model(folder, tier="sharedfs", verify=False, pool=pool, tee_into=tee)
    stats = pool.stats()
    assert stats.buffers > 0 and stats.buffers == stats.free_buffers
