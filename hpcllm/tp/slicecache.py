"""Slice copies: one tensor-parallel rank's slices of a checkpoint, kept on the node whose rank reads them.

A slice copy is a folder (the node cache makes it, under a fill name, and renames it into place only once it
verified: hpcllm.node.cache.CacheManager.warm_slices) holding

    slices.bin    every strip-aligned piece the rank reads (hpcllm.tp.reader's covered pieces: its slice widened to
                  whole strips, so the strip hashes verify it), each stored C-contiguous as [outer, b - a, inner]
                  starting on a 4 KiB page, so each is ONE contiguous read (O_DIRECT on node-local disk);
    slices.json   which piece lies where: tensor, dim, [a, b), offset, length; the degree and rank; the xxh3_64 of
                  the origin's manifest.json (a copy of another version of the checkpoint is never used).

The layout is what keeps dim-1 (row-parallel: o_proj, down_proj) slices cheap: in the origin's row-major files a
rank's dim-1 share is one short range per row (read whole tensors, or one request per row), in its slice copy it
is one contiguous range. The origin is never re-converted: the copy is a cache of one (degree, rank), written by
`hpcllm cache warm MODEL --tensor-parallel N` from the same checkpoint every degree uses.

The metadata (manifest, index, strip hashes, config, tokenizer) is read from the origin as before; a rank reads
from its copy what the copy holds and everything else from the origin (a copy of another bcast split, a tensor
added since). Every piece read from the copy is verified with the origin's strip hashes at every load.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcllm.checkpoint import CheckpointError, InvalidManifest, read_checkpoint
from hpcllm.checkpoint.layout import ALIGNMENT, MANIFEST_FILE, checksum
from hpcllm.checkpoint.slicehashes import read_slice_hashes
from hpcllm.store.readers import FileReader

log = logging.getLogger(__name__)

SLICES_DATA = "slices.bin"
SLICES_INDEX = "slices.json"
FORMAT_VERSION = 1


class OriginUnreadable(CheckpointError):
    """The origin a slice copy is checked against (manifest, strip hashes, config) cannot be read: the copy is not
    found corrupt, only not checked (the shared filesystem away, the checkpoint moved or damaged)."""


def manifest_fingerprint(root: str | os.PathLike) -> str:
    """xxh3_64 of a checkpoint's manifest.json: it names every data file's checksums, so it identifies the version."""
    return checksum((Path(root) / MANIFEST_FILE).read_bytes())


@dataclass(frozen=True)
class SlicePiece:
    tensor: str
    dim: int
    a: int
    b: int
    offset: int
    length: int


@dataclass(frozen=True)
class SliceCopy:
    root: Path
    degree: int
    rank: int
    manifest_xxh3: str
    pieces: dict[tuple[str, int, int, int], SlicePiece]

    @property
    def data_path(self) -> Path:
        return self.root / SLICES_DATA

    @property
    def nbytes(self) -> int:
        return sum(p.length for p in self.pieces.values())

    def piece_for(self, covered) -> SlicePiece | None:
        """The stored piece holding exactly this covered piece (hpcllm.tp.reader._Covered), if any."""
        piece = self.pieces.get((covered.entry.name, covered.dim, covered.a, covered.b))
        return piece if piece is not None and piece.length == covered.data.nbytes else None

    def read_into(self, covered: list, stats) -> None:
        """Fill each covered piece's buffer from the copy: one page-aligned read per piece."""
        from hpcllm.store.readers import page_aligned_buffer
        from hpcllm.tp.reader import reader_mode

        mode = reader_mode(self.root)
        with FileReader(self.data_path, mode) as reader:
            for c in covered:
                piece = self.piece_for(c)
                padded = -(-piece.length // ALIGNMENT) * ALIGNMENT
                with page_aligned_buffer(max(padded, ALIGNMENT)) as view:
                    reader.read_into(piece.offset, view[:padded] if padded else view[:ALIGNMENT], piece.length)
                    data = np.frombuffer(view, dtype=np.uint8, count=piece.length)
                    c.data.reshape(-1)[:] = data
                    del data
                stats.bytes_read += padded
                stats.reads += 1
                stats.cache_bytes += padded
                stats.cache_reads += 1


def open_slice_copy(folder: str | os.PathLike) -> SliceCopy:
    """The slice copy in `folder`; InvalidManifest when its index is missing or malformed."""
    folder = Path(folder)
    path = folder / SLICES_INDEX
    try:
        document = json.loads(path.read_text())
        if document.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {document.get('format_version')!r}, expected {FORMAT_VERSION}")
        pieces = {}
        for p in document["pieces"]:
            piece = SlicePiece(str(p["tensor"]), int(p["dim"]), int(p["a"]), int(p["b"]), int(p["offset"]),
                               int(p["length"]))
            pieces[(piece.tensor, piece.dim, piece.a, piece.b)] = piece
        return SliceCopy(folder, int(document["degree"]), int(document["rank"]), str(document["manifest_xxh3"]),
                         pieces)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidManifest(f"{path}: not a readable slice copy ({exc}); evict it (hpcllm cache evict) and warm "
                              f"it again") from None


def usable_slice_copy(folder: str | os.PathLike | None, degree: int, rank: int, fingerprint: str) -> SliceCopy | None:
    """The slice copy in `folder` if it was made for this degree, rank and checkpoint version; else None (logged:
    the rank then reads everything from the origin)."""
    if folder is None or not Path(folder).is_dir():
        return None
    try:
        copy = open_slice_copy(folder)
    except InvalidManifest as exc:
        log.warning("rank %d ignores its slice copy: %s", rank, exc)
        return None
    if (copy.degree, copy.rank) != (degree, rank):
        log.warning("rank %d of %d ignores the slice copy %s: it holds rank %d of %d", rank, degree, folder,
                    copy.rank, copy.degree)
        return None
    if copy.manifest_xxh3 != fingerprint:
        log.warning("rank %d ignores the slice copy %s: it was made from another version of the checkpoint", rank,
                    folder)
        return None
    return copy


def _rank_plan(origin: str | os.PathLike, degree: int, rank: int):
    """(checkpoint, strip hashes, the slices rank `rank` of `degree` reads itself) of the checkpoint at `origin`."""
    from transformers import AutoConfig

    from hpcllm.tp.plan import rank_slices
    from hpcllm.tp.plan import check_degree

    ckpt = read_checkpoint(origin)
    try:
        config = AutoConfig.from_pretrained(str(ckpt.root))
    except (OSError, ValueError, KeyError) as exc:  # config.json gone, or not a model's config
        raise CheckpointError(f"cannot read {ckpt.config_path}: {exc}") from None
    check_degree(config, degree)
    if not 0 <= rank < degree:
        raise ValueError(f"rank {rank} is outside a degree-{degree} group")
    hashes = read_slice_hashes(ckpt)
    if hashes is None:
        raise InvalidManifest(f"{ckpt.root}: has no slice hashes, so slice copies cannot be verified; add them with "
                              f"`hpcllm checkpoint add-slice-hashes {ckpt.root}`")
    return ckpt, hashes, rank_slices(ckpt, config, degree, rank)[0]


def planned_copy_bytes(origin: str | os.PathLike, degree: int, rank: int) -> int:
    """Bytes rank `rank` of `degree`'s slice copy of the checkpoint at `origin` takes (what a fill reserves)."""
    from hpcllm.tp.reader import _cover

    ckpt, hashes, own = _rank_plan(origin, degree, rank)
    covered, _ = _cover(ckpt, own, hashes, True)
    return sum(-(-math.prod(c.shape3d) // ALIGNMENT) * ALIGNMENT for c in covered) + 64 * 1024  # + slices.json


def verify_slice_copy(origin: str | os.PathLike, folder: str | os.PathLike) -> SliceCopy:
    """Re-read every piece of the slice copy in `folder` and check it with the strip hashes of the checkpoint at
    `origin`. ChecksumMismatch names the tensor and strip; InvalidManifest when it was made from another version
    of the checkpoint or misses a piece; OriginUnreadable when what checks it cannot be read from the origin."""
    from hpcllm.tp.reader import read_covered

    if origin is None:
        raise InvalidManifest(f"{folder}: the slice copy's origin is unknown; evict it and warm it again")
    copy = open_slice_copy(folder)
    try:
        ckpt, hashes, own = _rank_plan(origin, copy.degree, copy.rank)
        fingerprint = manifest_fingerprint(ckpt.root)
    except (OSError, CheckpointError) as exc:
        raise OriginUnreadable(f"its origin {origin}, whose strip hashes check it, cannot be read: {exc}") from None
    if copy.manifest_xxh3 != fingerprint:
        raise InvalidManifest(f"{folder}: made from another version of {ckpt.root}")
    _, _, stats = read_covered(ckpt, own, hashes, local=copy)
    if stats.reads != stats.cache_reads:
        raise InvalidManifest(f"{folder}: misses {stats.reads - stats.cache_reads} piece(s) of rank {copy.rank} of "
                              f"{copy.degree}'s slices")
    return copy


def write_slice_copy(origin: str | os.PathLike, degree: int, rank: int, dest: str | os.PathLike) -> SliceCopy:
    """Write rank `rank` of `degree`'s slices of the checkpoint at `origin` into the (existing, empty) folder `dest`.

    The pieces are read from the origin and verified with its strip hashes, written and fsynced, then read back
    from `dest` and verified again. Raises ChecksumMismatch (origin or written copy), InvalidManifest (no strip
    hashes: `hpcllm checkpoint add-slice-hashes`), TensorParallelError (the degree does not split the model)."""
    from hpcllm.tp.reader import read_covered

    dest = Path(dest)
    ckpt, hashes, own = _rank_plan(origin, degree, rank)
    covered, _, _ = read_covered(ckpt, own, hashes)  # InvalidManifest without strip hashes
    pieces = []
    offset = 0
    with open(dest / SLICES_DATA, "wb") as out:
        for c in sorted(covered, key=lambda c: (c.entry.name, c.dim, c.a)):
            out.write(c.data.tobytes())
            pieces.append({"tensor": c.entry.name, "dim": c.dim, "a": c.a, "b": c.b, "offset": offset,
                           "length": c.data.nbytes})
            end = offset + c.data.nbytes
            offset = -(-end // ALIGNMENT) * ALIGNMENT
            out.write(b"\0" * (offset - end))  # the next piece starts on a page; the last one's read stays inside
        out.flush()
        os.fsync(out.fileno())
    document = {"format_version": FORMAT_VERSION, "degree": degree, "rank": rank,
                "manifest_xxh3": manifest_fingerprint(ckpt.root), "source": str(ckpt.root), "pieces": pieces}
    with open(dest / SLICES_INDEX, "w") as out:
        json.dump(document, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    copy = open_slice_copy(dest)
    _, _, stats = read_covered(ckpt, own, hashes, local=copy)  # read back what was written; verified strip by strip
    if stats.cache_reads != len(covered) or stats.reads != stats.cache_reads:
        raise InvalidManifest(f"{dest}: the written slice copy does not hold every piece of rank {rank} of {degree}")
    return copy


__all__ = ["SliceCopy", "SlicePiece", "manifest_fingerprint", "open_slice_copy", "planned_copy_bytes",
           "OriginUnreadable", "usable_slice_copy", "verify_slice_copy", "write_slice_copy"]
