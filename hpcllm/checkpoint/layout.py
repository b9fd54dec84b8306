"""The loading-optimized checkpoint format: constants, the in-memory description, and the validating reader.

A converted checkpoint is a folder (see docs/checkpoint-format.md):

    manifest.json      format name + version, partitions (file, size, chunk size, per-chunk xxh3_64), the
                       checksum of index.json, the copied side files with their checksums, model info
    index.json         tensors: name -> partition, offset, nbytes, dtype, shape, stride; aliases: name -> name
    data-00000.h5 ...  one HDF5 file per partition, every dataset contiguous and 4096-aligned
    config.json ...    side files copied from the HF folder

`read_checkpoint` parses and validates both JSON files without reading tensor data, so a loader can trust every
offset it gets: anything malformed becomes a CheckpointError subclass naming the file, never a KeyError or
TypeError deep in the loader. This module imports neither torch nor h5py (torch only inside `torch_dtype`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import xxhash

from hpcllm.checkpoint.errors import (
    ChecksumMismatch,
    CheckpointError,
    InvalidIndex,
    InvalidManifest,
    MissingFile,
    NotAConvertedCheckpoint,
    OffsetOutOfRange,
    TruncatedFile,
    UnsupportedDtype,
    UnsupportedFormatVersion,
)

FORMAT_NAME = "hpcllm-checkpoint"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = frozenset({1})
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.json"
# Optional strip hashes for tensor-parallel slice verification (hpcllm.checkpoint.slicehashes), listed in the
# manifest's "slice_hashes" field when present.
SLICE_HASHES_FILE = "slice-hashes.json"
SLICE_HASHES_FIELD = "slice_hashes"  # the manifest's record of it: {file, size, xxh3_64}
# O_DIRECT needs file offsets (and lengths) that are multiples of the logical block size; 4 KiB covers every
# device here and is the page size, so an aligned tensor can be read straight into a page-aligned buffer.
ALIGNMENT = 4096
DEFAULT_CHUNK_SIZE = 16 * 1024 * 1024
# Readers hold and verify whole chunks: every staging slot of a load (6 pinned ones per GPU load), the node cache's
# copy buffer and an MPI broadcast message is at least one chunk. Larger chunks only cost memory (the loader groups
# chunks into read units anyway); 256 MiB keeps a load's staging at 1.5 GiB.
MAX_CHUNK_SIZE = 256 * 1024 * 1024
CHECKSUM_ALGORITHM = "xxh3_64"

# torch dtype name -> bytes per element. Every dtype a transformers checkpoint realistically holds.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "complex128": 16,
    "complex64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
}
# Dtypes HDF5 / numpy store natively (same name in numpy). The rest are stored as uint8 bytes in the HDF5 file with
# the torch dtype in the dataset's "torch_dtype" attribute.
NUMPY_NATIVE_DTYPES = frozenset(
    {"float64", "float32", "float16", "complex128", "complex64", "int64", "int32", "int16", "int8",
     "uint64", "uint32", "uint16", "uint8", "bool"}
)
FLOATING_DTYPES = frozenset(
    {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
     "float8_e5m2fnuz", "float8_e8m0fnu"}
)

# dtypes `hpcllm convert --dtype` casts floating tensors to.
CONVERT_TARGET_DTYPES = ("float32", "float16", "bfloat16", "float64")

_HEX64 = re.compile(r"^[0-9a-f]{16}$")


def partition_file_name(index: int) -> str:
    return f"data-{index:05d}.h5"


def checksum(data: Any) -> str:
    """xxh3_64 hex digest of a bytes-like object (bytes, memoryview, numpy array, mmap)."""
    return xxhash.xxh3_64_hexdigest(data)


def contiguous_stride(shape: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Element strides of a C-contiguous tensor, exactly as torch computes them (size-0 dims count as 1)."""
    stride = []
    running = 1
    for size in reversed(shape):
        stride.append(running)
        running *= max(size, 1)
    return tuple(reversed(stride))


