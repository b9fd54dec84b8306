"""Where files live: their metadata (owner, name, purpose, size) in the limits database, their bytes in the files
directory (gateway.files_dir, default <state_dir>/gateway/files; a shared filesystem for several gateway hosts).

A file belongs to the API key that uploaded it (or whose batch wrote it), named by the key's digest as stored
responses are (hpcllm.gateway.response_store.owner_of): any other key is told it does not exist. An upload is
written to a hidden temporary file and renamed into place once whole, and only then recorded, so no reader ever
sees half a file; a deletion forgets the row first, then removes the bytes.
"""

from __future__ import annotations

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
from hpcllm.gateway.errors import InvalidRequest
from hpcllm.gateway.files.protocol import FileObject, ListQuery
from hpcllm.gateway.runtime import gateway_state_dir
from hpcllm.gateway.shared_state import SharedState
from hpcllm.httpkit.errors import RequestTooLarge

SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_files (id TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL,
                                          filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS gateway_files_owner ON gateway_files (owner, created);
"""
COPY_CHUNK = 1024 * 1024
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

    def wire(self) -> FileObject:
        return FileObject(id=self.id, bytes=self.bytes, created_at=int(self.created), filename=self.filename,
                          purpose=self.purpose)


def _stored(row) -> StoredFile:
    return StoredFile(row["id"], row["created"], row["filename"], row["purpose"], row["bytes"])


class FileStore:
    def __init__(self, shared: SharedState, directory: Path, *, max_bytes: int,
                 clock: Callable[[], float] = time.time):
        self.shared, self.directory, self.max_bytes, self.clock = shared, directory, max_bytes, clock
        shared.create_tables(SCHEMA)

    @classmethod
    def of(cls, config: Config, shared: SharedState) -> FileStore:
        return cls(shared, files_dir(config), max_bytes=config.gateway.files_max_bytes)

    def path(self, file_id: str) -> Path:
        return self.directory / file_id

    def save(self, owner: str, filename: str, purpose: str, source: IO[bytes]) -> StoredFile:
        """Copy an upload into place (413 beyond max_bytes, nothing kept) and record it."""
        file_id = new_file_id()
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.directory / f".{file_id}.upload"
        size = 0
        try:
            with open(temporary, "wb") as out:
                for chunk in iter(lambda: source.read(COPY_CHUNK), b""):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise RequestTooLarge(f"the file is larger than the {self.max_bytes} bytes this gateway "
                                              f"accepts (gateway.files_max_bytes); split it into several batches")
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.rename(temporary, self.path(file_id))
        finally:
            temporary.unlink(missing_ok=True)
        stored = StoredFile(file_id, self.clock(), filename, purpose, size)
        try:
            with self.shared.transaction() as db:
                self.record(db, owner, stored)
        except BaseException:
            self.path(file_id).unlink(missing_ok=True)
            raise
        return stored

    @staticmethod
    def record(db: Database, owner: str, stored: StoredFile) -> None:
        """Record a file already in place (an upload, or a batch's output in the batch's finishing transaction)."""
        db.conn.execute("INSERT INTO gateway_files (id, owner, created, filename, purpose, bytes) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (stored.id, owner, stored.created, stored.filename, stored.purpose, stored.bytes))

    def get(self, owner: str, file_id: str) -> StoredFile | None:
        """The owner's file, None when there is none (unknown, deleted, or another owner's)."""
        with self.shared.connection() as db:
            row = db.conn.execute("SELECT * FROM gateway_files WHERE id = ? AND owner = ?",
                                  (file_id, owner)).fetchone()
        return None if row is None else _stored(row)

    def list(self, owner: str, query: ListQuery) -> tuple[list[StoredFile], bool]:
        """A page of the owner's files (of query.purpose if given), and whether more follow."""
        where, params = ["owner = ?"], [owner]
        if query.purpose is not None:
            where.append("purpose = ?")
            params.append(query.purpose)
        rows, more = page(self.shared, "gateway_files", where, params, query, lambda after: self.get(owner, after))
        return [_stored(row) for row in rows], more

    def delete(self, owner: str, file_id: str) -> bool:
        """False when the owner has no such file."""
        with self.shared.connection() as db:
            gone = db.conn.execute("DELETE FROM gateway_files WHERE id = ? AND owner = ?",
                                   (file_id, owner)).rowcount == 1
        if gone:
            self.path(file_id).unlink(missing_ok=True)
        return gone

    def read_lines(self, file_id: str) -> Iterator[bytes]:
        with open(self.path(file_id), "rb") as source:
            yield from source


def page(shared: SharedState, table: str, where: list[str], params: list[Any], query: ListQuery,
         find: Callable[[str], Any]) -> tuple[list[Any], bool]:
    """One page of a table's rows (newest first for order desc) after the row `query.after` (found by `find`, a
    400 naming `after` when the owner has no such row), and whether more follow."""
    newer_first = query.order == "desc"
    if query.after is not None:
        anchor = find(query.after)
        if anchor is None:
            raise InvalidRequest(f"'after': no item with id {query.after[:80]!r}", param="after")
        sign = "<" if newer_first else ">"
        where = [*where, f"(created {sign} ? OR (created = ? AND id {sign} ?))"]
        params = [*params, anchor.created, anchor.created, anchor.id]
    direction = "DESC" if newer_first else "ASC"
    with shared.connection() as db:
        rows = db.conn.execute(f"SELECT * FROM {table} WHERE {' AND '.join(where)} "
                               f"ORDER BY created {direction}, id {direction} LIMIT ?",
                               (*params, query.limit + 1)).fetchall()
    return rows[:query.limit], len(rows) > query.limit
