"""Where files live: their metadata (owner, name, purpose, size) in the limits database, their bytes in the files
directory (gateway.files_dir, default <state_dir>/gateway/files; a shared filesystem for several gateway hosts).

A file belongs to the API key that uploaded it (or whose batch wrote it), named by the key's digest as stored
responses are (hpcllm.gateway.response_store.owner_of): any other key is told it does not exist. An upload is
written to a hidden temporary file and renamed into place once whole, and only then recorded, so no reader ever
sees half a file; a deletion expires the row first (the sweep deletes it), then removes the bytes.

A file may expire (its expires_after, or the site's gateway.files_ttl_days): from then on it is invisible (404) and
the runners' sweep deletes its bytes, and its row a day later (PLACE_KEPT_S), unless an active batch still reads it.
A deleted file an active batch reads is expired at once the same way (a process taking the batch over reads it
again): the deletion and a batch's creation over the file take turns (BatchStore.insert), so the one finds the other.
A key's files may together hold at most gateway.files_quota_bytes.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from flask import current_app

from hpcllm.config import Config
from hpcllm.controller.registry.databases import Database
from hpcllm.gateway.errors import STORAGE_QUOTA_EXCEEDED, InvalidRequest
from hpcllm.gateway.files.protocol import FileObject, ListQuery, PageQuery
from hpcllm.gateway.protocol import unplaced_after
from hpcllm.gateway.runtime import gateway_state_dir
from hpcllm.gateway.shared_state import SharedState
from hpcllm.httpkit.errors import RequestTooLarge

SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_files (id TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL,
                                          filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
                                          expires REAL);
CREATE INDEX IF NOT EXISTS gateway_files_owner ON gateway_files (owner, created);
"""
# A file is visible until it expires (NULL: never).
LIVE = "(expires IS NULL OR expires > ?)"
COPY_CHUNK = 1024 * 1024
# How long the sweep keeps the row of a file it deleted (its bytes go at once): a list's `after` naming it still
# places the next page (a pager, or a clean-up loop deleting the files it lists, across a sweep).
PLACE_KEPT_S = 24 * 3600.0
# An upload's hidden temporary not written to for this long was left by a process killed mid-copy (a live upload
# writes it at every COPY_CHUNK): the sweep removes it.
ABANDONED_UPLOAD_S = 3600.0
EXTENSION_KEY = "hpcllm_files"


def files_dir(config: Config) -> Path:
    return Path(config.gateway.files_dir or gateway_state_dir(config) / "files")


def current_files() -> FileStore:
    return current_app.extensions[EXTENSION_KEY]


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class StoredFile:
    id: str
    created: float
    filename: str
    purpose: str
    bytes: int
    expires: float | None = None

    def wire(self) -> FileObject:
        return FileObject(id=self.id, bytes=self.bytes, created_at=int(self.created), filename=self.filename,
                          purpose=self.purpose, expires_at=None if self.expires is None else int(self.expires))


def _stored(row) -> StoredFile:
    return StoredFile(row["id"], row["created"], row["filename"], row["purpose"], row["bytes"], row["expires"])


def live_clause(clock: Callable[[], float], expired_too: bool = False) -> tuple[str, tuple[float, ...]]:
    """The condition a row's lookup adds for LIVE (" AND ..." and its parameter), none when its expired row is asked
    for too (a file's or an ended batch's, kept PLACE_KEPT_S: a list's `after` naming it still places the next page)."""
    return ("", ()) if expired_too else (f" AND {LIVE}", (clock(),))


