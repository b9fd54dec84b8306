"""Read one rank's slices of a converted checkpoint, and verify them, without reading the rest.

A slice along dim d of a C-contiguous tensor, seen as [outer, size_d, inner], is one byte range per `outer` index:
one contiguous range for dim 0 (outer = 1), one per row for dim 1 of a matrix. The row ranges of a dim-1 slice
are short (a row's share: in_features / N elements) and as far apart as a whole row, so they are *coalesced*:
every range is widened to whole 4 KiB pages (O_DIRECT needs that, and the kernel reads whole pages anyway) and
ranges closer than `gap_bytes` are merged into one read, since one more request costs about as much as reading
~100 KiB here. A row share of at least a page is read at ~1/N of the tensor; a share much smaller than a page
makes the pages themselves shared between ranks, and the reader then reads (and discards) what is around it -
no row-major layout can avoid that, see docs/tensor-parallel.md.

Verification: every slice is widened to whole strips (hpcllm.checkpoint.slicehashes; a no-op when the degree
divides the strip count) and each strip's xxh3_64 is checked before the slice is used. Reads go through
hpcllm.store.readers.FileReader (O_DIRECT on node-local disk, buffered on shared filesystems, tmpfs and files in
the page cache), two threads at a time.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcllm.checkpoint import Checkpoint, TensorEntry
from hpcllm.checkpoint.layout import ALIGNMENT
from hpcllm.checkpoint.slicehashes import SliceHashes, StripTable, as_3d, strip_span, verify_strips
from hpcllm.store.readers import BUFFERED, ODIRECT, FileReader, page_aligned_buffer
from hpcllm.store.tiers import detect_tier, tier_settings
from hpcllm.tp.plan import TensorSlice

COALESCE_GAP_BYTES = 128 * 1024
MAX_SPAN_BYTES = 64 << 20
READ_THREADS = 2


@dataclass
class ReadStats:
    bytes_read: int = 0  # bytes the reads asked the files for (page-rounded, gaps included)
    bytes_kept: int = 0  # bytes of the slices themselves
    reads: int = 0
    cache_bytes: int = 0  # the part of bytes_read / reads served by the node's slice copy (hpcllm.tp.slicecache)
    cache_reads: int = 0
    strips_verified: int = 0
    seconds: float = 0.0
    reader_mode: str = ""
    fallback_reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"bytes_read": self.bytes_read, "bytes_kept": self.bytes_kept, "reads": self.reads,
                "cache_bytes": self.cache_bytes, "cache_reads": self.cache_reads,
                "strips_verified": self.strips_verified, "read_seconds": round(self.seconds, 4),
                "reader_mode": self.reader_mode}


@dataclass
class _Covered:
    """The strip-aligned piece of one stored tensor along one dim that is read and verified: [outer, b - a, inner]."""

    entry: TensorEntry
    dim: int
    a: int
    b: int
    table: StripTable | None
    shape3d: tuple[int, int, int]
    data: np.ndarray | None = None  # allocated when read


@dataclass(frozen=True)
class _Piece:
    file_offset: int
    length: int
    covered: _Covered
    outer: int  # which outer index of covered.data this piece fills


def read_slices(ckpt: Checkpoint, slices: list[TensorSlice], hashes: SliceHashes | None, *, tier: str | None = None,
                verify: bool = True, gap_bytes: int = COALESCE_GAP_BYTES, local=None) -> tuple[dict, ReadStats]:
    """{name: torch tensor of the slice's local shape} for `slices`, read and (with verify) checked strip by strip.

    `local` (a hpcllm.tp.slicecache.SliceCopy): this node's copy of the rank's slices; what it holds is read from it
    (one contiguous read per tensor), everything else from `ckpt`'s data files."""
    import torch

    started = time.perf_counter()
    covered, wanted, stats = read_covered(ckpt, slices, hashes, tier=tier, verify=verify, gap_bytes=gap_bytes,
                                          local=local)
    tensors = {}
    for piece, c in wanted:
        tensors[piece.name] = _local_tensor(torch, piece, c)
        stats.bytes_kept += tensors[piece.name].numel() * tensors[piece.name].element_size()
    stats.seconds = time.perf_counter() - started
    return tensors, stats


def read_covered(ckpt: Checkpoint, slices: list[TensorSlice], hashes: SliceHashes | None, *, tier: str | None = None,
                 verify: bool = True, gap_bytes: int = COALESCE_GAP_BYTES, local=None
                 ) -> tuple[list[_Covered], list[tuple[TensorSlice, _Covered]], ReadStats]:
    """Read (and with verify, check) the strip-aligned pieces covering `slices`: from `local` where it holds them,
    else from the checkpoint's files. Returns the pieces (with their bytes), which piece each slice is cut from,
    and the read statistics."""
    stats = ReadStats()
    if verify and hashes is None:
        from hpcllm.checkpoint import InvalidManifest

        raise InvalidManifest(f"{ckpt.root}: has no slice hashes, so tensor-parallel ranks cannot verify their "
                              f"slices; add them with `hpcllm checkpoint add-slice-hashes {ckpt.root}`")
    covered, wanted = _cover(ckpt, slices, hashes, verify)
    for c in covered:
        c.data = np.empty(c.shape3d, dtype=np.uint8)
    held = {id(c) for c in covered if local is not None and local.piece_for(c) is not None}
    mode = reader_mode(ckpt.root, tier)
    stats.reader_mode = mode
    _read_all(ckpt, [c for c in covered if id(c) not in held], mode, gap_bytes, stats)
    if held:
        local.read_into([c for c in covered if id(c) in held], stats)
    if verify:
        for c in covered:
            if c.table is not None and c.data.size:
                where = local.data_path if id(c) in held else ckpt.partitions[c.entry.partition].path
                verify_strips(c.entry.name, c.entry, c.table, c.dim, c.data, c.a, str(where))
                stats.strips_verified += (c.b - c.a) // (c.entry.shape[c.dim] // c.table.strips)
    return covered, wanted, stats


def planned_reads(ckpt: Checkpoint, slices: list[TensorSlice], hashes: SliceHashes | None, *, verify: bool = True,
                  gap_bytes: int = COALESCE_GAP_BYTES) -> tuple[int, int]:
    """(bytes, read requests) that read_slices would ask the files for, computed without reading anything (the
    same span planning): per-rank load estimates and `hpcllm tp plan`."""
    covered, _ = _cover(ckpt, slices, hashes, verify)
    nbytes = reads = 0
    for partition, pieces in _pieces_by_partition(covered).items():
        size = ckpt.partitions[partition].size
        for start, end, _ in _spans(pieces, gap_bytes, size):
            nbytes += min(end, size) - start
            reads += 1
    return nbytes, reads


def _cover(ckpt: Checkpoint, slices: list[TensorSlice], hashes: SliceHashes | None,
           verify: bool) -> tuple[list[_Covered], list[tuple[TensorSlice, _Covered]]]:
    """What to read for `slices`: each slice widened to whole strips (to verify them), a tensor that is also
    needed whole read once; and which covered piece each slice is cut from."""
    covered: dict[tuple, _Covered] = {}
    wanted: list[tuple[TensorSlice, _Covered]] = []
    whole = {s.stored for s in slices if s.dim is None}
    for piece in slices:
        dim = 0 if piece.dim is None or piece.stored in whole else piece.dim
        entry = ckpt.tensors[piece.stored]
        size = entry.shape[dim] if entry.shape else 1
        start, stop = (piece.start, piece.stop) if piece.dim is not None and piece.stored not in whole else (0, size)
        table = hashes.get(piece.stored, {}).get(dim) if hashes is not None and entry.shape else None
        a, b = strip_span(table, size, start, stop) if table is not None and verify else (start, stop)
        key = (piece.stored, dim, a, b)
        if key not in covered:
            covered[key] = _covered(entry, dim, a, b, table)
        wanted.append((piece, covered[key]))
    return list(covered.values()), wanted


def _covered(entry: TensorEntry, dim: int, a: int, b: int, table: StripTable | None) -> _Covered:
    if not entry.shape:  # a 0-d tensor: one "row" of itemsize bytes
        return _Covered(entry, 0, 0, 1, None, (1, 1, entry.itemsize))
    outer = math.prod(entry.shape[:dim])
    inner = math.prod(entry.shape[dim + 1:]) * entry.itemsize
    return _Covered(entry, dim, a, b, table, (outer, b - a, inner))


def _local_tensor(torch, piece: TensorSlice, c: _Covered):
    data = c.data
    if piece.dim is not None and (c.dim != piece.dim or c.a != piece.start or c.b != piece.stop):
        if c.dim == piece.dim:  # widened to whole strips for verification: keep the slice
            data = data[:, piece.start - c.a:piece.stop - c.a]
        else:  # the whole tensor was read (it is also used unsplit, e.g. a tied embedding): cut the slice out
            data = as_3d(data.reshape(-1), c.entry.shape, piece.dim)[:, piece.start:piece.stop]
    flat = torch.from_numpy(np.ascontiguousarray(data).reshape(-1))
    return flat.view(torch.uint8).view(_torch_dtype(torch, c.entry.dtype)).reshape(piece.local_shape)


def _torch_dtype(torch, name: str):
    return getattr(torch, name)


def reader_mode(root: Path, tier: str | None = None) -> str:
    reader = tier_settings(tier or detect_tier(root)).reader
    return ODIRECT if reader == ODIRECT else BUFFERED


def _pieces(c: _Covered) -> list[_Piece]:
    entry = c.entry
    if entry.nbytes == 0:
        return []
    outer, _, inner = c.shape3d
    size = entry.shape[c.dim] if entry.shape else 1
    return [_Piece(entry.offset + (o * size + c.a) * inner, (c.b - c.a) * inner, c, o) for o in range(outer)]


def _spans(pieces: list[_Piece], gap_bytes: int, file_size: int) -> list[tuple[int, int, list[_Piece]]]:
    """Page-aligned [start, end) file ranges covering the pieces, merged across gaps < gap_bytes."""
    spans: list[tuple[int, int, list[_Piece]]] = []
    for piece in sorted(pieces, key=lambda p: p.file_offset):
        start = piece.file_offset // ALIGNMENT * ALIGNMENT
        end = min(-(-(piece.file_offset + piece.length) // ALIGNMENT) * ALIGNMENT, -(-file_size // ALIGNMENT)
                  * ALIGNMENT)
        if spans and start - spans[-1][1] <= gap_bytes and end - spans[-1][0] <= MAX_SPAN_BYTES:
            first, last, members = spans[-1]
            spans[-1] = (first, max(last, end), members + [piece])
        else:
            spans.append((start, end, [piece]))
    return spans


def _pieces_by_partition(covered: list[_Covered]) -> dict[int, list[_Piece]]:
    by_partition: dict[int, list[_Piece]] = {}
    for c in covered:
        by_partition.setdefault(c.entry.partition, []).extend(_pieces(c))
    return by_partition


def _read_all(ckpt: Checkpoint, covered: list[_Covered], mode: str, gap_bytes: int, stats: ReadStats) -> None:
    by_partition = _pieces_by_partition(covered)
    jobs = []
    readers = []
    try:
        for index, pieces in by_partition.items():
            partition = ckpt.partitions[index]
            reader = FileReader(partition.path, mode, expected_size=partition.size)
            readers.append(reader)
            if reader.fallback_reason:
                stats.fallback_reasons.append(reader.fallback_reason)
            jobs += [(reader, partition.size, span) for span in _spans(pieces, gap_bytes, partition.size)]
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for nbytes in pool.map(lambda job: _read_span(*job), jobs):
                stats.bytes_read += nbytes
                stats.reads += 1
        if any(r.mode != mode for r in readers):
            stats.reader_mode = BUFFERED
    finally:
        for reader in readers:
            reader.close()


def _read_span(reader: FileReader, file_size: int, span: tuple[int, int, list[_Piece]]) -> int:
    start, end, pieces = span
    need = min(end, file_size) - start
    with page_aligned_buffer(end - start) as view:
        reader.read_into(start, view, need)
        data = np.frombuffer(view, dtype=np.uint8)
        for piece in pieces:
            begin = piece.file_offset - start
            piece.covered.data[piece.outer].reshape(-1)[:] = data[begin:begin + piece.length]
        del data
    return need
