"""The DRAM tier: converted checkpoints held in POSIX shared memory (/dev/shm) that outlives worker processes.

Layout: <root>/hpcllm-<namespace>/<model_id>/ is a complete converted checkpoint (data files, manifest.json,
index.json, side files) plus `.hpcllm-dram.json`, written last, saying it was verified when filled and naming
each file's identity then (device, inode, size, mtime_ns, ctime_ns). A load from it maps the data files
copy-on-write and makes the model's tensors views of the mapping: no read, no copy, no checksum pass, so the
model is ready in about the time the skeleton takes to build; all processes on the node share the same physical
pages.

Only a copy that is verifiably ours skips the checksum pass (`copy_intact`): the namespace folder, the copy and
its files belong to this user and no one else may write them (folders 0700, files 0600), and every file is still
the one the fill verified (any rewrite changes its inode or ctime, which no one can set back). A marker planted in
a folder of someone else's, or a file altered after the fill, makes the loader verify every chunk, so altered
weights fail with ChecksumMismatch instead of loading. A namespace folder another user created first is refused.

`put` fills a temporary `.tmp-*` folder (O_DIRECT reads from the source straight into the shared pages, every
chunk verified as it lands) and renames it into place, so a reader never sees a partial copy. `remove` renames
the folder away before deleting it; processes that still map it keep working until they unmap. Capacity and
eviction policy belong to the node agent, which builds on `list()`, `usage_bytes()` and `remove()`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from hpcllm.checkpoint import read_checkpoint
from hpcllm.errors import HpcllmError
from hpcllm.privatefs import NotPrivate, owned_by_us, private_dir
from hpcllm.store.memory import MappedFile, round_up
from hpcllm.store.pipeline import DirectHostTarget, Pipeline, plan_units
from hpcllm.store.readers import BUFFERED, ODIRECT, FileReader
from hpcllm.store.tiers import detect_tier, file_stats
from hpcllm.store.verified import file_identity

MARKER_FILE = ".hpcllm-dram.json"
DEFAULT_ROOT = Path("/dev/shm")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_SAFE_NAMESPACE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class DramTierError(HpcllmError):
    """A DRAM-tier request that cannot be done (unknown model id, bad name, not enough shared memory)."""


@dataclass(frozen=True)
class DramEntry:
    model_id: str
    path: Path
    bytes: int  # data bytes held (sum of partitions)
    filled_at: float
    source: str
    fill_seconds: float


class DramTier:
    """Checkpoints in shared memory, by model id, inside one namespace (e.g. one per user or service)."""

    def __init__(self, namespace: str = "default", root: str | os.PathLike = DEFAULT_ROOT):
        if not _SAFE_NAMESPACE.match(namespace):
            raise DramTierError(f"DRAM tier namespace {namespace!r} must be 1-64 letters, digits, '.', '_' or '-'")
        self.namespace = namespace
        self.dir = Path(root) / f"hpcllm-{namespace}"

    def ensure_private(self) -> Path:
        """Create the namespace folder 0700, or check that the existing one is ours (DramTierError if not)."""
        try:
            return private_dir(self.dir, "the DRAM tier folder", "choose another node.dram_namespace, or have "
                               "its owner remove it")
        except NotPrivate as exc:
            raise DramTierError(str(exc)) from None

    # ------------------------------------------------------------------------------------------------- queries

    def path(self, model_id: str) -> Path:
        return self.dir / _check_id(model_id)

    def has(self, model_id: str) -> bool:
        return (self.path(model_id) / MARKER_FILE).is_file()

    def open(self, model_id: str) -> Path:
        """The checkpoint folder of a model in the tier, to pass to load_model."""
        if not self.has(model_id):
            raise DramTierError(f"model {model_id!r} is not in the DRAM tier {self.dir}; put() it first")
        return self.path(model_id)

    def entry(self, model_id: str) -> DramEntry:
        path = self.open(model_id)
        info = json.loads((path / MARKER_FILE).read_text())
        return DramEntry(model_id=model_id, path=path, bytes=info["bytes"], filled_at=info["filled_at"],
                         source=info["source"], fill_seconds=info["fill_seconds"])

    def list(self) -> list[DramEntry]:
        if not self.dir.is_dir():
            return []
        entries = []
        for child in sorted(self.dir.iterdir()):
            if not child.name.startswith(".") and (child / MARKER_FILE).is_file():
                try:
                    entries.append(self.entry(child.name))
                except (OSError, ValueError, KeyError, DramTierError):
                    continue  # being removed right now, or a damaged marker: not a usable entry
        return entries

    def usage_bytes(self) -> int:
        """Bytes of shared memory this namespace holds (every file, including fills in progress)."""
        return sum(st.st_size for st in file_stats(self.dir))

    # ----------------------------------------------------------------------------------------------- mutations

    def staging_path(self, model_id: str) -> Path:
        """A fresh temporary folder name for a fill of `model_id` (put's `staging`): the node cache records it with
        the fill's reservation, to count what the fill has written so far."""
        return self.dir / f".tmp-{_check_id(model_id)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def put(self, checkpoint_dir: str | os.PathLike, model_id: str | None = None, *, threads: int = 2,
            staging: Path | None = None, origin: str | None = None) -> DramEntry:
        """Copy a converted checkpoint into shared memory, verifying every chunk; returns the entry. `staging`: the
        temporary folder to fill (a staging_path), else a fresh one. `origin`: the source to record, when
        `checkpoint_dir` is only a copy of it (the node's NVMe copy, a load's staging folder); default: itself.

        A model already present is left as it is (ids name immutable checkpoints).
        """
        started = time.perf_counter()
        source = Path(checkpoint_dir)
        ckpt = read_checkpoint(source)
        ckpt.check_files_present()
        model_id = _check_id(model_id or source.name)
        if self.has(model_id):
            return self.entry(model_id)
        self._check_space(ckpt.total_bytes)
        self.ensure_private()
        tmp = staging or self.staging_path(model_id)
        tmp.mkdir(mode=0o700)
        try:
            self._fill_data(ckpt, tmp, threads)
            ckpt.copy_small_files(tmp)
            for file in tmp.iterdir():
                file.chmod(0o600)
            info = {"model_id": model_id, "source": origin or str(source.resolve()), "bytes": ckpt.total_bytes,
                    "filled_at": time.time(), "fill_seconds": time.perf_counter() - started, "verified": True,
                    "files": {file.name: file_identity(file) for file in sorted(tmp.iterdir())}}
            marker = os.open(tmp / MARKER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(marker, "w") as f:
                f.write(json.dumps(info))
            try:
                os.rename(tmp, self.path(model_id))
            except OSError:
                if not self.has(model_id):  # not a concurrent put of the same model winning the race
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno != errno.ENOSPC:
                raise
            raise DramTierError(f"{self.dir}: no shared memory left for {model_id} "
                                f"({ckpt.total_bytes / 1e9:.2f} GB); remove models from the tier first") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.entry(model_id)

    def remove(self, model_id: str) -> bool:
        """Drop a model from the tier; True if it was there. Mappings held by running processes stay valid."""
        path = self.path(model_id)
        if not path.exists():
            return False
        trash = self.dir / f".rm-{model_id}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def clean_stale(self) -> int:
        """Delete leftovers of fills/removals whose process died; returns how many folders went."""
        if not self.dir.is_dir():
            return 0
        removed = 0
        for child in self.dir.iterdir():
            match = re.match(r"^\.(tmp|rm)-.*?-(\d+)-[0-9a-f]{8}$", child.name)
            if child.name.startswith(".rm-") or (match and not _pid_alive(int(match.group(2)))):
                shutil.rmtree(child, ignore_errors=True)
                removed += 1
        return removed

    # ------------------------------------------------------------------------------------------------- helpers

    def _check_space(self, nbytes: int) -> None:
        root = self.dir if self.dir.exists() else self.dir.parent
        free = shutil.disk_usage(root).free
        if nbytes > free:
            raise DramTierError(f"{root}: {nbytes / 1e9:.2f} GB needed for the checkpoint, only {free / 1e9:.2f} GB "
                                f"of shared memory free; remove models from the tier first")

    def _fill_data(self, ckpt, tmp: Path, threads: int) -> None:
        # Read each partition straight into its shared-memory file: the file is sized to whole pages while it is
        # filled (O_DIRECT reads the last chunk rounded up), then cut to its exact size.
        mode = ODIRECT if detect_tier(ckpt.root) == "disk" else BUFFERED
        mapped, readers = {}, {}
        try:
            for part in ckpt.partitions:
                target = tmp / part.file
                with open(target, "wb") as f:
                    # Taken now, not sparse: a page fault in a mapping of a full /dev/shm (another fill took the
                    # room after _check_space) fails the read with EFAULT, or is a SIGBUS if the CPU writes it.
                    if part.size:
                        os.posix_fallocate(f.fileno(), 0, round_up(part.size, 4096))
                if part.size:
                    mapped[part.index] = MappedFile(target, shared=True)
                    readers[part.index] = FileReader(part.path, mode, expected_size=part.size)
            units = plan_units(ckpt, sorted(mapped), 16 << 20)
            Pipeline(ckpt, units, readers, DirectHostTarget(mapped), verify=True, threads=threads).start().finish()
        finally:
            for reader in readers.values():
                reader.close()
            for m in mapped.values():
                try:
                    m.mmap.close()
                except BufferError:  # a view is still referenced somewhere: the GC unmaps it
                    pass
        for part in ckpt.partitions:
            os.truncate(tmp / part.file, part.size)


def copy_intact(folder: str | os.PathLike) -> bool:
    """True when `folder` is a DRAM-tier copy that is verifiably ours and unchanged since its verified fill: the
    folder, its parent (the namespace) and every file belong to this user and are not writable by others, and the
    files are exactly those the marker lists, with the identities they had when the fill verified them."""
    folder = Path(folder)
    try:
        info = json.loads((folder / MARKER_FILE).read_text())
        recorded = info["files"]
        present = {p.name for p in folder.iterdir() if p.name != MARKER_FILE}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not (owned_by_us(folder) and owned_by_us(folder.parent) and owned_by_us(folder / MARKER_FILE)):
        return False
    if not isinstance(recorded, dict) or set(recorded) != present:
        return False
    try:
        return all(owned_by_us(folder / name) and file_identity(folder / name) == identity
                   for name, identity in recorded.items())
    except OSError:
        return False


def _check_id(model_id: str) -> str:
    if not isinstance(model_id, str) or not _SAFE_ID.match(model_id):
        raise DramTierError(f"model id {model_id!r} must start with a letter or digit and contain only letters, "
                            f"digits, '.', '_' or '-' (at most 200)")
    return model_id


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
