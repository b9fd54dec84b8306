"""A node's checkpoint cache tiers: node-local NVMe and DRAM (shared memory), with capacity limits, LRU eviction
that never touches a checkpoint in use, and verified, atomic fills (see docs/node-cache.md).

    cm = CacheManager(nvme_dir, nvme_capacity_bytes, dram_capacity_bytes, dram_namespace)
    cm.warm("llama", Path("/shared/models/llama"), "nvme", progress=cb)   # fill, verify, rename
    path, tier = cm.path_for_load("llama", origin)                         # best copy or the origin
    cm.acquire("llama", tier) ... cm.release("llama", tier)                # never evicted while held

Files:
  nvme_dir/<model>/                     a complete converted checkpoint + `.hpcllm-cache.json` (marker, written
                                        last, before the rename: a folder without it is not a cache entry)
  nvme_dir/.<model>.filling-<pid>-<rnd> a fill in progress; removed on failure, and on start when <pid> is dead
  nvme_dir/.hpcllm-cache.db             SQLite (WAL) state shared by every process on the node: last use,
                                        origin, verification time, in-use references (per holder pid), fills in
                                        progress (their bytes count against the capacity)
  DRAM copies live in hpcllm.store.dram.DramTier(dram_namespace) under /dev/shm.

The folders are the truth about what is cached; the database adds what folders cannot say (refcounts, last use)
and is repaired from the markers on start, so a copy written by another tool (the MPI warmer) is picked up.

Copies are named after the model but keyed by content: a copy serves a load, a warm or a fill only while its
manifest.json (which lists every file's chunk checksums) is the origin's. A model redeployed under the same name
from a new checkpoint finds the old copies stale: they are dropped (once no instance uses them) and refilled, never
loaded. nvme_dir and the DRAM namespace folder are private (0700, this user's; another user's is refused).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from hpcllm.checkpoint import (CheckpointError, ChecksumMismatch, MissingFile,
                               NotAConvertedCheckpoint, read_checkpoint)
from hpcllm.checkpoint.layout import MANIFEST_FILE, Checkpoint
from hpcllm.config import MODEL_NAME
from hpcllm.errors import ConfigError, HpcllmError
from hpcllm.node.identity import expand_node_pattern, node_name, slurm_job_id
from hpcllm.present import human_size
from hpcllm.privatefs import NotPrivate, private_dir
from hpcllm.store.dram import DramTier, DramTierError
from hpcllm.store.dram import DEFAULT_ROOT as DRAM_DEFAULT_ROOT
from hpcllm.store.readers import BUFFERED, ODIRECT, FileReader, page_aligned_buffer
from hpcllm.store.tee import TEE_COMPLETE, TEE_FAILED
from hpcllm.store.tiers import file_stats
from hpcllm.procs import pid_alive

if TYPE_CHECKING:  # the wire module's list of actions, for the annotation only (no pydantic to import here)
    from hpcllm.node.protocol import VerifyAction

NVME, DRAM, SHAREDFS = "nvme", "dram", "sharedfs"
CACHE_TIERS = (DRAM, NVME)  # fastest first
MARKER_FILE = ".hpcllm-cache.json"
STATE_DB = ".hpcllm-cache.db"
_SAFE_MODEL = re.compile(MODEL_NAME)  # fullmatch: a cache entry is named after the model it holds
# A slice copy's entry: rank R of a degree-N tensor-parallel instance of MODEL ('+' is never in a model name).
_SLICE_KEY = re.compile(rf"(?P<model>{MODEL_NAME})\+tp(?P<degree>\d{{1,2}})\.r(?P<rank>\d{{1,2}})")
_FILLING = re.compile(r"^\.(?P<model>.+)\.filling-(?P<pid>\d+)-[0-9a-f]{8}$")
_TRASH = re.compile(r"^\.(?P<model>.+)\.evicted-[0-9a-f]{8}$")
COPY_CHUNK_BYTES = 16 << 20

Progress = Callable[[int, int], None]  # (bytes done, bytes total)

log = logging.getLogger(__name__)


class CacheError(HpcllmError):
    """A cache request that cannot be done; the message says what to fix."""

    exit_code = 4


class NotEnoughSpace(CacheError):
    """The model does not fit in the tier even after evicting every copy not in use."""


class FillInProgress(CacheError):
    """Another fill of the same model and tier is under way (a warm or a load's copy): one copy is enough."""


class UnknownModel(CacheError):
    """The model is not cached (for evict/verify) or its origin is missing / not a converted checkpoint."""


class CacheCorrupt(CacheError):
    """A copy (or the origin) does not match its manifest checksums."""


class CacheInUse(CacheError):
    """An eviction was asked for a copy that a running instance holds."""


def _being_copied(key: str, tier: str, by: str, then: str) -> FillInProgress:
    return FillInProgress(f"model {key!r} is being copied into the {tier} tier already ({by}); wait for that copy "
                          f"to finish, then {then}")


@dataclass(frozen=True)
class CachedCopy:
    model: str
    tier: str
    path: Path
    bytes: int
    last_used: float
    verified: bool
    in_use: int
    source: str | None = None
    verified_at: float | None = None
    tensor_parallel: int | None = None  # a slice copy: rank `rank` of a degree-`tensor_parallel` instance's slices
    rank: int | None = None

    @property
    def key(self) -> str:
        """The entry's name in the cache (its NVMe folder): the model, or its slice key for a slice copy."""
        return self.model if self.tensor_parallel is None else slice_key(self.model, self.tensor_parallel, self.rank)

    def to_json(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "CachedCopy":
        return cls(**{**data, "path": Path(data["path"])})


@dataclass(frozen=True)
class LoadFill:
    """A cache-on-load copy in progress: the staging folder a worker's load writes into (hpcllm.store.tee), the
    tiers it will fill and their reservations (see CacheManager.begin_load_fill)."""

    model: str
    origin: str
    staging: Path
    tiers: tuple[str, ...]
    fill_ids: tuple[str, ...]
    dram_staging: Path | None = None  # the DRAM tier's temporary folder its commit fills (DramTier.put)


@dataclass(frozen=True)
class VerifyResult:
    model: str
    tier: str
    ok: bool
    action: VerifyAction
    message: str = ""

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ shared helpers


def check_model_name(model: str) -> str:
    if not isinstance(model, str) or not _SAFE_MODEL.fullmatch(model):
        raise CacheError(f"model name {model!r} must start with a letter or digit and contain only letters, digits, "
                         f"'.', '_' or '-' (at most 128 characters)")
    return model


def slice_key(model: str, degree: int, rank: int) -> str:
    """The cache entry (and NVMe folder) name of rank `rank` of `degree`'s slice copy of `model`."""
    check_model_name(model)
    if not (1 < degree <= 64 and 0 <= rank < degree):
        raise CacheError(f"tensor_parallel must be 2..64 and the rank 0..tensor_parallel-1, not {degree} / {rank}")
    return f"{model}+tp{degree}.r{rank}"


def parse_entry_key(key: str) -> tuple[str, int | None, int | None]:
    """(model, degree, rank) of an entry name; degree and rank are None for a whole copy."""
    found = _SLICE_KEY.fullmatch(key)
    if found:
        return found.group("model"), int(found.group("degree")), int(found.group("rank"))
    return check_model_name(key), None, None


def check_tier(tier: str, allowed: tuple[str, ...] = CACHE_TIERS) -> str:
    if tier not in allowed:
        raise CacheError(f"unknown cache tier {tier!r}; use one of {', '.join(allowed)}")
    return tier


def open_origin(model: str, source: str | os.PathLike) -> Checkpoint:
    """The origin checkpoint of a model, validated; UnknownModel when it is missing or not converted."""
    source = Path(source)
    if not source.exists():
        raise UnknownModel(f"model {model!r}: its origin {source} does not exist; give the path of a converted "
                           f"checkpoint (hpcllm convert) or deploy the model first")
    try:
        ckpt = read_checkpoint(source)
        ckpt.check_files_present()
    except (MissingFile, NotAConvertedCheckpoint) as exc:
        raise UnknownModel(f"model {model!r}: {exc}") from None
    except CheckpointError as exc:
        raise CacheCorrupt(f"model {model!r}: the origin is damaged: {exc}") from None
    return ckpt


def content_id(root: str | os.PathLike) -> str | None:
    """What a converted checkpoint holds, as one digest: of its manifest.json, which lists every data and side
    file's chunk checksums (copies are verified against it when filled). None when it cannot be read."""
    try:
        return manifest_digest((Path(root) / MANIFEST_FILE).read_bytes())
    except OSError:
        return None


def manifest_digest(manifest: bytes) -> str:
    return hashlib.sha256(manifest).hexdigest()


def checkpoint_bytes(ckpt: Checkpoint) -> int:
    """Bytes a copy of the checkpoint takes (data files, the two JSON files, side files)."""
    small = sum(s.size for s in ckpt.side_files)
    for name in ckpt.metadata_files:
        try:
            small += (ckpt.root / name).stat().st_size
        except OSError:
            pass
    return ckpt.total_bytes + small


def folder_bytes(path: Path, *, allocated: bool = False) -> int:
    """The size of the files in a folder; `allocated`: only what the filesystem has given them so far (a file sized
    up front, as a load's tee does, is sparse until its bytes are written)."""
    return sum(min(st.st_size, st.st_blocks * 512) if allocated else st.st_size for st in file_stats(path))


def copy_checkpoint(ckpt: Checkpoint, dest: Path, progress: Progress | None = None,
                    chunk_bytes: int = COPY_CHUNK_BYTES) -> None:
    """Copy a converted checkpoint into the (existing, empty) folder `dest`, verifying every chunk as it passes.

    Data files are read in whole manifest chunks with O_DIRECT when the origin's filesystem allows it (falling back to
    buffered reads), each chunk checked against the manifest before it is written; the files are fsynced. The
    manifest, index and side files are copied and checked too. Raises ChecksumMismatch/TruncatedFile/MissingFile.
    """
    total = checkpoint_bytes(ckpt)
    done = 0
    for part in ckpt.partitions:
        chunk = part.chunk_size
        with page_aligned_buffer(max(4096, (chunk + 4095) // 4096 * 4096)) as view, \
                FileReader(part.path, ODIRECT if part.size >= chunk else BUFFERED, expected_size=part.size) as reader, \
                open(dest / part.file, "wb", buffering=0) as out:
            for index in range(part.num_chunks):
                start, length = part.chunk_range(index)
                read_len = (length + 4095) // 4096 * 4096 if reader.mode == ODIRECT else length
                reader.read_into(start, view[:read_len], length)
                ckpt.verify_chunk(part.index, index, view[:length])
                out.write(view[:length])
                done += length
                if progress:
                    progress(done, total)
            os.fsync(out.fileno())
    ckpt.copy_small_files(dest).check_files_present()
    if progress:
        progress(total, total)


def write_marker(folder: Path, model: str, source: str, nbytes: int, verified_at: float) -> None:
    info = {"model": model, "source": source, "bytes": nbytes, "filled_at": time.time(), "verified_at": verified_at}
    tmp = folder / (MARKER_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, folder / MARKER_FILE)


def read_marker(folder: Path) -> dict | None:
    try:
        info = json.loads((folder / MARKER_FILE).read_text())
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def filling_name(model: str) -> str:
    return f".{model}.filling-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def sync_files(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)



# ------------------------------------------------------------------------------------------------- the manager


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    model TEXT NOT NULL, tier TEXT NOT NULL, bytes INTEGER NOT NULL, source TEXT,
    last_used REAL NOT NULL, verified_at REAL, PRIMARY KEY (model, tier));
CREATE TABLE IF NOT EXISTS refs (
    model TEXT NOT NULL, tier TEXT NOT NULL, pid INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (model, tier, pid));
CREATE TABLE IF NOT EXISTS fills (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, tier TEXT NOT NULL, pid INTEGER NOT NULL, bytes INTEGER NOT NULL,
    folder TEXT);
"""
# Added to the fills of a state file written before it: the folder a fill writes (what it has written so far).
_FILLS_FOLDER = "ALTER TABLE fills ADD COLUMN folder TEXT"


class CacheManager:
    """The NVMe and DRAM cache tiers of one node, shared by every process on it through a SQLite state file."""

    def __init__(self, nvme_dir: str | os.PathLike, nvme_capacity_bytes: int, dram_capacity_bytes: int,
                 dram_namespace: str | None = "default", nvme_scope: str = "persistent", *,
                 dram_root: str | os.PathLike = DRAM_DEFAULT_ROOT):
        """dram_namespace=None: an NVMe-only manager (the MPI warmer), which leaves the node's DRAM entries in the
        shared state file alone (it cannot see them: they live in the agent's namespace)."""
        if nvme_scope not in ("persistent", "job"):
            raise CacheError(f"nvme_scope must be 'persistent' or 'job', got {nvme_scope!r}")
        self.nvme_dir = Path(nvme_dir)
        self.nvme_scope = nvme_scope
        self.capacity = {NVME: int(nvme_capacity_bytes), DRAM: int(dram_capacity_bytes)}
        try:
            self.dram = DramTier(dram_namespace, dram_root) if dram_namespace is not None else None
        except DramTierError as exc:
            raise CacheError(str(exc)) from None
        self.tiers = CACHE_TIERS if self.dram is not None else (NVME,)
        try:
            private_dir(self.nvme_dir, "the NVMe cache folder", "choose a node.nvme_dir of your own")
            if self.dram is not None and self.dram.dir.exists():  # created 0700 by its first fill
                self.dram.ensure_private()
        except (NotPrivate, DramTierError) as exc:
            raise CacheError(str(exc)) from None
        except OSError as exc:
            raise CacheError(f"cannot create the NVMe cache folder {self.nvme_dir}: {exc.strerror}; set "
                             f"node.nvme_dir to a writable folder") from None
        self._db_path = self.nvme_dir / STATE_DB
        self._warm_locks: dict[tuple[str, str], threading.Lock] = {}
        self._warm_locks_guard = threading.Lock()
        try:
            db = self._connect()
            try:
                db.executescript(_SCHEMA)
                if "folder" not in {row[1] for row in db.execute("PRAGMA table_info(fills)")}:
                    db.execute(_FILLS_FOLDER)
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise self._state_error(exc) from None
        self.clean_stale()

    @classmethod
    def from_config(cls, node_config, dram_namespace: str = "default", **kwargs) -> "CacheManager":
        """From a NodeConfig (hpcllm.config): nvme_dir, nvme_scope, nvme_capacity_gb, dram_capacity_gb."""
        return cls(node_config.nvme_dir, int(node_config.nvme_capacity_gb * 1e9),
                   int(node_config.dram_capacity_gb * 1e9), dram_namespace, node_config.nvme_scope, **kwargs)

    # ----------------------------------------------------------------------------------------------- state db

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._db_path, timeout=60, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One node-wide critical section: BEGIN IMMEDIATE takes SQLite's write lock, serialising every process."""
        try:
            db = self._connect()
        except sqlite3.Error as exc:
            raise self._state_error(exc) from None
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:  # a disk gone read-only or full: a CacheError, not a traceback
            raise self._state_error(exc) from None
        finally:
            db.close()

    def _state_error(self, exc: sqlite3.Error) -> CacheError:
        return CacheError(f"cannot use the cache state file {self._db_path}: {exc}; the NVMe cache folder must be "
                          f"a writable local folder (node.nvme_dir)")

    # ------------------------------------------------------------------------------------------------- queries

    def _check_tier(self, tier: str) -> str:
        check_tier(tier)
        if tier not in self.tiers:
            raise CacheError(f"this cache manager handles only the {', '.join(self.tiers)} tier(s), not {tier}")
        return tier

    def nvme_path(self, model: str) -> Path:
        """The NVMe folder of an entry: a model's whole copy, or a slice copy (a slice_key)."""
        parse_entry_key(model)
        return self.nvme_dir / model

    def _present(self, model: str, tier: str) -> Path | None:
        if tier == NVME:
            path = self.nvme_path(model)
            return path if (path / MARKER_FILE).is_file() else None
        return self.dram.path(model) if self.dram is not None and self.dram.has(model) else None

    def _scan(self) -> dict[tuple[str, str], Path]:
        found = {}
        if self.nvme_dir.is_dir():
            for child in self.nvme_dir.iterdir():
                named = _SAFE_MODEL.fullmatch(child.name) or _SLICE_KEY.fullmatch(child.name)
                if not child.name.startswith(".") and named and (child / MARKER_FILE).is_file():
                    found[(child.name, NVME)] = child
        for entry in self.dram.list() if self.dram is not None else []:
            if _SAFE_MODEL.fullmatch(entry.model_id):  # DRAM ids may be longer than model names: no cache entry
                found[(entry.model_id, DRAM)] = entry.path
        return found

    def _sync(self, db: sqlite3.Connection) -> None:
        """Make the entries table match the folders (inside a transaction)."""
        found = self._scan()
        # Only the tiers this manager sees: an NVMe-only manager must not drop the DRAM rows of the agent.
        rows = {(m, t) for m, t in db.execute("SELECT model, tier FROM entries") if t in self.tiers}
        for model, tier in rows - set(found):
            db.execute("DELETE FROM entries WHERE model=? AND tier=?", (model, tier))
        for model, tier in set(found) - rows:
            path = found[(model, tier)]
            info = read_marker(path) if tier == NVME else self._dram_marker(model)
            info = info or {}
            db.execute("INSERT INTO entries VALUES (?,?,?,?,?,?)",
                       (model, tier, int(info.get("bytes") or folder_bytes(path)), info.get("source"),
                        float(info.get("filled_at") or time.time()), info.get("verified_at")))
        # references and fills of processes that died are gone with them
        for (pid,) in db.execute("SELECT DISTINCT pid FROM refs UNION SELECT DISTINCT pid FROM fills").fetchall():
            if not pid_alive(pid):
                db.execute("DELETE FROM refs WHERE pid=?", (pid,))
                db.execute("DELETE FROM fills WHERE pid=?", (pid,))

    def _dram_marker(self, model: str) -> dict:
        try:
            entry = self.dram.entry(model)
        except (DramTierError, OSError, ValueError, KeyError):
            return {}
        return {"bytes": folder_bytes(entry.path), "source": entry.source, "filled_at": entry.filled_at,
                "verified_at": entry.filled_at}

    def _copies(self, db: sqlite3.Connection, where: str = "", args: tuple = ()) -> list[CachedCopy]:
        refs = {(m, t): n for m, t, n in db.execute("SELECT model, tier, SUM(count) FROM refs GROUP BY model, tier")}
        copies = []
        for model, tier, nbytes, source, last_used, verified_at in db.execute(
                f"SELECT model, tier, bytes, source, last_used, verified_at FROM entries {where} "
                f"ORDER BY model, tier", args):
            if tier not in self.tiers:
                continue
            path = self.nvme_path(model) if tier == NVME else self.dram.path(model)
            name, degree, rank = parse_entry_key(model)
            copies.append(CachedCopy(name, tier, path, nbytes, last_used, verified_at is not None,
                                     int(refs.get((model, tier), 0)), source, verified_at, degree, rank))
        return copies

    def list(self) -> list[CachedCopy]:
        self._remove_dead_fills()  # a killed fill (SIGKILL, a cancelled MPI warm) goes as soon as anyone looks
        if self.dram is not None:
            self.dram.clean_stale()  # a killed DRAM fill holds memory
        with self._transaction() as db:
            self._sync(db)
            return self._copies(db)

    def get(self, model: str, tier: str) -> CachedCopy | None:
        with self._transaction() as db:
            self._sync(db)
            found = self._copies(db, "WHERE model=? AND tier=?", (self.nvme_path(model).name, tier))
        return found[0] if found else None

    def usage_bytes(self, tier: str) -> int:
        with self._transaction() as db:
            self._sync(db)
            return self._used(db, self._check_tier(tier))

    def best_copy(self, model: str) -> CachedCopy | None:
        """The fastest cached copy of a model (dram > nvme), marked as just used; None when not cached."""
        check_model_name(model)
        with self._transaction() as db:
            self._sync(db)
            for tier in CACHE_TIERS:
                found = self._copies(db, "WHERE model=? AND tier=?", (model, tier))
                if found:
                    now = time.time()
                    db.execute("UPDATE entries SET last_used=? WHERE model=? AND tier=?", (now, model, tier))
                    copy = found[0]
                    return CachedCopy(**{**asdict(copy), "last_used": now})
        return None

    def path_for_load(self, model: str, source: str | os.PathLike, *, hold: bool = False) -> tuple[Path, str]:
        """Where to load a model from: its fastest cached copy that holds the origin's content and is whole, marked
        as just used, else the origin (tier "sharedfs"). Copies of other content (the name was redeployed from a new
        checkpoint) and broken copies are dropped (kept, but never chosen, while instances use them). A cache that
        cannot be used (its disk gone read-only or failing) loads from the origin: the cache only makes loads faster.
        With `hold`, the copy is also acquired by this process (release() it) in the transaction that found it: one
        evicted after it was chosen and before a separate acquire() failed the start instead of loading elsewhere.
        """
        try:
            return self._cached_for_load(model, source, hold)
        except CacheError as exc:
            log.warning("loading %s from its origin %s: %s", model, source, exc)
            return Path(source), SHAREDFS

    def _cached_for_load(self, model: str, source: str | os.PathLike, hold: bool) -> tuple[Path, str]:
        origin = content_id(source)  # read once per load: the origin is on the shared FS
        self.drop_stale(model, source, origin=origin)
        for tier in self.tiers:
            path = self._present(model, tier)
            if path is None or not self._same_content(path, source, origin) or not self._whole(model, tier, path):
                continue
            with self._transaction() as db:
                self._sync(db)
                # verified_at NULL: found corrupt (or broken) while in use, kept only for the instances using it
                used = db.execute("UPDATE entries SET last_used=? WHERE model=? AND tier=? AND verified_at IS NOT "
                                  "NULL", (time.time(), model, tier))
                if used.rowcount:
                    if hold:
                        self._add_ref(db, model, tier, os.getpid())
                    return path, tier
            # else found corrupt or broken while in use (dropped here if released), or evicted meanwhile: the next
            # tier, or the origin
            self._drop_unless_used(model, tier)
        return Path(source), SHAREDFS

    def _drop_unless_used(self, model: str, tier: str) -> None:
        """Drop a copy found corrupt once no instance uses it any more (one that still does keeps it)."""
        try:
            if self._drop(model, tier):
                log.warning("dropped the %s copy of %s: it failed a check while in use", tier, model)
        except CacheInUse:
            log.info("the %s copy of %s failed a check and is in use: not loading it, kept until released", tier,
                     model)

    def _whole(self, model: str, tier: str, path: Path) -> bool:
        """The copy's manifest and index parse and every file is there with its size (no hashing: the loader checks
        the bytes). A load of a broken copy fails as a corrupt one does not (TruncatedFile, MissingFile), so the
        agent would never replace it and every start of the model on this node would fail: it is dropped here."""
        try:
            read_checkpoint(path).check_files_present()
            return True
        except CheckpointError as exc:
            log.warning("the %s copy of %s is broken, not loading it: %s", tier, model, exc)
        try:
            self._drop(model, tier)
        except CacheInUse:
            with self._transaction() as db:
                db.execute("UPDATE entries SET verified_at=NULL WHERE model=? AND tier=?", (model, tier))
        return False

    @staticmethod
    def _same_content(copy: Path, source: str | os.PathLike, origin: str | None = None) -> bool:
        """The copy holds the origin's checkpoint (`origin`: its content_id, when the caller read it already). An
        origin whose manifest cannot be read now (the shared FS is away) cannot tell: the copy is used, as it was the
        last time the origin could be compared."""
        origin = origin or content_id(source)
        if origin is None:
            log.warning("cannot read %s to compare with the cached copy %s: using the copy", source, copy)
            return True
        return content_id(copy) == origin

    def drop_stale(self, model: str, source: str | os.PathLike, tiers: tuple[str, ...] | None = None,
                   origin: str | None = None) -> list[str]:
        """Drop the model's copies whose content is not the origin's at `source` (a redeploy of the name from a new
        checkpoint; `origin`: its content_id, when the caller read it already); a stale copy still in use stays until
        its instances stop, but is never chosen for a load. Returns the tiers dropped."""
        dropped = []
        for tier in tiers or self.tiers:
            path = self._present(model, tier)
            if path is None or self._same_content(path, source, origin):
                continue
            try:
                self._drop(model, tier)
                dropped.append(tier)
                log.info("dropped the %s copy of %s: its content is not that of %s (redeployed?)", tier, model,
                         source)
            except CacheInUse:
                log.info("the %s copy of %s is stale (not the content of %s) but in use: kept until released",
                         tier, model, source)
        return dropped

    # ---------------------------------------------------------------------------------------------- references

    def acquire(self, model: str, tier: str, pid: int | None = None, *, verified_only: bool = False) -> CachedCopy:
        """Mark a copy in use (by `pid`, default this process): it is not evicted until released or `pid` dies.
        `model` may be a slice_key (a slice copy). With `verified_only`, a copy found corrupt or broken while in use
        (kept, unverified, for the instances using it) is refused (CacheCorrupt): a new reader takes the origin."""
        parse_entry_key(model)
        self._check_tier(tier)
        pid = pid or os.getpid()
        with self._transaction() as db:
            self._sync(db)
            found = self._copies(db, "WHERE model=? AND tier=?", (model, tier))
            if not found:
                raise UnknownModel(f"model {model!r} is not in this node's {tier} cache; warm it first")
            if verified_only and not found[0].verified:
                raise CacheCorrupt(f"the {tier} copy of {model!r} was found corrupt or broken while in use; it is "
                                   f"kept only for the instances using it")
            self._add_ref(db, model, tier, pid)
            db.execute("UPDATE entries SET last_used=? WHERE model=? AND tier=?", (time.time(), model, tier))
            return self._copies(db, "WHERE model=? AND tier=?", (model, tier))[0]

    @staticmethod
    def _add_ref(db: sqlite3.Connection, model: str, tier: str, pid: int) -> None:
        db.execute("INSERT INTO refs VALUES (?,?,?,1) ON CONFLICT(model, tier, pid) DO UPDATE SET count=count+1",
                   (model, tier, pid))

    def release(self, model: str, tier: str, pid: int | None = None) -> None:
        """Drop one reference taken by acquire (a release without an acquire is ignored)."""
        pid = pid or os.getpid()
        with self._transaction() as db:
            db.execute("UPDATE refs SET count=count-1 WHERE model=? AND tier=? AND pid=?", (model, tier, pid))
            db.execute("DELETE FROM refs WHERE count<=0")
            db.execute("UPDATE entries SET last_used=? WHERE model=? AND tier=?", (time.time(), model, tier))

    @contextmanager
    def using(self, model: str, tier: str) -> Iterator[CachedCopy]:
        copy = self.acquire(model, tier)
        try:
            yield copy
        finally:
            self.release(model, tier)

    # ------------------------------------------------------------------------------------------------- warming

    @contextmanager
    def _one_warm(self, key: str, tier: str, wait: bool = True) -> Iterator[None]:
        """Warms of one entry (a model or slice key) in one tier take turns in this process: the second then finds
        the first's copy. Side by side, each reserved room for a whole copy, evicting other models' copies to hold
        the same model twice. Without `wait`, FillInProgress while one is under way."""
        with self._warm_locks_guard:
            lock = self._warm_locks.setdefault((key, tier), threading.Lock())
        if not lock.acquire(blocking=wait):
            raise _being_copied(key, tier, "by another warm", "retry")
        try:
            yield
        finally:
            lock.release()

    def warm(self, model: str, source: str | os.PathLike, tier: str = NVME, progress: Progress | None = None, *,
             force: bool = False, wait: bool = True) -> CachedCopy:
        """Copy the checkpoint at `source` into a tier (verified, atomic); a present copy is reused unless force (or
        it was found corrupt, or is broken: then it is replaced, CacheInUse while an instance uses it). A warm of the
        same copy under way is waited for, or with wait=False FillInProgress (the agent's API: a caller asking again
        after it gave up would hold one of the agent's threads for the whole copy).

        Evicts least-recently-used copies not in use to make room; NotEnoughSpace when even that is not enough.
        """
        check_model_name(model)
        self._check_tier(tier)
        ckpt = open_origin(model, source)
        with self._one_warm(model, tier, wait):
            return self._warm(model, ckpt, source, tier, progress, force)

    def _warm(self, model: str, ckpt: Checkpoint, source: str | os.PathLike, tier: str, progress: Progress | None,
              force: bool) -> CachedCopy:
        origin = str(Path(source).resolve())
        existing = self.get(model, tier)
        # reused when it holds the origin's content, was not found corrupt since (verified) and is whole
        if existing is not None and not force and self._same_content(existing.path, source) and existing.verified \
                and self._whole(model, tier, existing.path):
            return self.best_copy_in(model, tier)
        if existing is not None and not self._same_content(existing.path, source):
            force = True  # a copy of another checkpoint under this name: replace it (CacheInUse while it is used)
        if existing is not None:
            self._drop(model, tier)
        folder = self.nvme_dir / filling_name(model) if tier == NVME else self.dram.staging_path(model)
        fill_id = self.reserve_fill(model, tier, checkpoint_bytes(ckpt), folder)
        try:
            if tier == NVME:
                self._fill_nvme(model, ckpt, origin, progress, folder)
            else:
                self._fill_dram(model, ckpt, origin, progress, folder)
        finally:
            self.end_fill(fill_id)
        with self._transaction() as db:
            self._sync(db)
            now = time.time()
            db.execute("UPDATE entries SET source=?, verified_at=?, last_used=? WHERE model=? AND tier=?",
                       (origin, now, now, model, tier))
            return self._copies(db, "WHERE model=? AND tier=?", (model, tier))[0]

    # ----------------------------------------------------------------------------------------- slice copies

    def warm_slices(self, model: str, source: str | os.PathLike, degree: int, rank: int, *,
                    force: bool = False, wait: bool = True) -> CachedCopy:
        """Keep rank `rank` of a degree-`degree` tensor-parallel instance's slices of `model` on this node's NVMe
        (hpcllm.tp.slicecache: each piece one contiguous read, verified with the strip hashes before and after it is
        written; visible only once complete). A present copy of the same checkpoint version is reused unless force;
        one to replace that a rank holds is CacheInUse. `wait`: as for warm.
        """
        key = slice_key(model, degree, rank)
        ckpt = open_origin(model, source)
        with self._one_warm(key, NVME, wait):
            return self._warm_slices(model, ckpt, source, degree, rank, force)

    def _warm_slices(self, model: str, ckpt: Checkpoint, source: str | os.PathLike, degree: int, rank: int,
                     force: bool) -> CachedCopy:
        from hpcllm.tp.slicecache import manifest_fingerprint, planned_copy_bytes, usable_slice_copy

        key = slice_key(model, degree, rank)
        origin = str(Path(source).resolve())
        existing = self.get(key, NVME)
        if existing is not None and not force and usable_slice_copy(existing.path, degree, rank,
                                                                    manifest_fingerprint(ckpt.root)):
            return self.best_copy_in(key, NVME)
        if existing is not None:
            self._evict_entry(key, NVME)
        try:
            need = planned_copy_bytes(ckpt.root, degree, rank)
        except HpcllmError as exc:  # the degree does not split the model, no strip hashes: say what to fix
            raise CacheError(f"model {model!r}: cannot keep rank {rank} of {degree}'s slices: {exc}") from None
        tmp = self.nvme_dir / filling_name(key)
        fill_id = self.reserve_fill(key, NVME, need, tmp)
        try:
            self._fill_nvme_with(key, origin, lambda folder: self._write_slices(model, ckpt, degree, rank, folder), tmp)
        finally:
            self.end_fill(fill_id)
        with self._transaction() as db:
            self._sync(db)
            now = time.time()
            db.execute("UPDATE entries SET source=?, verified_at=?, last_used=? WHERE model=? AND tier=?",
                       (origin, now, now, key, NVME))
            return self._copies(db, "WHERE model=? AND tier=?", (key, NVME))[0]

    def slice_copy(self, model: str, degree: int, rank: int) -> CachedCopy | None:
        """This node's slice copy of rank `rank` of `degree` of `model`, marked as just used; None when absent."""
        key = slice_key(model, degree, rank)
        if self.get(key, NVME) is None:
            return None
        return self.best_copy_in(key, NVME)

    @staticmethod
    def _write_slices(model: str, ckpt: Checkpoint, degree: int, rank: int, folder: Path) -> None:
        from hpcllm.tp.slicecache import write_slice_copy

        try:
            write_slice_copy(ckpt.root, degree, rank, folder)
        except ChecksumMismatch as exc:
            raise CacheCorrupt(f"model {model!r}: rank {rank} of {degree}'s slices do not verify: {exc}") from None
        except HpcllmError as exc:
            raise CacheError(f"model {model!r}: cannot keep rank {rank} of {degree}'s slices: {exc}") from None

    def _refill_slices(self, copy: CachedCopy, reason: str) -> VerifyResult:
        if copy.in_use:
            with self._transaction() as db:
                db.execute("UPDATE entries SET verified_at=NULL WHERE model=? AND tier=?", (copy.key, copy.tier))
            return VerifyResult(copy.key, copy.tier, False, "kept-in-use",
                                f"corrupt but in use by {copy.in_use} instance(s); evict it once they stop: {reason}")
        self._evict_entry(copy.key, copy.tier)
        if not copy.source:
            return VerifyResult(copy.key, copy.tier, False, "dropped", f"corrupt and its origin is unknown: {reason}")
        try:
            self.warm_slices(copy.model, copy.source, copy.tensor_parallel, copy.rank)
        except HpcllmError as exc:
            return VerifyResult(copy.key, copy.tier, False, "dropped", f"corrupt ({reason}); refill failed: {exc}")
        return VerifyResult(copy.key, copy.tier, False, "refilled", f"corrupt, refilled from {copy.source}: {reason}")

    def _evict_entry(self, key: str, tier: str) -> None:
        """Remove one entry (a slice copy being replaced); CacheInUse while a rank holds it: its folder is read."""
        with self._transaction() as db:
            self._sync(db)
            self._refuse_in_use(f"{key} (a slice copy)", self._copies(db, "WHERE model=? AND tier=?", (key, tier)))
            trash = self._unlink_entry(db, key, tier)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------------------------------- cache on load

    def begin_load_fill(self, model: str, source: str | os.PathLike, tiers: tuple[str, ...] | list[str]
                        ) -> LoadFill | None:
        """Prepare to keep what a load from `source` reads: reserve room in each tier of `tiers` that does not
        hold the model yet (LRU eviction of copies not in use) and make an empty staging folder for the loading
        worker's tee. Tiers that do not fit are skipped; None when nothing is left to fill (the load goes on)."""
        check_model_name(model)
        ckpt = open_origin(model, source)
        need = checkpoint_bytes(ckpt)
        self.drop_stale(model, source, tuple(t for t in tiers if t in self.tiers))
        kept, fill_ids = [], []
        # What each tier's fill writes: the worker's tee writes the staging folder, the NVMe copy once renamed;
        # the DRAM copy is written at the commit (the free-space checks of other fills count what is not written).
        staging = self.nvme_dir / filling_name(model)
        dram_staging = self.dram.staging_path(model) if self.dram is not None else None
        try:
            for tier in tiers:
                if tier not in self.tiers or tier in kept or self._present(model, tier) is not None:
                    continue
                try:
                    fill_ids.append(self.reserve_fill(model, tier, need, staging if tier == NVME else dram_staging))
                    kept.append(tier)
                except (NotEnoughSpace, FillInProgress) as exc:
                    log.info("no %s copy of %s on load: %s", tier, model, exc)
        except BaseException:  # e.g. the state file failing: the reservations made go, not with the agent's exit
            self.end_fills(fill_ids)
            raise
        if not kept:
            return None
        try:
            staging.mkdir()
        except OSError as exc:
            self.end_fills(fill_ids)
            log.warning("no copy of %s on load: cannot create %s: %s", model, staging, exc.strerror or exc)
            return None
        return LoadFill(model, str(Path(source).resolve()), staging, tuple(kept), tuple(fill_ids), dram_staging)

    @staticmethod
    def wait_for_tee(fill: LoadFill, alive: Callable[[], bool], timeout: float, poll: float = 0.1) -> None:
        """Wait while the loading worker (alive()) still writes the copy: a CPU load writes it after the model is
        ready. Returns when it is complete or failed, the worker is gone, or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not ((fill.staging / TEE_COMPLETE).exists() or (fill.staging / TEE_FAILED).exists()):
            if not alive() or time.monotonic() > deadline:
                return
            time.sleep(poll)

    def commit_load_fill(self, fill: LoadFill) -> list[CachedCopy]:
        """The load that wrote `fill.staging` succeeded: re-hash what it wrote, then make it visible in each tier
        (DRAM: DramTier.put from the staging copy; NVMe: marker + rename). CacheCorrupt when the copy is incomplete
        or does not verify; nothing is visible then. The staging folder and the reservations are gone either way."""
        committed = []
        try:
            done = fill.staging / TEE_COMPLETE
            if not done.is_file():
                try:
                    reason = (fill.staging / TEE_FAILED).read_text()
                except OSError:
                    reason = "see the worker's log"
                raise CacheCorrupt(f"model {fill.model!r}: the load wrote no complete copy ({reason})")
            done.unlink()
            try:
                sync_files(fill.staging)  # the tee leaves this to us, so the load is not kept waiting for the disk
            except OSError as exc:
                raise CacheError(f"model {fill.model!r}: syncing the copy written on load failed: "
                                 f"{exc.strerror or exc}") from None
            try:
                read_checkpoint(fill.staging).verify_files()
            except CheckpointError as exc:
                raise CacheCorrupt(f"model {fill.model!r}: the copy written on load does not verify: {exc}") from None
            if DRAM in fill.tiers:
                try:
                    self.dram.dir.mkdir(parents=True, exist_ok=True)
                    self.dram.put(fill.staging, fill.model, staging=fill.dram_staging, origin=fill.origin)
                    committed.append(DRAM)
                except (DramTierError, OSError) as exc:
                    log.warning("no DRAM copy of %s on load: %s", fill.model, exc)
            if NVME in fill.tiers:
                try:
                    write_marker(fill.staging, fill.model, fill.origin, folder_bytes(fill.staging), time.time())
                    fsync_dir(fill.staging)
                    os.rename(fill.staging, self.nvme_path(fill.model))
                    fsync_dir(self.nvme_dir)
                    committed.append(NVME)
                except OSError as exc:  # also: a concurrent fill of the same model won the race (it is cached)
                    if self._present(fill.model, NVME) is None:
                        log.warning("no NVMe copy of %s on load: %s", fill.model, exc.strerror or exc)
        finally:
            shutil.rmtree(fill.staging, ignore_errors=True)
            self.end_fills(fill.fill_ids)
        with self._transaction() as db:
            self._sync(db)
            now = time.time()
            for tier in committed:
                db.execute("UPDATE entries SET source=?, verified_at=?, last_used=? WHERE model=? AND tier=?",
                           (fill.origin, now, now, fill.model, tier))
            return [c for tier in committed for c in self._copies(db, "WHERE model=? AND tier=?", (fill.model, tier))]

    def discard_load_fill(self, fill: LoadFill) -> None:
        """The load failed (or its worker went before it was ready): its partial copy goes, nothing was visible."""
        shutil.rmtree(fill.staging, ignore_errors=True)
        self.end_fills(fill.fill_ids)

    def best_copy_in(self, model: str, tier: str) -> CachedCopy:
        with self._transaction() as db:
            db.execute("UPDATE entries SET last_used=? WHERE model=? AND tier=?", (time.time(), model, tier))
            return self._copies(db, "WHERE model=? AND tier=?", (model, tier))[0]

    def _fill_nvme(self, model: str, ckpt: Checkpoint, origin: str, progress: Progress | None, tmp: Path) -> None:
        def copy(folder: Path) -> None:
            try:
                copy_checkpoint(ckpt, folder, progress)
            except ChecksumMismatch as exc:
                raise CacheCorrupt(f"model {model!r}: the origin {origin} does not match its manifest: {exc}") from None

        self._fill_nvme_with(model, origin, copy, tmp)

    def _fill_nvme_with(self, model: str, origin: str, write: Callable[[Path], None], tmp: Path) -> None:
        """Fill the NVMe entry `model` (a model or a slice key): `write` fills the hidden folder `tmp` (a
        filling_name, the one its reservation names), which gets its marker and is renamed into place; on any
        failure the folder goes and nothing was visible."""
        try:
            tmp.mkdir()
            write(tmp)
            write_marker(tmp, model, origin, folder_bytes(tmp), time.time())
            fsync_dir(tmp)
            try:
                os.rename(tmp, self.nvme_path(model))
            except OSError:
                if self._present(model, NVME) is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # a concurrent warm of the same model won the race
            fsync_dir(self.nvme_dir)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CacheError(f"model {model!r}: writing the NVMe copy in {self.nvme_dir} failed: "
                             f"{exc.strerror or exc}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _fill_dram(self, model: str, ckpt: Checkpoint, origin: str, progress: Progress | None, staging: Path
                   ) -> None:
        """Fill the DRAM copy from the node's NVMe copy when it has a good one, else from the origin; the copy names
        the origin as its source either way (a manager that learns of it from its marker refills it from there)."""
        total = checkpoint_bytes(ckpt)
        if progress:
            progress(0, total)
        source = self._usable_nvme_copy(model, ckpt) or ckpt.root
        try:
            self.dram.dir.mkdir(parents=True, exist_ok=True)
            try:
                self.dram.put(source, model, staging=staging, origin=origin)
            except CheckpointError as exc:
                if source == ckpt.root:
                    raise
                # the NVMe copy's fault, not the origin's: replace that copy first (one read of the origin), then
                # fill from the new copy, or from the origin when it could not be replaced
                log.warning("the NVMe copy of %s is corrupt, filling DRAM without it: %s", model, exc)
                refilled = self._replace_corrupt(model, NVME, str(exc)) == "refilled"
                source = self.nvme_path(model) if refilled else ckpt.root
                self.dram.put(source, model, staging=staging, origin=origin)
        except DramTierError as exc:
            raise NotEnoughSpace(f"model {model!r}: {exc}") from None
        except ChecksumMismatch as exc:
            raise CacheCorrupt(f"model {model!r}: {source} does not match its manifest: {exc}") from None
        if progress:
            progress(total, total)

    def _usable_nvme_copy(self, model: str, ckpt: Checkpoint) -> Path | None:
        """The node's NVMe copy as a DRAM fill's source (faster than the shared FS): only one of the origin's content,
        not found corrupt (verified) and whole, as path_for_load takes it (a broken one is dropped by _whole)."""
        local = self.get(model, NVME)
        if local is None or not local.verified or not self._same_content(local.path, ckpt.root):
            return None
        return local.path if self._whole(model, NVME, local.path) else None

    def _replace_corrupt(self, model: str, tier: str, reason: str) -> str | None:
        """handle_corrupt, logged: a failure to replace the copy is not the caller's (it has what it needed).
        Returns handle_corrupt's action, None when it failed."""
        try:
            result = self.handle_corrupt(model, tier, reason)
            log.warning("corrupt %s copy of %s: %s (%s)", tier, model, result.action, result.message)
            return result.action
        except HpcllmError as exc:
            log.warning("replacing the corrupt %s copy of %s failed: %s", tier, model, exc)
            return None

    def end_fill(self, fill_id: str) -> None:
        """The fill reserved by reserve_fill is over (committed or abandoned): its bytes stop counting."""
        self.end_fills((fill_id,))

    def end_fills(self, fill_ids) -> None:
        if not fill_ids:  # no write transaction for nothing: on an error path, its own failure would hide the first
            return
        with self._transaction() as db:
            db.executemany("DELETE FROM fills WHERE id=?", [(fill_id,) for fill_id in fill_ids])

    @staticmethod
    def _check_no_fill_of(db, model: str, tiers: tuple[str, ...], then: str = "retry", slices: bool = False) -> None:
        """FillInProgress when the entry `model` (and with `slices`, a slice copy of it) is being filled in `tiers`.
        Two fills of one copy side by side would each reserve room for it, evicting other models' copies."""
        for key, tier, pid in db.execute("SELECT model, tier, pid FROM fills"):
            if tier in tiers and (key == model or (slices and parse_entry_key(key)[0] == model)):
                raise _being_copied(model, tier, f"process {pid}", then)

    def reserve_fill(self, model: str, tier: str, need: int, folder: Path | None = None) -> str:
        """Evict LRU copies not in use until `need` bytes fit, and record the fill so concurrent fills count it
        (in every process on the node: the row goes with end_fill, or with its process). `folder`: where the fill
        writes, so others count only what it has not written yet against the filesystem's free space."""
        evicted: list[Path] = []
        with self._transaction() as db:
            self._sync(db)
            self._check_no_fill_of(db, model, (tier,))
            capacity = self.capacity[tier]
            used = self._used(db, tier)
            unwritten = self._unwritten(db, tier)
            free_disk = self._free_disk(tier) - unwritten
            candidates = [c for c in self._copies(db, "WHERE tier=? AND model<>?", (tier, model)) if not c.in_use]
            candidates.sort(key=lambda c: c.last_used)
            evictable = sum(c.bytes for c in candidates)
            fits_capacity = used - evictable + need <= capacity
            fits_disk = free_disk + evictable >= need
            if not (fits_capacity and fits_disk):
                in_use = [c for c in self._copies(db, "WHERE tier=?", (tier,)) if c.in_use]
                raise NotEnoughSpace(
                    f"model {model!r} needs {human_size(need)} in the {tier} tier: capacity {human_size(capacity)}, "
                    f"{human_size(used)} used ({human_size(used - evictable)} by copies in use or fills in progress"
                    + (f": {', '.join(c.model for c in in_use)}" if in_use else "")
                    + f"), {human_size(max(free_disk, 0))} free on the filesystem"
                    + (f" once the fills in progress have written their last {human_size(unwritten)}" if unwritten else "")
                    + f"; free space or raise the {tier}_capacity_gb setting")
            for copy in candidates:
                if used + need <= capacity and free_disk >= need:
                    break
                evicted.append(self._unlink_entry(db, copy.key, tier))
                used -= copy.bytes
                free_disk += copy.bytes
            fill_id = uuid.uuid4().hex
            db.execute("INSERT INTO fills (id, model, tier, pid, bytes, folder) VALUES (?,?,?,?,?,?)",
                       (fill_id, model, tier, os.getpid(), need, str(folder) if folder is not None else None))
        for path in evicted:
            shutil.rmtree(path, ignore_errors=True)
        return fill_id

    def _used(self, db: sqlite3.Connection, tier: str) -> int:
        """Bytes a tier holds: its copies plus the fills in progress (reserved before they start writing)."""
        held = db.execute("SELECT COALESCE(SUM(bytes),0) FROM entries WHERE tier=?", (tier,)).fetchone()[0]
        filling = db.execute("SELECT COALESCE(SUM(bytes),0) FROM fills WHERE tier=?", (tier,)).fetchone()[0]
        return int(held) + int(filling)

    @staticmethod
    def _unwritten(db: sqlite3.Connection, tier: str) -> int:
        """Bytes the fills in progress in a tier have reserved but not written yet: the filesystem's free space
        still shows them, and a fill counting them as free would run out of room midway (ENOSPC)."""
        pending = 0
        for nbytes, folder in db.execute("SELECT bytes, folder FROM fills WHERE tier=?", (tier,)).fetchall():
            pending += max(0, nbytes - (folder_bytes(Path(folder), allocated=True) if folder else 0))
        return pending

    def _free_disk(self, tier: str) -> int:
        root = self.nvme_dir if tier == NVME else self.dram.dir
        while not root.exists() and root != root.parent:
            root = root.parent
        try:
            return shutil.disk_usage(root).free
        except OSError:
            return 0

    # ---------------------------------------------------------------------------------------------- eviction

    def _unlink_entry(self, db: sqlite3.Connection, model: str, tier: str) -> Path | None:
        """Rename a copy out of sight (inside the transaction); returns what to delete after it commits."""
        db.execute("DELETE FROM entries WHERE model=? AND tier=?", (model, tier))
        if tier == DRAM:
            self.dram.remove(model)  # renames away, then deletes; open mappings stay valid
            return None
        path = self.nvme_path(model)
        trash = self.nvme_dir / f".{model}.evicted-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return None
        return trash

    def evict(self, model: str, tier: str | None = None, *, force: bool = False) -> list[CachedCopy]:
        """Remove a model's copies (one tier or all); CacheInUse when one is held (unless force), FillInProgress
        while one is being copied in (it would appear after the eviction, which had found nothing to remove)."""
        return self._evict(model, tier, force=force, refuse_fills=True, slices=True)

    def _drop(self, model: str, tier: str) -> list[CachedCopy]:
        """Remove the whole copy in a tier (stale, corrupt, broken, or about to be replaced); CacheInUse when it is
        held. A fill of the model going on meanwhile is another copy, not this one's concern, and so are its slice
        copies (their own content checks keep them right; a running rank may read one)."""
        return self._evict(model, tier, force=False, refuse_fills=False, slices=False)

    def _evict(self, model: str, tier: str | None, *, force: bool, refuse_fills: bool,
               slices: bool) -> list[CachedCopy]:
        check_model_name(model)
        tiers = (self._check_tier(tier),) if tier else self.tiers
        trash = []
        with self._transaction() as db:
            self._sync(db)
            if refuse_fills:
                self._check_no_fill_of(db, model, tiers, "evict it", slices=True)
            # its whole copies and, with `slices`, (NVMe) its slice copies of every degree
            copies = [c for c in self._copies(db, "WHERE model=? OR model LIKE ?", (model, f"{model}+tp%"))
                      if c.tier in tiers and c.model == model and (slices or c.tensor_parallel is None)]
            if not force:
                self._refuse_in_use(f"model {model!r}", copies)
            for copy in copies:
                trash.append(self._unlink_entry(db, copy.key, copy.tier))
        for path in trash:
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
        return copies

    @staticmethod
    def _refuse_in_use(what: str, copies: list[CachedCopy]) -> None:
        """CacheInUse naming `what` when an instance holds one of `copies` (about to be removed: its folder is read)."""
        busy = [c for c in copies if c.in_use]
        if busy:
            raise CacheInUse(f"{what} is in use in the {', '.join(c.tier for c in busy)} tier by "
                             f"{sum(c.in_use for c in busy)} instance(s); stop them first")

    def _remove_dead_fills(self, trash_too: bool = False) -> int:
        """Delete NVMe fill folders whose writer is dead (and, if asked, half-deleted evictions); returns how many.

        The folder is renamed away first, so two processes cleaning at once never both work on one folder."""
        removed = 0
        try:
            children = list(self.nvme_dir.iterdir())
        except OSError:
            return 0
        for child in children:
            filling = _FILLING.match(child.name)
            dead_fill = filling is not None and not pid_alive(int(filling.group("pid")))
            if not (dead_fill or (trash_too and _TRASH.match(child.name))):
                continue
            target = child
            if dead_fill:
                target = self.nvme_dir / f".{filling.group('model')}.evicted-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(child, target)
                except OSError:  # another process got there first
                    continue
            shutil.rmtree(target, ignore_errors=True)
            removed += 1
        return removed

    def clean_stale(self) -> int:
        """Delete fills left by dead processes and half-deleted evictions; returns how many folders went."""
        removed = self._remove_dead_fills(trash_too=True)
        if self.dram is not None:
            removed += self.dram.clean_stale()
        with self._transaction() as db:
            self._sync(db)
        return removed

    # ---------------------------------------------------------------------------------------------- verifying

    def verify(self, model: str | None = None) -> list[VerifyResult]:
        """Re-hash every cached copy (or one model's); a corrupt copy is dropped and refilled from its origin."""
        copies = [c for c in self.list() if model is None or c.model == model]
        if model is not None and not copies:
            raise UnknownModel(f"model {model!r} is not cached on this node")
        return [self._verify_one(c) for c in copies]

    def _verify_one(self, copy: CachedCopy) -> VerifyResult:
        try:
            if copy.tensor_parallel is None:
                read_checkpoint(copy.path).verify_files()
            else:  # a slice copy: its pieces against the origin's strip hashes
                from hpcllm.tp.slicecache import OriginUnreadable, verify_slice_copy

                try:
                    verify_slice_copy(copy.source, copy.path)
                except OriginUnreadable as exc:  # no origin is no corrupt copy
                    return VerifyResult(copy.key, copy.tier, False, "unchecked", f"kept, not checked: {exc}")
        except CheckpointError as exc:
            return self.handle_corrupt(copy.key, copy.tier, str(exc))
        with self._transaction() as db:
            db.execute("UPDATE entries SET verified_at=? WHERE model=? AND tier=?", (time.time(), copy.key,
                                                                                     copy.tier))
        return VerifyResult(copy.key, copy.tier, True, "ok")

    def verify_tensor_parallel_copies(self, model: str, degree: int, tier: str, error: str) -> list[VerifyResult]:
        """After a degree-`degree` instance of `model` failed its load on a copy's bytes or files (`error`: its
        error, which names the file a rank failed on): re-hash the copies its ranks on this node may have read, a
        corrupt one dropped and refilled (handle_corrupt). First those whose folder the error names; when none of
        them is found corrupt (the error names the origin, or a path spelt otherwise), every slice copy of that
        degree. A whole copy (the one in `tier`, the NVMe one a rank of an instance spanning nodes reads: the whole
        model's bytes to hash) only when the error names it. A copy an instance starting meanwhile holds is kept
        (kept-in-use), the others still checked."""
        def named(copy: CachedCopy) -> bool:
            return f"{copy.path}{os.sep}" in error

        copies = [c for c in self.list() if c.model == model
                  and (c.tensor_parallel == degree if c.tensor_parallel is not None
                       else c.tier in (tier, NVME) and named(c))]
        results = [self._verify_in_use_kept(c) for c in copies if named(c)]
        if all(r.ok for r in results):
            results += [self._verify_in_use_kept(c) for c in copies if not named(c)]
        return results

    def _verify_in_use_kept(self, copy: CachedCopy) -> VerifyResult:
        """_verify_one, a copy an instance took after it was listed kept (its ranks read it: not removed)."""
        try:
            return self._verify_one(copy)
        except CacheInUse as exc:
            return VerifyResult(copy.key, copy.tier, False, "kept-in-use", f"corrupt but {exc}")

    def handle_corrupt(self, model: str, tier: str, reason: str = "") -> VerifyResult:
        """A copy failed a checksum (on verify, or the loader's ChecksumMismatch): drop it, refill from its origin.

        A copy in use is marked unverified and kept (its users hold mappings); once released, the next load drops it
        (path_for_load), verify or warm replaces it, or LRU eviction takes it.
        """
        copy = self.get(model, tier)
        if copy is None:
            return VerifyResult(model, tier, False, "dropped", f"not cached any more; {reason}")
        if copy.tensor_parallel is not None:
            return self._refill_slices(copy, reason)
        if copy.in_use:
            with self._transaction() as db:
                db.execute("UPDATE entries SET verified_at=NULL WHERE model=? AND tier=?", (model, tier))
            return VerifyResult(model, tier, False, "kept-in-use",
                                f"corrupt but in use by {copy.in_use} instance(s); evict it once they stop: {reason}")
        self._drop(model, tier)
        if not copy.source:
            return VerifyResult(model, tier, False, "dropped", f"corrupt and its origin is unknown: {reason}")
        try:
            self.warm(model, copy.source, tier)
        except HpcllmError as exc:
            return VerifyResult(model, tier, False, "dropped", f"corrupt ({reason}); refill failed: {exc}")
        return VerifyResult(model, tier, False, "refilled", f"corrupt, refilled from {copy.source}: {reason}")


def node_slice_copy(node_config, model: str, degree: int, rank: int) -> Path | None:
    """This node's slice copy of rank `rank` of `degree` of `model` (the node's NVMe cache from `node_config`,
    node.nvme_dir with %n/%j expanded for the node this process runs on), held in use by this process so it is not
    evicted while the rank reads it (the reference goes with the process); None when the node has none.
    What a tensor-parallel rank calls before its load (hpcllm worker --tensor-parallel)."""
    return _hold_node_copy(node_config, slice_key(model, degree, rank), f"rank {rank} of {degree}: the slice copy")


def node_model_copy(node_config, model: str, source: str | os.PathLike) -> Path | None:
    """This node's whole NVMe copy of `model` holding the origin's checkpoint at `source`, held in use by this
    process (as node_slice_copy); None when the node has none (or only one of other content). What a rank of an
    instance spanning nodes reads its slices from on its node (the agent gives every rank the origin's path)."""
    nvme_dir = _node_nvme_dir(node_config)
    folder = nvme_dir / model if nvme_dir is not None else None
    if folder is None or not (folder / MARKER_FILE).is_file() or not CacheManager._same_content(folder, source):
        return None
    return _hold_node_copy(node_config, model, "the node's copy")


def _node_nvme_dir(node_config) -> Path | None:
    """node.nvme_dir on this node; None (logged) where it names a variable not set here: the rank reads the origin."""
    try:
        return Path(expand_node_pattern(str(node_config.nvme_dir), node_name(), slurm_job_id(), "node.nvme_dir"))
    except ConfigError as exc:
        log.warning("%s: not looking for a node copy: %s", node_name(), exc)
        return None


def _hold_node_copy(node_config, key: str, what: str) -> Path | None:
    nvme_dir = _node_nvme_dir(node_config)
    if nvme_dir is None or not (nvme_dir / key / MARKER_FILE).is_file():
        return None
    try:
        manager = CacheManager(nvme_dir, int(node_config.nvme_capacity_gb * 1e9), 0, dram_namespace=None,
                               nvme_scope=node_config.nvme_scope)
        return manager.acquire(key, NVME, verified_only=True).path
    except CacheError as exc:  # evicted meanwhile, found corrupt, state file unreadable: the rank reads the origin
        log.warning("%s: not using %s %s: %s", node_name(), what, nvme_dir / key, exc)
        return None
