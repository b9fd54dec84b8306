"""Writing the format: partition planning, aligned HDF5 data files, index.json and manifest.json.

The converter decides *what* to store (which tensors, which are aliases, in which dtype); this module decides
*where*: it balances bytes over partitions, writes each partition as an HDF5 file whose datasets are contiguous
and 4096-aligned, records every dataset's file offset, and checksums the finished files chunk by chunk.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from hpcllm.checkpoint.errors import CheckpointError
from hpcllm.checkpoint.layout import (
    ALIGNMENT,
    CHECKSUM_ALGORITHM,
    DTYPE_ITEMSIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST_FILE,
    NUMPY_NATIVE_DTYPES,
    Partition,
    SideFile,
    TensorEntry,
    checksum,
    contiguous_stride,
    dtype_name,
    file_checksum,
    file_chunk_checksums,
    partition_file_name,
)

# Attributes on every dataset so any HDF5 tool can interpret the bytes (raw datasets need them).
ATTR_TORCH_DTYPE = "torch_dtype"
ATTR_SHAPE = "shape"
ATTR_STORAGE = "storage"  # "native": the HDF5 type is the tensor's; "raw": uint8 bytes of a dtype HDF5 lacks


@dataclass(frozen=True)
class TensorSpec:
    """What the writer needs to know about one tensor before fetching its data."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_ITEMSIZE[self.dtype]


def assign_partitions(specs: list[TensorSpec], num_partitions: int) -> list[list[TensorSpec]]:
    """Spread tensors over partitions so their byte totals are as even as possible.

    Largest-first onto the lightest partition (LPT), then each partition keeps the source order, so a partition
    reads like a slice of the model. Never more partitions than tensors (no empty data files).
    """
    count = max(1, min(num_partitions, len(specs)))
    order = {spec.name: i for i, spec in enumerate(specs)}
    bins: list[list[TensorSpec]] = [[] for _ in range(count)]
    loads = [0] * count
    for spec in sorted(specs, key=lambda s: (-s.nbytes, order[s.name])):
        lightest = min(range(count), key=lambda i: (loads[i], i))
        bins[lightest].append(spec)
        loads[lightest] += spec.nbytes
    return [sorted(b, key=lambda s: order[s.name]) for b in bins]


