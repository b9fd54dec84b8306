"""Strip hashes: checksums fine enough that a tensor-parallel rank can verify just the slices it reads.

The manifest's per-chunk checksums (16 MiB chunks) cover whole file ranges: a rank reading half of every tensor
would have to read every chunk to check them, i.e. the whole model. `slice-hashes.json` adds, for every tensor
and for each of its first two dimensions, the xxh3_64 of each of S equal *strips* along that dimension, where S is
the largest power of two <= 64 dividing the dimension's size. A strip along dim 0 is a contiguous byte range; a
strip along dim 1 is the C-contiguous copy of `tensor[:, a:b]` (row pieces concatenated in row order).

Any TP degree that divides S cuts tensors exactly at strip boundaries, so a rank verifies its slice by hashing the
strips it holds: no extra bytes read, and the hashes do not depend on the degree (one checkpoint, any degree up
to 64). Other degrees read the strips covering their slice (a little more than their share) and still verify.
Cost: one hash per strip, <= 64 per dimension: ~1.5 KB of JSON per tensor, well under 1 MB for a 7B model; it is
computed once (at conversion, or by `hpcllm checkpoint add-slice-hashes` for an existing checkpoint) by hashing
each tensor once more (xxh3 runs at several GB/s). Finer strips would serve larger degrees with no overread at
the price of a larger file; 64 covers one node and more.

The file is an additive, optional part of format version 1: manifest.json gains `slice_hashes: {file, size,
xxh3_64}` (version-1 readers ignore unknown fields), so index.json and the data files stay unchanged.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcllm.checkpoint.errors import ChecksumMismatch, InvalidManifest
from hpcllm.checkpoint.layout import (
    CHECKSUM_ALGORITHM,
    INDEX_FILE,
    MANIFEST_FILE,
    SLICE_HASHES_FIELD,
    SLICE_HASHES_FILE,
    Checkpoint,
    TensorEntry,
    checksum,
    is_checksum,
    read_checkpoint,
)

MAX_STRIPS = 64
HASHED_DIMS = (0, 1)


def strip_count(size: int) -> int:
    """The largest power of two <= MAX_STRIPS that divides `size` (1 for odd sizes)."""
    count = 1
    while count * 2 <= MAX_STRIPS and size % (count * 2) == 0:
        count *= 2
    return count


def as_3d(array: np.ndarray, shape: tuple[int, ...], dim: int) -> np.ndarray:
    """A byte array of a C-contiguous tensor of `shape` viewed as [outer, shape[dim], inner bytes]."""
    outer = int(np.prod(shape[:dim], dtype=np.int64)) if dim else 1
    return array.reshape(outer, shape[dim], -1)


def hash_strips(view3d: np.ndarray, strip_len: int) -> list[str]:
    """Hashes of consecutive strips of `strip_len` along axis 1 of a [outer, n, inner] byte array."""
    hashes = []
    for start in range(0, view3d.shape[1], strip_len):
        strip = view3d[:, start:start + strip_len]
        hashes.append(checksum(np.ascontiguousarray(strip)))  # a copy only for dim-1 strips
    return hashes


@dataclass(frozen=True)
class StripTable:
    """Expected strip hashes of one tensor along one dimension."""

    strips: int
    hashes: tuple[str, ...]


SliceHashes = dict[str, dict[int, StripTable]]  # stored tensor name -> dim -> table


def _hashed_dims(entry: TensorEntry) -> dict[int, int]:
    """The dims of a tensor that have strip hashes, with their strip counts (none for scalars and empty tensors)."""
    if not entry.shape or entry.nbytes == 0:
        return {}
    return {dim: strip_count(entry.shape[dim]) for dim in HASHED_DIMS[:len(entry.shape)]}


def compute_slice_hashes(ckpt: Checkpoint) -> dict[str, Any]:
    """The slice-hashes document of a checkpoint (reads every tensor once; call on verified data)."""
    maps = {p.index: np.memmap(p.path, dtype=np.uint8, mode="r") for p in ckpt.partitions if p.size}
    tensors: dict[str, Any] = {}
    for name, entry in ckpt.tensors.items():
        dims = _hashed_dims(entry)
        if not dims:
            continue
        data = maps[entry.partition][entry.offset:entry.offset + entry.nbytes]
        tensors[name] = {}
        for dim, strips in dims.items():
            view = as_3d(data, entry.shape, dim)
            tensors[name][str(dim)] = {"strips": strips,
                                       "xxh3_64": hash_strips(view, entry.shape[dim] // strips)}
    return {"format_version": 1, "algorithm": CHECKSUM_ALGORITHM, "max_strips": MAX_STRIPS, "tensors": tensors}


def write_slice_hashes(root: str | os.PathLike, verify: bool = True) -> Path:
    """Add slice-hashes.json to a converted checkpoint and record it in manifest.json (both written atomically).

    With verify (the default) every data chunk is checked against the manifest first, so the strip hashes are
    hashes of verified bytes.
    """
    ckpt = read_checkpoint(root)
    if verify:
        ckpt.verify_files(slice_hashes=False)  # a broken slice-hashes.json is what this replaces
    document = json.dumps(compute_slice_hashes(ckpt), separators=(",", ":")).encode()
    _atomic_write(ckpt.root / SLICE_HASHES_FILE, document)
    manifest = dict(ckpt.manifest)
    manifest[SLICE_HASHES_FIELD] = {"file": SLICE_HASHES_FILE, "size": len(document), "xxh3_64": checksum(document)}
    _atomic_write(ckpt.root / MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode())
    return ckpt.root / SLICE_HASHES_FILE


def read_slice_hashes(ckpt: Checkpoint) -> SliceHashes | None:
    """The strip hashes of a checkpoint, checked against the manifest; None when it has none (converted before
    they existed: add them with `hpcllm checkpoint add-slice-hashes`)."""
    data = ckpt.slice_hashes_bytes()
    if data is None:
        return None
    path = ckpt.root / SLICE_HASHES_FILE
    try:
        document = json.loads(data)
        hashes = {name: {int(dim): StripTable(int(t["strips"]), tuple(t["xxh3_64"])) for dim, t in dims.items()}
                  for name, dims in document["tensors"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        raise InvalidManifest(f"{path}: malformed ({exc!r})") from None
    _check_tables(ckpt, hashes, path)
    return hashes


def _check_tables(ckpt: Checkpoint, hashes: SliceHashes, path: Path) -> None:
    """InvalidManifest unless `hashes` holds exactly the tables compute_slice_hashes writes for the index: a rank
    divides by the strip count and indexes the hashes, and a tensor without its tables would go unverified."""
    expected = {name: dims for name, entry in ckpt.tensors.items() if (dims := _hashed_dims(entry))}
    for name in sorted(set(expected) | set(hashes)):
        tables = hashes.get(name, {})
        for dim in sorted(set(expected.get(name, {})) | set(tables)):
            strips, table = expected.get(name, {}).get(dim), tables.get(dim)
            if (table is None or table.strips != strips or len(table.hashes) != strips
                    or not all(is_checksum(h) for h in table.hashes)):
                wanted = f"{strips} strips of xxh3_64 digests" if strips else f"{INDEX_FILE} has no such tensor dim"
                raise InvalidManifest(f"{path}: the strip hashes of tensor {name[:200]!r} along dim {dim} do not fit "
                                      f"{INDEX_FILE} (expected: {wanted}); re-run `hpcllm checkpoint "
                                      f"add-slice-hashes {ckpt.root}`")


def strip_span(table: StripTable, size: int, start: int, stop: int) -> tuple[int, int]:
    """The strip-aligned index range [a, b) covering [start, stop) of a dimension of `size`."""
    strip_len = size // table.strips
    return start // strip_len * strip_len, -(-stop // strip_len) * strip_len


def verify_strips(name: str, entry: TensorEntry, table: StripTable, dim: int, covered: np.ndarray, first: int,
                  where: str) -> None:
    """Check the strips held in `covered` (bytes shaped [outer, n, inner] along `dim`, starting at strip-aligned
    index `first`) against the expected hashes; ChecksumMismatch names the tensor, strip and file."""
    strip_len = entry.shape[dim] // table.strips
    first_strip = first // strip_len
    for offset, actual in enumerate(hash_strips(covered, strip_len)):
        index = first_strip + offset
        if actual != table.hashes[index]:
            raise ChecksumMismatch(
                f"{where}: tensor {name} strip {index}/{table.strips} along dim {dim} is corrupt: xxh3_64 {actual}, "
                f"{SLICE_HASHES_FILE} says {table.hashes[index]}; re-copy or re-convert the checkpoint"
            )


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    f = open(tmp, "wb")  # nothing to remove if this fails (and on a read-only FS, removing would fail too)
    try:
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