def num_chunks(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


def chunk_size_problem(chunk_size: int) -> str | None:
    """What is wrong with a chunk size (to follow the number in an error), None if the format allows it."""
    if 0 < chunk_size <= MAX_CHUNK_SIZE and chunk_size % ALIGNMENT == 0:
        return None
    return f"must be a multiple of {ALIGNMENT} from {ALIGNMENT} to {MAX_CHUNK_SIZE} ({MAX_CHUNK_SIZE >> 20} MiB)"


def is_checksum(value: Any) -> bool:
    """A checksum as the format writes it: 16 lowercase hex digits."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def file_chunk_checksums(path: Path, chunk_size: int) -> list[str]:
    """Checksums of every chunk_size slice of a file (the last one short).

    Each chunk is hashed as it streams through a buffer no larger than the file nor than the default chunk: a
    chunk size far above the file size (a manifest's, or --chunk-size-mib) costs no memory.
    """
    sums = []
    with open(path, "rb", buffering=0) as f:
        view = memoryview(bytearray(max(1, min(chunk_size, DEFAULT_CHUNK_SIZE, os.fstat(f.fileno()).st_size))))
        while True:
            hasher, n = xxhash.xxh3_64(), 0
            while n < chunk_size:  # short reads (pipes, network FS) just take another turn
                got = f.readinto(view[:min(len(view), chunk_size - n)])
                if not got:
                    break
                hasher.update(view[:got])
                n += got
            if not n:
                break
            sums.append(hasher.hexdigest())
            if n < chunk_size:
                break
    return sums


def file_checksum(path: Path) -> str:
    """xxh3_64 of a whole (small) file, streamed."""
    hasher = xxhash.xxh3_64()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


@dataclass(frozen=True)
class TensorEntry:
    name: str
    partition: int
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"partition": self.partition, "offset": self.offset, "nbytes": self.nbytes, "dtype": self.dtype,
                "shape": list(self.shape), "stride": list(self.stride)}


@dataclass(frozen=True)
class Partition:
    index: int
    file: str
    path: Path
    size: int
    chunk_size: int
    checksums: list[str] = field(default_factory=list)

    @property
    def num_chunks(self) -> int:
        return num_chunks(self.size, self.chunk_size)

    def chunk_range(self, chunk_index: int) -> tuple[int, int]:
        """(file offset, length) of a chunk; the last chunk is short."""
        start = chunk_index * self.chunk_size
        return start, min(self.chunk_size, self.size - start)


@dataclass(frozen=True)
class SideFile:
    file: str
    size: int
    checksum: str


@dataclass
class Checkpoint:
    root: Path
    format_version: int
    partitions: list[Partition]
    tensors: dict[str, TensorEntry]
    aliases: dict[str, str]
    side_files: list[SideFile]
    model: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def total_bytes(self) -> int:
        return sum(p.size for p in self.partitions)

    @property
    def metadata_files(self) -> list[str]:
        """The JSON files a copy of the checkpoint needs besides data and side files (slice-hashes.json only where
        the manifest lists it)."""
        ref = self.manifest.get(SLICE_HASHES_FIELD)
        listed = isinstance(ref, dict) and ref.get("file") == SLICE_HASHES_FILE
        return [MANIFEST_FILE, INDEX_FILE] + ([SLICE_HASHES_FILE] if listed else [])

    def slice_hashes_bytes(self) -> bytes | None:
        """slice-hashes.json's bytes, checked against the size and checksum the manifest records for it; None when the
        manifest lists none (hpcllm.checkpoint.slicehashes parses them)."""
        ref = self.manifest.get(SLICE_HASHES_FIELD)
        if ref is None:
            return None
        where = f"{self.root / MANIFEST_FILE}: {SLICE_HASHES_FIELD}"
        if not isinstance(ref, dict) or ref.get("file") != SLICE_HASHES_FILE:
            raise InvalidManifest(f"{where} must be {{file: {SLICE_HASHES_FILE!r}, size, xxh3_64}}")
        path = self.root / SLICE_HASHES_FILE
        redo = f"re-run `hpcllm checkpoint add-slice-hashes {self.root}`"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise MissingFile(f"{path}: cannot be read ({exc.strerror or exc}); the manifest lists it: {redo}") from None
        if len(data) != ref.get("size") or checksum(data) != ref.get("xxh3_64"):
            raise ChecksumMismatch(f"{path}: does not match the size/xxh3_64 in {MANIFEST_FILE}; {redo}")
        return data

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    def resolve(self, name: str) -> TensorEntry:
        """The stored entry for a tensor name or an alias of one."""
        try:
            return self.tensors[self.aliases.get(name, name)]
        except KeyError:
            raise InvalidIndex(f"{self.root / INDEX_FILE}: no tensor or alias named {name!r}") from None

    def torch_dtype(self, entry: TensorEntry | str):
        return torch_dtype(entry.dtype if isinstance(entry, TensorEntry) else entry)

    def verify_chunk(self, partition_index: int, chunk_index: int, buffer: Any) -> None:
        """Check one chunk's bytes (exactly the chunk: chunk_size bytes, the last one shorter) against the manifest."""
        partition = self._partition(partition_index)
        if not isinstance(chunk_index, int) or not 0 <= chunk_index < partition.num_chunks:
            raise OffsetOutOfRange(
                f"{partition.path}: chunk {chunk_index} does not exist (the file has {partition.num_chunks} chunks)"
            )
        view = _as_bytes_view(buffer)
        start, length = partition.chunk_range(chunk_index)
        if view.nbytes != length:
            raise ChecksumMismatch(
                f"{partition.path}: chunk {chunk_index} (bytes {start}-{start + length}) was given {view.nbytes} "
                f"bytes, expected {length}"
            )
        actual = checksum(view)
        expected = partition.checksums[chunk_index]
        if actual != expected:
            raise ChecksumMismatch(
                f"{partition.path}: chunk {chunk_index} (bytes {start}-{start + length}) is corrupt: xxh3_64 "
                f"{actual}, manifest says {expected}; re-copy or re-convert the checkpoint"
            )

    def check_files_present(self) -> None:
        """Cheap check that every data file and side file exists with the size the manifest records."""
        for partition in self.partitions:
            _check_size(partition.path, partition.size)
        for side in self.side_files:
            _check_size(self.root / side.file, side.size)

    def verify_files(self, slice_hashes: bool = True) -> None:
        """Read every data file, side file and (where the manifest lists it, unless slice_hashes is False: it is
        about to be rewritten) slice-hashes.json and compare all checksums (slow: reads the whole checkpoint)."""
        if slice_hashes:
            self.slice_hashes_bytes()  # small: checked first, so a broken one fails fast
        self.check_files_present()
        for partition in self.partitions:
            actual = _read_checksums(partition.path, partition.chunk_size)
            for chunk_index, (got, expected) in enumerate(zip(actual, partition.checksums)):
                if got != expected:
                    start, length = partition.chunk_range(chunk_index)
                    raise ChecksumMismatch(
                        f"{partition.path}: chunk {chunk_index} (bytes {start}-{start + length}) is corrupt: "
                        f"xxh3_64 {got}, manifest says {expected}; re-copy or re-convert the checkpoint"
                    )
            if len(actual) != len(partition.checksums):
                raise TruncatedFile(f"{partition.path}: changed size while being verified")
        for side in self.side_files:
            path = self.root / side.file
            got = read_file_checksum(path)
            if got != side.checksum:
                raise ChecksumMismatch(
                    f"{path}: xxh3_64 {got}, manifest says {side.checksum}; the file was modified or is corrupt"
                )

    def copy_small_files(self, dest: Path) -> "Checkpoint":
        """Copy the JSON files and side files into `dest`, beside data files copied and verified with this manifest,
        each checked against it; returns the copy, parsed. The folder is read again here, and it may have been
        re-converted in place since this manifest was read: its new manifest beside the old data would make a copy
        that claims the new checkpoint's content and holds the old weights. ChecksumMismatch instead (nothing to
        keep, copy again); a write error (disk full) is the OSError."""
        manifest_path = self.root / MANIFEST_FILE
        manifest = _read_bytes(manifest_path)
        if _parse_json_bytes(manifest, manifest_path, InvalidManifest) != self.manifest:
            raise ChecksumMismatch(f"{manifest_path}: the checkpoint changed while it was being copied (re-converted "
                                   f"or replaced in place); the copy was discarded, copy it again")
        (dest / MANIFEST_FILE).write_bytes(manifest)
        for name in (n for n in self.metadata_files if n != MANIFEST_FILE):
            (dest / name).write_bytes(_read_bytes(self.root / name))
        for side in self.side_files:
            data = _read_bytes(self.root / side.file)
            if checksum(data) != side.checksum:
                raise ChecksumMismatch(f"{self.root / side.file}: xxh3_64 differs from the manifest; the file was "
                                       f"modified or is corrupt, re-copy or re-convert the checkpoint")
            (dest / side.file).write_bytes(data)
        copy = read_checkpoint(dest)  # the index (checked against the manifest) parses
        copy.slice_hashes_bytes()
        return copy

    def _partition(self, partition_index: int) -> Partition:
        if not isinstance(partition_index, int) or not 0 <= partition_index < len(self.partitions):
            raise OffsetOutOfRange(
                f"{self.root}: partition {partition_index} does not exist (there are {len(self.partitions)})"
            )
        return self.partitions[partition_index]


def why_not_replaceable(out: Path, foreign: Callable[[list[Path]], str | None]) -> str | None:
    """Why --overwrite must not delete the existing `out`, or None. Never a link, a file, or the current folder (or
    one holding it: swapped out, it would leave the shell in a void); an empty folder may go; a full one only when
    `foreign(entries)` names nothing that is someone's work."""
    if out.is_symlink():
        return "is a symbolic link"
    if not out.is_dir():
        return "is not a folder"
    try:
        if Path.cwd().resolve().is_relative_to(out.resolve()):
            return "is the current folder (or contains it)"
        entries = list(out.iterdir())
    except OSError as exc:
        return f"cannot be listed ({exc.strerror or exc})"
    return foreign(entries) if entries else None


def check_replaceable(out: Path, overwrite: bool, foreign: Callable[[list[Path]], str | None],
                      error: type[Exception], what: str) -> None:
    """`error` unless `out` is free, or may be replaced (why_not_replaceable with `foreign`) and overwrite is given;
    `what` names what --overwrite replaces besides an empty folder."""
    if not (out.exists() or out.is_symlink()):
        return
    why = why_not_replaceable(out, foreign)
    if why:
        raise error(f"{out}: already exists and {why}; --overwrite replaces only {what} or an empty folder: choose "
                    f"another output folder")
    if not overwrite:
        raise error(f"{out}: already exists; pass --overwrite to replace it or choose another output folder")


def creation_mode(directory: bool) -> int:
    """The mode open() / mkdir() would give a new file / folder under this process's umask (0644 / 0755 under the
    usual 022): what a published checkpoint should have, not the 0600 / 0700 of a temporary one."""
    try:  # read, not set and restored: os.umask would change it for every thread for a moment
        status = Path("/proc/self/status").read_text()
        umask = int(re.search(r"^Umask:\s*([0-7]+)", status, re.MULTILINE).group(1), 8)
    except (OSError, AttributeError):  # no /proc, or a kernel before 4.7
        umask = os.umask(0o022)
        os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def torch_dtype(name: str):
    """The torch.dtype for a format dtype name ('bfloat16' -> torch.bfloat16)."""
    import torch

    if name not in DTYPE_ITEMSIZE or not isinstance(getattr(torch, name, None), torch.dtype):
        raise UnsupportedDtype(f"dtype {name!r} is not supported by this torch ({torch.__version__})")
    return getattr(torch, name)


def dtype_name(torch_dtype_obj) -> str:
    """'bfloat16' for torch.bfloat16; UnsupportedDtype for dtypes the format does not store."""
    name = str(torch_dtype_obj).removeprefix("torch.")
    if name not in DTYPE_ITEMSIZE:
        raise UnsupportedDtype(f"dtype {name!r} cannot be stored in the hpcllm checkpoint format")
    return name


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Parse and validate manifest.json and index.json of a converted checkpoint (no tensor data is read)."""
    root = Path(path)
    if not root.is_dir():
        if root.exists():
            raise NotAConvertedCheckpoint(f"{root}: is not a folder; a converted checkpoint is a folder holding "
                                          f"{MANIFEST_FILE}")
        raise MissingFile(f"{root}: no such checkpoint folder")
    manifest_path = root / MANIFEST_FILE
    if os.path.lexists(manifest_path) and not manifest_path.is_file():  # a folder, FIFO, device or broken link
        raise InvalidManifest(f"{manifest_path}: is not a regular file; re-convert the checkpoint with `hpcllm convert`")
    if not manifest_path.is_file():
        hint = " (it looks like a Hugging Face model folder: convert it with `hpcllm convert`)" if _looks_like_hf(
            root) else ""
        raise NotAConvertedCheckpoint(f"{root}: not a converted hpcllm checkpoint, {MANIFEST_FILE} is missing{hint}")
    manifest = _load_json(manifest_path, InvalidManifest)
    version, partitions, index_ref, side_files, model = _parse_manifest(manifest, root, manifest_path)

    index_path = root / INDEX_FILE
    index_bytes = _read_bytes(index_path)
    if len(index_bytes) != index_ref["size"] or checksum(index_bytes) != index_ref["xxh3_64"]:
        raise ChecksumMismatch(
            f"{index_path}: does not match the size/xxh3_64 recorded in {MANIFEST_FILE}; the file was modified or "
            f"is corrupt, re-copy or re-convert the checkpoint"
        )
    index = _parse_json_bytes(index_bytes, index_path, InvalidIndex)
    tensors, aliases = _parse_index(index, partitions, index_path)
    return Checkpoint(root=root, format_version=version, partitions=partitions, tensors=tensors, aliases=aliases,
                      side_files=side_files, model=model, manifest=manifest)


# ----------------------------------------------------------------------------------------------- validation helpers


def _looks_like_hf(root: Path) -> bool:
    try:
        return (root / "config.json").is_file() or any(root.glob("*.safetensors")) or any(root.glob("*.bin"))
    except OSError:
        return False


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MissingFile(f"{path}: file is missing from the checkpoint") from None
    except OSError as exc:
        raise MissingFile(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _load_json(path: Path, error: type[CheckpointError]) -> Any:
    return _parse_json_bytes(_read_bytes(path), path, error)


def _parse_json_bytes(data: bytes, path: Path, error: type[CheckpointError]) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(obj: Any, key: str, kind: type | tuple[type, ...], where: str, error: type[CheckpointError]) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise error(f"{where}: missing field {key!r}")
    value = obj[key]
    if kind is int:
        ok = _is_int(value)
    else:
        ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in _as_tuple(kind))
    if not ok:
        names = "/".join(k.__name__ for k in _as_tuple(kind))
        raise error(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _require_nonneg_int(obj: dict, key: str, where: str, error: type[CheckpointError]) -> int:
    value = _require(obj, key, int, where, error)
    if value < 0:
        raise error(f"{where}: field {key!r} must be >= 0, got {value}")
    return value


def _safe_file_name(name: str, where: str, error: type[CheckpointError]) -> str:
    # Names come from a file someone may have edited: never let one point outside the checkpoint folder.
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise error(f"{where}: file name {name[:200]!r} must be a plain file name inside the checkpoint folder")
    try:
        os.fsencode(name)
    except UnicodeError:
        raise error(f"{where}: file name {name[:200]!r} cannot be encoded for this file system") from None
    return name


def _require_checksum(obj: dict, key: str, where: str, error: type[CheckpointError]) -> str:
    value = _require(obj, key, str, where, error)
    if not _HEX64.match(value):
        raise error(f"{where}: field {key!r} must be a 16-digit lowercase hex xxh3_64 digest, got {value[:40]!r}")
    return value


def _parse_manifest(manifest: Any, root: Path, path: Path):
    where = str(path)
    if not isinstance(manifest, dict):
        raise InvalidManifest(f"{where}: must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT_NAME:
        raise NotAConvertedCheckpoint(
            f"{where}: field 'format' is {str(manifest.get('format'))[:60]!r}, expected {FORMAT_NAME!r}; "
            f"this is not an hpcllm checkpoint"
        )
    version = _require(manifest, "format_version", int, where, InvalidManifest)
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise UnsupportedFormatVersion(
            f"{where}: format_version {version} is not supported (this hpcllm reads "
            f"{sorted(SUPPORTED_FORMAT_VERSIONS)}); re-convert the model with this hpcllm version"
        )
    algorithm = _require(manifest, "checksum_algorithm", str, where, InvalidManifest)
    if algorithm != CHECKSUM_ALGORITHM:
        raise InvalidManifest(f"{where}: checksum_algorithm {algorithm[:40]!r} is not supported (only xxh3_64)")
    alignment = _require(manifest, "alignment", int, where, InvalidManifest)
    if alignment < ALIGNMENT or alignment % ALIGNMENT:
        raise InvalidManifest(f"{where}: alignment {alignment} must be a positive multiple of {ALIGNMENT}")

    raw_partitions = _require(manifest, "partitions", list, where, InvalidManifest)
    partitions = [_parse_partition(p, i, root, where) for i, p in enumerate(raw_partitions)]
    if len({p.file for p in partitions}) != len(partitions):
        raise InvalidManifest(f"{where}: two partitions name the same data file")

    index_ref = _require(manifest, "index", dict, where, InvalidManifest)
    index_where = f"{where}: index"
    if _require(index_ref, "file", str, index_where, InvalidManifest) != INDEX_FILE:
        raise InvalidManifest(f"{index_where}: file must be {INDEX_FILE!r}")
    _require_nonneg_int(index_ref, "size", index_where, InvalidManifest)
    _require_checksum(index_ref, "xxh3_64", index_where, InvalidManifest)

    raw_side_files = manifest.get("side_files", [])
    if not isinstance(raw_side_files, list):
        raise InvalidManifest(f"{where}: field 'side_files' must be a list")
    side_files = []
    for i, raw in enumerate(raw_side_files):
        side_where = f"{where}: side_files[{i}]"
        if not isinstance(raw, dict):
            raise InvalidManifest(f"{side_where}: must be an object")
        name = _safe_file_name(_require(raw, "file", str, side_where, InvalidManifest), side_where, InvalidManifest)
        if name in (MANIFEST_FILE, INDEX_FILE) or name in {p.file for p in partitions}:
            raise InvalidManifest(f"{side_where}: {name!r} is a checkpoint file, not a side file")
        side_files.append(SideFile(name, _require_nonneg_int(raw, "size", side_where, InvalidManifest),
                                   _require_checksum(raw, "xxh3_64", side_where, InvalidManifest)))

    model = manifest.get("model", {})
    if not isinstance(model, dict):
        raise InvalidManifest(f"{where}: field 'model' must be an object")
    return version, partitions, index_ref, side_files, model


def _parse_partition(raw: Any, position: int, root: Path, where: str) -> Partition:
    part_where = f"{where}: partitions[{position}]"
    if not isinstance(raw, dict):
        raise InvalidManifest(f"{part_where}: must be an object, got {type(raw).__name__}")
    index = _require(raw, "index", int, part_where, InvalidManifest)
    if index != position:
        raise InvalidManifest(f"{part_where}: index is {index}, expected {position} (partitions must be in order)")
    name = _safe_file_name(_require(raw, "file", str, part_where, InvalidManifest), part_where, InvalidManifest)
    size = _require_nonneg_int(raw, "size", part_where, InvalidManifest)
    chunk_size = _require(raw, "chunk_size", int, part_where, InvalidManifest)
    problem = chunk_size_problem(chunk_size)  # readers hold whole chunks in memory
    if problem:
        raise InvalidManifest(f"{part_where}: chunk_size {chunk_size} {problem}; re-convert the checkpoint")
    checksums = _require(raw, "checksums", list, part_where, InvalidManifest)
    expected = num_chunks(size, chunk_size)
    if len(checksums) != expected:
        raise InvalidManifest(
            f"{part_where}: has {len(checksums)} chunk checksums, a {size}-byte file in {chunk_size}-byte chunks "
            f"needs {expected}"
        )
    for i, value in enumerate(checksums):
        if not isinstance(value, str) or not _HEX64.match(value):
            raise InvalidManifest(f"{part_where}: checksums[{i}] must be a 16-digit lowercase hex xxh3_64 digest")
    return Partition(index=index, file=name, path=root / name, size=size, chunk_size=chunk_size,
                     checksums=list(checksums))


def _parse_index(index: Any, partitions: list[Partition], path: Path):
    where = str(path)
    if not isinstance(index, dict):
        raise InvalidIndex(f"{where}: must be a JSON object, got {type(index).__name__}")
    raw_tensors = _require(index, "tensors", dict, where, InvalidIndex)
    tensors = {name: _parse_entry(name, raw, partitions, where) for name, raw in raw_tensors.items()}
    _check_no_overlap(tensors, partitions, where)

    raw_aliases = index.get("aliases", {})
    if not isinstance(raw_aliases, dict):
        raise InvalidIndex(f"{where}: field 'aliases' must be an object")
    aliases = {}
    for alias, target in raw_aliases.items():
        if not isinstance(target, str) or target not in tensors:
            raise InvalidIndex(f"{where}: alias {alias[:200]!r} points to {str(target)[:200]!r}, which is not a "
                               f"stored tensor")
        if alias in tensors:
            raise InvalidIndex(f"{where}: {alias[:200]!r} is both a stored tensor and an alias")
        aliases[alias] = target
    return tensors, aliases


def _parse_entry(name: str, raw: Any, partitions: list[Partition], where: str) -> TensorEntry:
    entry = _valid_entry_fast(name, raw, partitions)
    if entry is not None:
        return entry
    return _parse_entry_checked(name, raw, partitions, where)


def _valid_entry_fast(name: str, raw: Any, partitions: list[Partition]) -> TensorEntry | None:
    """The entry if it passes every check of _parse_entry_checked, else None (that one then says what is wrong).

    Same checks with plain type tests and no message building: a 1B model's index parses in ~1 ms instead of ~3.
    """
    try:
        partition, offset, nbytes = raw["partition"], raw["offset"], raw["nbytes"]
        dtype, shape, stride = raw["dtype"], raw["shape"], raw["stride"]
    except (TypeError, KeyError, IndexError):
        return None
    if not (type(partition) is int and type(offset) is int and type(nbytes) is int and type(dtype) is str
            and type(shape) is list and type(stride) is list and 0 <= partition < len(partitions)
            and offset >= 0 and nbytes >= 0 and offset % ALIGNMENT == 0 and dtype in DTYPE_ITEMSIZE):
        return None
    for values in (shape, stride):
        for value in values:
            if type(value) is not int:
                return None
    shape, stride = tuple(shape), tuple(stride)
    if (any(d < 0 for d in shape) or nbytes != math.prod(shape) * DTYPE_ITEMSIZE[dtype]
            or stride != contiguous_stride(shape) or offset + nbytes > partitions[partition].size):
        return None
    return TensorEntry(name=name, partition=partition, offset=offset, nbytes=nbytes, dtype=dtype, shape=shape,
                       stride=stride)


def _parse_entry_checked(name: str, raw: Any, partitions: list[Partition], where: str) -> TensorEntry:
    entry_where = f"{where}: tensor {name[:200]!r}"
    if not isinstance(raw, dict):
        raise InvalidIndex(f"{entry_where}: must be an object, got {type(raw).__name__}")
    partition = _require(raw, "partition", int, entry_where, InvalidIndex)
    if not 0 <= partition < len(partitions):
        raise InvalidIndex(f"{entry_where}: partition {partition} does not exist (there are {len(partitions)})")
    offset = _require_nonneg_int(raw, "offset", entry_where, InvalidIndex)
    nbytes = _require_nonneg_int(raw, "nbytes", entry_where, InvalidIndex)
    dtype = _require(raw, "dtype", str, entry_where, InvalidIndex)
    if dtype not in DTYPE_ITEMSIZE:
        raise UnsupportedDtype(f"{entry_where}: dtype {dtype[:60]!r} is not supported "
                               f"(known: {', '.join(sorted(DTYPE_ITEMSIZE))})")
    shape = _int_list(_require(raw, "shape", list, entry_where, InvalidIndex), "shape", entry_where)
    stride = _int_list(_require(raw, "stride", list, entry_where, InvalidIndex), "stride", entry_where)
    if any(d < 0 for d in shape):
        raise InvalidIndex(f"{entry_where}: shape {list(shape)[:16]} has a negative dimension")
    if nbytes != math.prod(shape) * DTYPE_ITEMSIZE[dtype]:
        raise InvalidIndex(f"{entry_where}: nbytes {nbytes} != prod(shape) x itemsize for shape "
                           f"{list(shape)[:16]} and dtype {dtype}")
    if stride != contiguous_stride(shape):
        raise InvalidIndex(f"{entry_where}: stride {list(stride)[:16]} is not the contiguous stride of shape "
                           f"{list(shape)[:16]}")
    if offset % ALIGNMENT:
        raise InvalidIndex(f"{entry_where}: offset {offset} is not {ALIGNMENT}-aligned")
    file = partitions[partition]
    if offset + nbytes > file.size:
        raise OffsetOutOfRange(f"{entry_where}: bytes {offset}-{offset + nbytes} lie outside {file.file} "
                               f"({file.size} bytes)")
    return TensorEntry(name=name, partition=partition, offset=offset, nbytes=nbytes, dtype=dtype, shape=shape,
                       stride=stride)


def _int_list(values: list, field_name: str, where: str) -> tuple[int, ...]:
    if not all(_is_int(v) for v in values):
        raise InvalidIndex(f"{where}: {field_name} must be a list of integers")
    return tuple(values)


def _check_no_overlap(tensors: dict[str, TensorEntry], partitions: list[Partition], where: str) -> None:
    # Two tensors sharing bytes would silently alias in the loaded model; shared tensors must use `aliases`.
    by_partition: dict[int, list[TensorEntry]] = {}
    for entry in tensors.values():
        if entry.nbytes:
            by_partition.setdefault(entry.partition, []).append(entry)
    for entries in by_partition.values():
        entries.sort(key=lambda e: e.offset)
        for before, after in zip(entries, entries[1:]):
            if before.offset + before.nbytes > after.offset:
                raise InvalidIndex(f"{where}: tensors {before.name[:200]!r} and {after.name[:200]!r} overlap in "
                                   f"{partitions[before.partition].file}")


def _check_size(path: Path, expected: int) -> None:
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        raise MissingFile(f"{path}: file is missing from the checkpoint") from None
    except OSError as exc:
        raise MissingFile(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if actual != expected:
        raise TruncatedFile(f"{path}: has {actual} bytes, the manifest says {expected}; the copy is incomplete or "
                            f"the file was modified, re-copy or re-convert the checkpoint")


def _read_checksums(path: Path, chunk_size: int) -> list[str]:
    try:
        return file_chunk_checksums(path, chunk_size)
    except FileNotFoundError:
        raise MissingFile(f"{path}: file is missing from the checkpoint") from None
    except OSError as exc:
        raise MissingFile(f"{path}: cannot be read ({exc.strerror or exc})") from None


def read_file_checksum(path: Path) -> str:
    try:
        return file_checksum(path)
    except FileNotFoundError:
        raise MissingFile(f"{path}: file is missing from the checkpoint") from None
    except OSError as exc:
        raise MissingFile(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _as_bytes_view(buffer: Any) -> memoryview:
    """A flat byte view of bytes / bytearray / memoryview / mmap / numpy array / CPU torch tensor."""
    if hasattr(buffer, "untyped_storage") and hasattr(buffer, "numpy"):  # a torch tensor
        import torch

        buffer = buffer.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    try:
        view = memoryview(buffer)
    except TypeError:
        raise ChecksumMismatch(f"cannot checksum a {type(buffer).__name__}: pass a bytes-like buffer") from None
    return view if view.c_contiguous else memoryview(view.tobytes())