def write_partition(
    path: Path,
    specs: list[TensorSpec],
    fetch: Callable[[str], torch.Tensor],
    partition_index: int,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> dict[str, TensorEntry]:
    """Write one HDF5 data file with every tensor contiguous at a 4096-aligned offset; return their index entries.

    HDF5 only lays the file out (_lay_out); the tensors' bytes are then written into their places with plain writes.
    A disk that fills up or a quota that runs out is then an OSError of ours: a write that fails inside HDF5 leaves
    the library unable to close the file, and the process dies of a segfault later (h5py 3.16).
    """
    offsets = _lay_out(path, specs)
    entries: dict[str, TensorEntry] = {}
    with open(path, "r+b") as f:
        for spec in specs:
            tensor = fetch(spec.name)
            if dtype_name(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise CheckpointError(f"tensor {spec.name!r} changed between planning and writing "
                                      f"({tensor.dtype} {tuple(tensor.shape)} vs {spec.dtype} {spec.shape})")
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            if data.nbytes:
                f.seek(offsets[spec.name])
                f.write(data)
            entries[spec.name] = TensorEntry(name=spec.name, partition=partition_index, offset=offsets[spec.name],
                                             nbytes=spec.nbytes, dtype=spec.dtype, shape=spec.shape,
                                             stride=contiguous_stride(spec.shape))
            on_bytes(data.nbytes)
            del tensor, data
        f.flush()
        os.fsync(f.fileno())
    return entries


def _lay_out(path: Path, specs: list[TensorSpec]) -> dict[str, int]:
    """Create the HDF5 file with one contiguous dataset per tensor, its space allocated now and never filled (HDF5
    writes only its metadata): {tensor name: file offset of its bytes}. A dtype HDF5 lacks (bfloat16, float8) is a
    flat uint8 dataset of the tensor's bytes ("raw" storage)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    dcpl.set_obj_track_times(False)  # no timestamps: the same tensors give the same file
    lcpl = h5py.h5p.create(h5py.h5p.LINK_CREATE)
    lcpl.set_create_intermediate_group(True)
    lcpl.set_char_encoding(h5py.h5t.CSET_UTF8)
    offsets: dict[str, int] = {}
    try:
        with h5py.File(path, "w", libver="latest", alignment_threshold=1, alignment_interval=ALIGNMENT) as f:
            for spec in specs:
                native = spec.dtype in NUMPY_NATIVE_DTYPES
                shape = spec.shape if native else (spec.nbytes,)
                space = h5py.h5s.create_simple(shape) if shape else h5py.h5s.create(h5py.h5s.SCALAR)
                kind = h5py.h5t.py_create(np.dtype(spec.dtype if native else np.uint8), logical=True)
                dataset = h5py.Dataset(h5py.h5d.create(f.id, spec.name.encode(), kind, space, dcpl=dcpl, lcpl=lcpl))
                dataset.attrs[ATTR_TORCH_DTYPE] = spec.dtype
                dataset.attrs[ATTR_SHAPE] = np.asarray(spec.shape, dtype=np.int64)
                dataset.attrs[ATTR_STORAGE] = "native" if native else "raw"
                offset = dataset.id.get_offset() if spec.nbytes else 0
                if offset is None or offset % ALIGNMENT:
                    raise CheckpointError(f"{path}: HDF5 placed {spec.name!r} at offset {offset}, not "
                                          f"{ALIGNMENT}-aligned contiguous storage (h5py {h5py.version.version})")
                offsets[spec.name] = int(offset)
    except (OSError, RuntimeError) as exc:  # HDF5 cannot write its metadata (disk full, quota): its text says why
        reason = re.search(r"error message = '([^']+)'", str(exc))
        why = reason.group(1) if reason else str(exc).strip().splitlines()[0]
        raise OSError(f"{path}: HDF5 cannot write it ({why})") from None
    return offsets


def finish_partition(path: Path, index: int, chunk_size: int) -> Partition:
    """Describe a written data file: its size and per-chunk checksums."""
    return Partition(index=index, file=path.name, path=path, size=path.stat().st_size, chunk_size=chunk_size,
                     checksums=file_chunk_checksums(path, chunk_size))


def write_index(out_dir: Path, entries: Iterable[TensorEntry], aliases: dict[str, str]) -> dict[str, Any]:
    """Write index.json; return the manifest's reference to it (file, size, checksum)."""
    index = {
        "format_version": FORMAT_VERSION,
        "tensors": {entry.name: entry.to_json() for entry in entries},
        "aliases": dict(sorted(aliases.items())),
    }
    data = json.dumps(index, indent=1).encode()
    _write_file(out_dir / INDEX_FILE, data)
    return {"file": INDEX_FILE, "size": len(data), "xxh3_64": checksum(data)}


def describe_side_file(path: Path) -> SideFile:
    return SideFile(file=path.name, size=path.stat().st_size, checksum=file_checksum(path))


def write_manifest(
    out_dir: Path,
    partitions: list[Partition],
    index_ref: dict[str, Any],
    side_files: list[SideFile],
    model: dict[str, Any],
    source: dict[str, Any],
) -> None:
    from hpcllm.version import __version__

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": f"hpcllm {__version__}",
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "alignment": ALIGNMENT,
        "model": model,
        "source": source,
        "total_bytes": sum(p.size for p in partitions),
        "partitions": [
            {"index": p.index, "file": p.file, "size": p.size, "chunk_size": p.chunk_size, "checksums": p.checksums}
            for p in partitions
        ],
        "index": index_ref,
        "side_files": [{"file": s.file, "size": s.size, "xxh3_64": s.checksum} for s in side_files],
    }
    _write_file(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())


def partition_path(out_dir: Path, index: int) -> Path:
    return out_dir / partition_file_name(index)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())

