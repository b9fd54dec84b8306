"""The validating reader: a checkpoint of many dtypes reads back; each kind of damage gets its own clear error."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hpcllm.checkpoint import (
    ChecksumMismatch,
    InvalidIndex,
    InvalidManifest,
    MissingFile,
    NotAConvertedCheckpoint,
    OffsetOutOfRange,
    TruncatedFile,
    UnsupportedDtype,
    UnsupportedFormatVersion,
    read_checkpoint,
)
from hpcllm.checkpoint.layout import MAX_CHUNK_SIZE, checksum, contiguous_stride, file_chunk_checksums
from hpcllm.checkpoint.slicehashes import write_slice_hashes
from hpcllm.checkpoint.tests.conftest import read_raw, same_bits, write_checkpoint

CHUNK = 8192


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(64, 48, generator=g).to(torch.bfloat16),
        "proj.weight": torch.randn(40, 24, generator=g),
        "proj.bias": torch.randn(24, generator=g).to(torch.float16),
        "scale": torch.tensor(0.5),
        "positions": torch.arange(100),
        "mask": torch.tensor([True, False, True]),
        "fp8.weight": torch.randn(16, 16, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 7),
    }


@pytest.fixture(scope="module")
def mixed_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    return write_checkpoint(mixed_tensors(), root / "ckpt", partitions=2, chunk_size=CHUNK,
                            side_files={"tokenizer.json": '{"vocab": {}}'})


@pytest.fixture
def ckpt_copy(mixed_checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(mixed_checkpoint, tmp_path / "ckpt"))


def test_every_dtype_round_trips(mixed_checkpoint):
    ckpt = read_checkpoint(mixed_checkpoint)
    assert ckpt.format_version == 1
    for name, tensor in mixed_tensors().items():
        entry = ckpt.tensors[name]
        assert entry.dtype == str(tensor.dtype).removeprefix("torch.")
        assert entry.stride == contiguous_stride(entry.shape) == tensor.stride()
        assert same_bits(read_raw(ckpt, entry), tensor), name
    assert ckpt.total_bytes == sum(p.stat().st_size for p in mixed_checkpoint.glob("data-*.h5"))


def test_verify_chunk_accepts_bytes_numpy_and_torch_buffers(mixed_checkpoint):
    ckpt = read_checkpoint(mixed_checkpoint)
    assert any(p.num_chunks > 1 for p in ckpt.partitions)
    for partition in ckpt.partitions:
        data = partition.path.read_bytes()
        for chunk in range(partition.num_chunks):
            start, length = partition.chunk_range(chunk)
            piece = data[start:start + length]
            ckpt.verify_chunk(partition.index, chunk, piece)
            ckpt.verify_chunk(partition.index, chunk, np.frombuffer(piece, dtype=np.uint8))
            ckpt.verify_chunk(partition.index, chunk, torch.frombuffer(bytearray(piece), dtype=torch.uint8))


def test_verify_chunk_names_file_and_chunk_on_a_flipped_byte(mixed_checkpoint):
    ckpt = read_checkpoint(mixed_checkpoint)
    partition = ckpt.partitions[0]
    start, length = partition.chunk_range(1)
    piece = bytearray(partition.path.read_bytes()[start:start + length])
    piece[17] ^= 0x01
    with pytest.raises(ChecksumMismatch, match=rf"{partition.file}: chunk 1 "):
        ckpt.verify_chunk(0, 1, piece)
    with pytest.raises(ChecksumMismatch, match="expected"):
        ckpt.verify_chunk(0, 1, piece[:-1])
    with pytest.raises(OffsetOutOfRange):
        ckpt.verify_chunk(0, partition.num_chunks, b"")
    with pytest.raises(OffsetOutOfRange):
        ckpt.verify_chunk(len(ckpt.partitions), 0, b"")


def test_verify_files_finds_a_flipped_byte_in_data(ckpt_copy):
    ckpt = read_checkpoint(ckpt_copy)
    entry = ckpt.tensors["embed.weight"]
    path = ckpt.partitions[entry.partition].path
    with open(path, "r+b") as f:
        f.seek(entry.offset + 5)
        byte = f.read(1)
        f.seek(entry.offset + 5)
        f.write(bytes([byte[0] ^ 0x80]))
    ckpt.check_files_present()  # same size: only the checksum can tell
    with pytest.raises(ChecksumMismatch, match=path.name):
        ckpt.verify_files()


def test_verify_files_finds_a_modified_side_file(ckpt_copy):
    (ckpt_copy / "tokenizer.json").write_text('{"vocab": {"x": 1}}')
    with pytest.raises((ChecksumMismatch, TruncatedFile), match="tokenizer.json"):
        read_checkpoint(ckpt_copy).verify_files()


@pytest.mark.parametrize("damage", [lambda path: path.write_text("garbage\n"), Path.unlink])
def test_verify_files_checks_the_slice_hashes_the_manifest_lists(ckpt_copy, damage):
    # Tensor-parallel ranks verify their slices against this file: a broken one must not pass verification.
    damage(ckpt_copy / "slice-hashes.json")
    with pytest.raises((ChecksumMismatch, MissingFile), match="slice-hashes.json"):
        read_checkpoint(ckpt_copy).verify_files()
    write_slice_hashes(ckpt_copy)  # the repair (`hpcllm checkpoint add-slice-hashes`) still runs
    read_checkpoint(ckpt_copy).verify_files()


def test_chunk_checksums_never_buffer_more_than_the_file(ckpt_copy):
    # A chunk size far beyond the file (a manifest's, or --chunk-size-mib) once allocated a whole chunk.
    path = read_checkpoint(ckpt_copy).partitions[0].path
    tracemalloc.start()
    try:
        sums = file_chunk_checksums(path, 1 << 40)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sums == [checksum(path.read_bytes())] and peak < 2 * path.stat().st_size
    assert file_chunk_checksums(path, 4096) == [checksum(piece) for piece in chunks_of(path.read_bytes(), 4096)]


def chunks_of(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_truncated_and_missing_data_files(ckpt_copy):
    ckpt = read_checkpoint(ckpt_copy)
    path = ckpt.partitions[1].path
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(TruncatedFile, match=path.name):
        ckpt.check_files_present()
    with pytest.raises(TruncatedFile, match=path.name):
        ckpt.verify_files()
    path.unlink()
    with pytest.raises(MissingFile, match=path.name):
        ckpt.check_files_present()


def test_hf_folder_is_not_a_converted_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(NotAConvertedCheckpoint, match="hpcllm convert"):
        read_checkpoint(tmp_path)
    with pytest.raises(MissingFile, match="no such checkpoint folder"):
        read_checkpoint(tmp_path / "absent")


def test_a_file_is_not_a_checkpoint_folder(tmp_path):
    # Not "no such checkpoint folder": the file is there, it is just not a folder.
    (tmp_path / "model.tar").write_text("x")
    with pytest.raises(NotAConvertedCheckpoint, match="model.tar: is not a folder"):
        read_checkpoint(tmp_path / "model.tar")


def test_index_edited_without_the_manifest_is_detected(ckpt_copy):
    index = json.loads((ckpt_copy / "index.json").read_text())
    index["aliases"]["extra"] = "scale"
    (ckpt_copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(ChecksumMismatch, match="index.json"):
        read_checkpoint(ckpt_copy)


def rewrite_index(root: Path, index: dict) -> None:
    """Write index.json and update the manifest's checksum of it, so validation of the contents is reached."""
    data = json.dumps(index).encode()
    (root / "index.json").write_bytes(data)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["index"].update(size=len(data), xxh3_64=checksum(data))
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, error, message", [
    (lambda e: e.update(offset=e["offset"] + 1), InvalidIndex, "aligned"),
    (lambda e: e.update(offset=1 << 50), OffsetOutOfRange, "outside"),
    (lambda e: e.update(nbytes=e["nbytes"] * 2), InvalidIndex, "nbytes"),
    (lambda e: e.update(shape=[10**12, 10**12]), InvalidIndex, "nbytes"),
    (lambda e: e.update(stride=[1, 64]), InvalidIndex, "stride"),
    (lambda e: e.update(dtype="float128"), UnsupportedDtype, "float128"),
    (lambda e: e.update(partition=7), InvalidIndex, "partition 7"),
    (lambda e: e.update(shape="64x48"), InvalidIndex, "shape"),
    (lambda e: e.pop("dtype"), InvalidIndex, "dtype"),
])
def test_bad_index_entries(ckpt_copy, change, error, message):
    index = json.loads((ckpt_copy / "index.json").read_text())
    change(index["tensors"]["embed.weight"])
    rewrite_index(ckpt_copy, index)
    with pytest.raises(error, match=message):
        read_checkpoint(ckpt_copy)