class FileStore:
    def __init__(self, shared: SharedState, directory: Path, *, max_bytes: int, ttl_s: float = 0,
                 quota_bytes: int = 0, clock: Callable[[], float] = time.time):
        self.shared, self.directory, self.max_bytes, self.clock = shared, directory, max_bytes, clock
        self.ttl_s, self.quota_bytes = ttl_s, quota_bytes  # 0: files kept until deleted; no quota
        # The ids of the files an owner's active batches read (None: every owner's), read through the connection
        # given (set by the Batch API's service: this package does not import it).
        self.in_use: Callable[[Database, str | None], set[str]] = lambda db, owner: set()
        shared.create_tables(SCHEMA)

    @classmethod
    def of(cls, config: Config, shared: SharedState) -> FileStore:
        gateway = config.gateway
        return cls(shared, files_dir(config), max_bytes=gateway.files_max_bytes,
                   ttl_s=gateway.files_ttl_days * 24 * 3600, quota_bytes=gateway.files_quota_bytes)

    def expiry(self, created: float, seconds: float | None = None) -> float | None:
        """When a file made at `created` expires: after the seconds asked for (expires_after), never longer than
        the site's retention; None (never) without either."""
        kept = [s for s in (seconds, self.ttl_s) if s]
        return created + min(kept) if kept else None

    def path(self, file_id: str) -> Path:
        return self.directory / file_id

    def save(self, owner: str, filename: str, purpose: str, source: IO[bytes],
             expires_after_s: int | None = None) -> StoredFile:
        """Copy an upload into place (413 beyond max_bytes, 400 beyond the key's quota, nothing kept) and record
        it."""
        file_id = new_file_id()
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.directory / f".{file_id}.upload"
        size = 0
        with self.shared.connection() as db:
            kept = self.in_use(db, owner) if self.quota_bytes else set()
            room = self._room(db, owner, kept)
        try:
            with open(temporary, "wb") as out:
                for chunk in iter(lambda: source.read(COPY_CHUNK), b""):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise RequestTooLarge(f"the file is larger than the {self.max_bytes} bytes this gateway "
                                              f"accepts (gateway.files_max_bytes); split it into several batches")
                    if size > room:
                        raise self._over_quota(room)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.rename(temporary, self.path(file_id))
        finally:
            temporary.unlink(missing_ok=True)
        created = self.clock()
        stored = StoredFile(file_id, created, filename, purpose, size, self.expiry(created, expires_after_s))
        try:
            with self.shared.transaction() as db:
                if self.quota_bytes:  # one of the key's uploads at a time checks and records
                    self.shared.lock(db, f"files:{owner}")
                room = self._room(db, owner, kept)  # again: another upload of the key's may have been recorded since
                if size > room:
                    raise self._over_quota(room)
                self.record(db, owner, stored)
        except BaseException:
            self.path(file_id).unlink(missing_ok=True)
            raise
        return stored

    def _room(self, db: Database, owner: str, kept: set[str]) -> float:
        """The bytes the owner may still upload (its live files, batch outputs included, count, and those `kept`, the
        inputs of batches not yet ended, though deleted or expired: their bytes stay until the batch ends)."""
        if not self.quota_bytes:
            return math.inf
        now = self.clock()
        used = db.conn.execute(f"SELECT COALESCE(SUM(bytes), 0) AS used FROM gateway_files WHERE owner = ? AND "
                               f"{LIVE}", (owner, now)).fetchone()["used"]
        if kept:  # of the owner's expired files, those kept count (asked by id: swept rows stay a day, PLACE_KEPT_S)
            ids = sorted(kept)
            used += db.conn.execute(f"SELECT COALESCE(SUM(bytes), 0) AS used FROM gateway_files WHERE owner = ? AND "
                                    f"NOT {LIVE} AND id IN ({', '.join('?' * len(ids))})",
                                    (owner, now, *ids)).fetchone()["used"]
        return self.quota_bytes - used

    def _over_quota(self, room: float) -> InvalidRequest:
        return InvalidRequest(f"this upload does not fit in the {self.quota_bytes} bytes your API key's files may "
                              f"hold on this gateway (gateway.files_quota_bytes; {max(0, int(room))} bytes left): "
                              f"delete files you no longer need (DELETE /v1/files/{{id}}; the input of a batch not "
                              f"yet ended counts until the batch ends)",
                              param="file", code=STORAGE_QUOTA_EXCEEDED)

    @staticmethod
    def record(db: Database, owner: str, stored: StoredFile) -> None:
        """Record a file already in place (an upload, or a batch's output in the batch's finishing transaction)."""
        db.conn.execute("INSERT INTO gateway_files (id, owner, created, filename, purpose, bytes, expires) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (stored.id, owner, stored.created, stored.filename,
                                                         stored.purpose, stored.bytes, stored.expires))

    def get(self, owner: str, file_id: str, *, expired_too: bool = False) -> StoredFile | None:
        """The owner's file, None when there is none (unknown, deleted, another owner's, or expired unless
        expired_too: a running batch still reads its input after it expired)."""
        live, now = live_clause(self.clock, expired_too)
        with self.shared.connection() as db:
            row = db.conn.execute(f"SELECT * FROM gateway_files WHERE id = ? AND owner = ?{live}",
                                  (file_id, owner, *now)).fetchone()
        return None if row is None else _stored(row)

    def _take_turns(self, db: Database, file_id: str) -> None:
        """The file's deletion, and the creation of a batch over it, one at a time (each until its commit)."""
        self.shared.lock(db, f"file:{file_id}")

    def lock_live(self, db: Database, owner: str, file_id: str) -> bool:
        """In a write transaction: take turns with the file's deletion (delete) till it ends; whether the owner's file
        is there still (not deleted nor expired)."""
        self._take_turns(db, file_id)
        return db.conn.execute(f"SELECT id FROM gateway_files WHERE id = ? AND owner = ? AND {LIVE}",
                               (file_id, owner, self.clock())).fetchone() is not None

    def list(self, owner: str, query: ListQuery) -> tuple[list[StoredFile], bool]:
        """A page of the owner's files (of query.purpose if given), and whether more follow."""
        where, params = ["owner = ?", LIVE], [owner, self.clock()]
        if query.purpose is not None:
            where.append("purpose = ?")
            params.append(query.purpose)
        # The page before may have ended on a file that expired since (or an active batch's input deleted since):
        # its row, kept a day after (PLACE_KEPT_S), still places the next page.
        rows, more = page(self.shared, "gateway_files", where, params, query,
                          lambda after: self.get(owner, after, expired_too=True), "file")
        return [_stored(row) for row in rows], more

    def delete(self, owner: str, file_id: str) -> bool:
        """False when the owner has no such file. The file expires now: invisible, out of the key's quota, its bytes
        removed, its row left to the sweep (a list's page that ended on it still places the next page: a clean-up
        loop deletes the files as the openai client's pager lists them). The input of a batch not yet ended keeps its
        bytes, and counts in the quota, till the batch has ended: the batch's runs still read it."""
        now = self.clock()
        with self.shared.transaction() as db:
            self._take_turns(db, file_id)  # a batch made over the file now is seen here, or finds it gone
            read = file_id in self.in_use(db, owner)
            gone = db.conn.execute(f"UPDATE gateway_files SET expires = ? WHERE id = ? AND owner = ? AND {LIVE}",
                                   (now, file_id, owner, now)).rowcount == 1
        if gone and not read:
            self.path(file_id).unlink(missing_ok=True)
        return gone

    def stored(self) -> tuple[int, int]:
        """How many files there are, and their bytes, of every owner (the expired ones not yet swept aside)."""
        with self.shared.connection() as db:
            row = db.conn.execute(f"SELECT COUNT(*) AS files, COALESCE(SUM(bytes), 0) AS bytes FROM gateway_files "
                                  f"WHERE {LIVE}", (self.clock(),)).fetchone()
        return row["files"], row["bytes"]

    def sweep(self) -> int:
        """Delete the expired files' bytes, and their rows PLACE_KEPT_S after they expired, but those in_use (the
        inputs of active batches: asked after the expired files are found, so a batch made over a file before it
        expired keeps it), and the upload temporaries of processes killed mid-copy; how many files' bytes went."""
        now = self.clock()
        with self.shared.connection() as db:
            expired = db.conn.execute("SELECT id, expires FROM gateway_files WHERE expires <= ?", (now,)).fetchall()
            kept = self.in_use(db, None) if expired else set()
        gone = [row for row in expired if row["id"] not in kept]
        forgotten = [row["id"] for row in gone if row["expires"] <= now - PLACE_KEPT_S]
        if forgotten:
            with self.shared.transaction() as db:
                for file_id in forgotten:
                    db.conn.execute("DELETE FROM gateway_files WHERE id = ?", (file_id,))
        removed = 0
        for row in gone:  # a deleted file's bytes went with its deletion; others' go with the first sweep
            try:
                self.path(row["id"]).unlink()
            except FileNotFoundError:  # gone already (a day's expired rows are seen by every sweep till forgotten)
                continue
            removed += 1
        self._remove_abandoned_uploads()
        return removed

    def _remove_abandoned_uploads(self) -> None:
        """Remove the upload temporaries (outside every quota) of processes killed mid-copy: those not written to
        for ABANDONED_UPLOAD_S, by the files' own (filesystem) clock."""
        oldest_live = time.time() - ABANDONED_UPLOAD_S
        for temporary in self.directory.glob(".file-*.upload"):
            try:
                abandoned = temporary.stat().st_mtime < oldest_live
            except FileNotFoundError:  # its upload ended meanwhile (renamed into place, or removed)
                continue
            if abandoned:
                temporary.unlink(missing_ok=True)

    def read_lines(self, file_id: str) -> Iterator[bytes]:
        """The file's lines; FileNotFoundError at once (not at the first line) when its bytes are gone (deleted
        since its row was read, or a files_dir not shared by every gateway host)."""
        return _lines(open(self.path(file_id), "rb"))