def test_overlapping_tensors_and_dangling_aliases(ckpt_copy):
    index = json.loads((ckpt_copy / "index.json").read_text())
    original = json.loads(json.dumps(index))
    index["aliases"]["lm_head.weight"] = "missing.weight"
    rewrite_index(ckpt_copy, index)
    with pytest.raises(InvalidIndex, match="missing.weight"):
        read_checkpoint(ckpt_copy)
    index = original
    a, b = index["tensors"]["embed.weight"], index["tensors"]["proj.weight"]
    b.update(partition=a["partition"], offset=a["offset"])
    rewrite_index(ckpt_copy, index)
    with pytest.raises((InvalidIndex, OffsetOutOfRange)):
        read_checkpoint(ckpt_copy)


@pytest.mark.parametrize("change, error, message", [
    (lambda m: m.update(format_version=2), UnsupportedFormatVersion, "format_version 2"),
    (lambda m: m.update(format_version="1"), InvalidManifest, "format_version"),
    (lambda m: m.update(format="safetensors"), NotAConvertedCheckpoint, "not an hpcllm checkpoint"),
    (lambda m: m["partitions"][0].update(file="../../etc/passwd"), InvalidManifest, "plain file name"),
    (lambda m: m["partitions"][0]["checksums"].pop(), InvalidManifest, "checksums"),
    (lambda m: m["partitions"][0].update(size=-1), InvalidManifest, ">= 0"),
    (lambda m: m["partitions"][0].update(chunk_size=0), InvalidManifest, "chunk_size"),
    (lambda m: m.pop("partitions"), InvalidManifest, "partitions"),
    (lambda m: m.update(checksum_algorithm="md5"), InvalidManifest, "md5"),
])
def test_bad_manifests(ckpt_copy, change, error, message):
    manifest = json.loads((ckpt_copy / "manifest.json").read_text())
    change(manifest)
    (ckpt_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(error, match=message):
        read_checkpoint(ckpt_copy)


def test_a_chunk_size_beyond_what_readers_hold_is_refused(ckpt_copy):
    # Readers hold whole chunks: a node cache copy allocated a buffer of it (16 TiB: OSError ENOMEM, not a
    # CheckpointError), a GPU load pinned staging slots of it.
    manifest = json.loads((ckpt_copy / "manifest.json").read_text())
    part = manifest["partitions"][0]
    part["chunk_size"] = 1 << 44
    part["checksums"] = file_chunk_checksums(ckpt_copy / part["file"], part["chunk_size"])  # consistent otherwise
    (ckpt_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidManifest, match=f"chunk_size {1 << 44} must be .* to {MAX_CHUNK_SIZE}"):
        read_checkpoint(ckpt_copy)


def test_manifest_that_is_not_json(ckpt_copy):
    (ckpt_copy / "manifest.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(InvalidManifest, match="manifest.json"):
        read_checkpoint(ckpt_copy)


def test_missing_index(ckpt_copy):
    (ckpt_copy / "index.json").unlink()
    with pytest.raises(MissingFile, match="index.json"):
        read_checkpoint(ckpt_copy)