def _lines(source: IO[bytes]) -> Iterator[bytes]:
    with source:
        yield from source


def page(shared: SharedState, table: str, where: list[str], params: list[Any], query: PageQuery,
         find: Callable[[str], Any], noun: str) -> tuple[list[Any], bool]:
    """One page of a table's rows (newest first unless the query says otherwise) after the row `query.after` (found by
    `find`, a 400 naming `after` when the owner has no such row: one swept PLACE_KEPT_S ago no longer places a page,
    its id alone does not say where it stood), and whether more follow."""
    newer_first = query.newest_first
    if query.after is not None:
        anchor = find(query.after)
        if anchor is None:
            raise unplaced_after(query.after, noun, f"a {noun} deleted or expired more than {PLACE_KEPT_S / 3600:g} "
                                                    f"hours ago no longer places a page")
        sign = "<" if newer_first else ">"
        where = [*where, f"(created {sign} ? OR (created = ? AND id {sign} ?))"]
        params = [*params, anchor.created, anchor.created, anchor.id]
    direction = "DESC" if newer_first else "ASC"
    with shared.connection() as db:
        rows = db.conn.execute(f"SELECT * FROM {table} WHERE {' AND '.join(where)} "
                               f"ORDER BY created {direction}, id {direction} LIMIT ?",
                               (*params, query.limit + 1)).fetchall()
    return rows[:query.limit], len(rows) > query.limit
