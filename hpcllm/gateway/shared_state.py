"""State every gateway process must share: rate-limit token buckets, stream slots per key, counted instances.

gunicorn runs several gateway processes, and a site may run several gateway hosts; limits kept in process memory
would multiply by the number of processes and vanish on restart. They live in a database, through the registry's
database layer (hpcllm.controller.registry.databases):

- SQLite (the default): a small file in WAL mode on the gateway's local state dir, shared by one host's processes.
  Each update is one short `BEGIN IMMEDIATE` transaction, which takes the file's write lock up front. One
  connection per thread (sqlite3 connections are not shared across threads).
- PostgreSQL: shared by every gateway host. Each update is one transaction that locks the rows it reads
  (`SELECT ... FOR UPDATE`), so two hosts taking from one bucket serialize on that bucket's row. One connection
  per process (per SharedState), used by one thread at a time: connections stay at processes x hosts.

Stream slots name their holder (host, pid and a random tag per process). A holder renews its lease every third
of `lease_s` from a background thread; the slots of a holder whose lease ran out (a crashed or cut-off host), or
of a dead process on this host, are freed by the next process that opens a stream on that key, or, for a Responses
turn's hold on its conversation (ResponseStore.begin_turn), takes a turn in that conversation.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

from hpcllm.controller.registry.databases import (Database, is_postgres_url, open_database, redact_password,
                                                  table_columns)
from hpcllm.controller.errors import DatabaseError
from hpcllm.gateway.errors import ServiceUnavailable
from hpcllm.procs import pid_alive

log = logging.getLogger(__name__)

# Table names carry the gateway's prefix: on PostgreSQL they sit beside the registry's tables.
SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_buckets (name TEXT PRIMARY KEY, tokens REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS gateway_seen_instances (instance_id TEXT PRIMARY KEY, seen_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS gateway_stream_holders (holder TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,
                                                   renewed REAL NOT NULL);
CREATE TABLE IF NOT EXISTS gateway_stream_slots (id TEXT PRIMARY KEY, bucket TEXT NOT NULL, holder TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS gateway_stream_slots_bucket ON gateway_stream_slots (bucket);
"""
# Several processes creating the tables at once race in PostgreSQL (CREATE TABLE IF NOT EXISTS is not atomic
# there): they take this transaction-level advisory lock first.
SCHEMA_LOCK_KEY = 0x68706C6C6D  # "hpllm"

DEFAULT_LEASE_S = 30.0
# A write that failed for the database's sake (PostgreSQL away, SQLite's file locked past its busy timeout).
WRITE_FAILED = (ServiceUnavailable, sqlite3.Error)
# Fills a column just added to the rows already there, in the transaction that added it.
Fill = Callable[[Database], None]


class SharedState:
    def __init__(self, url: Path | str, *, lease_s: float = DEFAULT_LEASE_S, host: str | None = None,
                 setting: str = "gateway.limits_db"):
        """url: a path, sqlite:///path or postgresql://... . host: this gateway's name in stream-slot leases (the
        hostname; tests name two "hosts" in one process)."""
        self.url = str(url)
        self.postgres = is_postgres_url(self.url)
        self._setting = setting
        self.lease_s = lease_s
        self.host = host or socket.gethostname()
        self._local = threading.local()  # SQLite: one connection per thread
        self._shared_db: Database | None = None  # PostgreSQL: one connection per process...
        self._shared_lock = threading.Lock()  # ...used by one thread at a time
        self._holder: tuple[int, str] | None = None  # (pid, holder id), made again after a fork
        self._heartbeat: tuple[threading.Thread, threading.Event] | None = None
        # Stream slots whose close failed (the database away): freed by the lease's next renewal. Held on, the lease
        # kept renewed, they would count against their key for the life of the process.
        self._unclosed: set[str] = set()
        self._unclosed_lock = threading.Lock()
        self._schema_ready = False
        self.create_tables(SCHEMA)
        self._schema_ready = True

    # ------------------------------------------------------------------------------------------- connections

    def _open(self) -> Database:
        return open_database(self.url, setting=self._setting, purpose="gateway limits database")

    @contextmanager
    def connection(self, attempt: WriteAttempt | None = None) -> Iterator[Database]:
        """The connection for statements outside a transaction (each its own, autocommit), e.g. one SELECT.
        attempt: told whether the connection was open before (PostgreSQL; SQLite's always counts as open)."""
        if not self.postgres:
            db = getattr(self._local, "db", None)
            if db is None:
                db = self._local.db = self._open()
            if attempt is not None:
                attempt.on_open_connection = True
            yield db
            return
        with self._shared_lock:
            if attempt is not None:
                attempt.on_open_connection = self._shared_db is not None
            if self._shared_db is None:
                try:
                    self._shared_db = self._open()
                except DatabaseError as exc:
                    if not self._schema_ready:  # at start: the configuration's error, with its fix
                        raise
                    log.warning("%s", exc)
                    raise ServiceUnavailable("the gateway's limits database is unreachable; retry shortly") from exc
            try:
                yield self._shared_db
            except Exception as exc:
                if _is_database_error(exc):  # the connection may be gone (server restart): reconnect next time
                    self._drop_shared_connection()
                    log.warning("gateway limits database %s: %s", self._shared_db_label(), exc)
                    raise ServiceUnavailable("the gateway's limits database is unreachable; retry shortly") from exc
                raise

    def _drop_shared_connection(self) -> None:
        db, self._shared_db = self._shared_db, None
        if db is not None:
            try:
                db.close()
            except Exception:  # already broken
                pass

    def _shared_db_label(self) -> str:
        return redact_password(self.url)

    @contextmanager
    def transaction(self, attempt: WriteAttempt | None = None) -> Iterator[Database]:
        """One write transaction: SQLite takes the file's write lock at BEGIN; PostgreSQL locks rows as read
        (`FOR UPDATE` via self.for_update). Rolled back on error. attempt: told how far it got."""
        with self.connection(attempt) as db:
            db.conn.execute(db.begin_write)
            try:
                yield db
                if attempt is not None:
                    # PostgreSQL may have committed a COMMIT whose answer was lost; SQLite's failed COMMIT has not
                    # (and is rolled back below), so trying it again is safe there.
                    attempt.commit_sent = self.postgres
                db.conn.execute("COMMIT")
            except BaseException:
                try:  # a failed COMMIT too: SQLite's transaction stays open, and the thread's next BEGIN would fail
                    db.conn.execute("ROLLBACK")
                except Exception:  # the connection itself failed; connection() handles it
                    pass
                raise

    def lock(self, db: Database, name: str) -> None:
        """Serialize this write transaction with every other that locks `name` until it ends (a per-key total
        checked, then added to): on PostgreSQL an advisory lock on the name's hash, where two transactions could
        each read the total before either adds; SQLite's write lock, taken at BEGIN, already does."""
        if self.postgres:
            db.conn.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (name,))

    def for_update(self) -> str:
        return " FOR UPDATE" if self.postgres else ""  # SQLite's BEGIN IMMEDIATE already holds the write lock

    @contextmanager
    def schema_transaction(self) -> Iterator[Database]:
        """A write transaction that changes the schema: on PostgreSQL under the schema's advisory lock, so
        processes starting together change it one at a time."""
        with self.transaction() as db:
            if self.postgres:
                db.conn.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK_KEY,))
            yield db

    def create_tables(self, schema: str, added_columns: Mapping[str, Mapping[str, Fill | None]] | None = None) -> None:
        """Create a schema's tables and indexes where missing (the limits' here, the stored responses' in
        hpcllm.gateway.response_store: one database, one connection per process). added_columns: table -> {column:
        how to fill the rows already there (None: left NULL)} of the columns a later hpcllm added to a table, as the
        schema's CREATE TABLE defines them: added to a database an earlier one made, and filled in the same
        transaction, before the schema's indexes (which may name them) are created."""
        statements = [s for s in schema.split(";") if s.strip()]
        tables = [s for s in statements if s.lstrip().upper().startswith("CREATE TABLE")]
        with self.schema_transaction() as db:
            for statement in tables:
                db.conn.execute(db.dialect(statement))
            for table, columns in (added_columns or {}).items():
                present = table_columns(db.conn, table)
                for column, fill in columns.items():
                    if column not in present:
                        definition = _column_definition(tables, table, column)
                        db.conn.execute(db.dialect(f"ALTER TABLE {table} ADD COLUMN {definition}"))
                        if fill is not None:
                            fill(db)
            for statement in statements:
                if statement not in tables:
                    db.conn.execute(db.dialect(statement))

    # ------------------------------------------------------------------------------------------- token buckets

    def take(self, bucket: str, *, capacity: float, per_second: float, cost: float,
             now: float | None = None) -> float | None:
        """Take `cost` tokens from a token bucket (full when new, refilled at per_second up to capacity).

        Succeeds when at least min(cost, capacity) tokens are there, so a cost larger than the whole bucket is
        still admitted once the bucket is full (and leaves it in debt) instead of waiting forever. Returns None on
        success, else the seconds until enough tokens will be there.
        """
        now = time.time() if now is None else now
        with self.transaction() as db:
            tokens = self._refilled(db, bucket, capacity, per_second, now)
            need = min(cost, capacity)
            if tokens + 1e-9 >= need:
                tokens -= cost
                wait = None
            else:
                wait = (need - tokens) / per_second
            self._store(db, bucket, tokens, now)
        return wait

    def refund(self, bucket: str, *, capacity: float, per_second: float, amount: float,
               now: float | None = None) -> None:
        """Give back tokens reserved but not used (e.g. max_tokens a generation did not produce).

        A negative amount charges tokens used beyond the reservation (the bucket may go into debt)."""
        if amount == 0:
            return

        def give_back(db: Database) -> None:
            at = time.time() if now is None else now  # the try's own time: a second try comes later
            self._store(db, bucket, min(capacity, self._refilled(db, bucket, capacity, per_second, at) + amount), at)

        self.write_once_more(give_back)

    def level(self, bucket: str, *, capacity: float, per_second: float, now: float | None = None) -> float:
        now = time.time() if now is None else now
        with self.transaction() as db:
            return self._refilled(db, bucket, capacity, per_second, now)

    def _refilled(self, db: Database, bucket: str, capacity: float, per_second: float, now: float) -> float:
        """The bucket's level now, its row locked until the transaction ends (a new bucket is full)."""
        row = db.conn.execute(f"SELECT tokens, updated FROM gateway_buckets WHERE name = ?{self.for_update()}",
                              (bucket,)).fetchone()
        if row is None:
            if not self.postgres:
                return capacity
            # No row to lock yet: create it full, then lock it. A host doing the same at once waits on the insert.
            db.conn.execute("INSERT INTO gateway_buckets (name, tokens, updated) VALUES (?, ?, ?) "
                            "ON CONFLICT (name) DO NOTHING", (bucket, capacity, now))
            row = db.conn.execute("SELECT tokens, updated FROM gateway_buckets WHERE name = ? FOR UPDATE",
                                  (bucket,)).fetchone()
        return min(capacity, row["tokens"] + max(0.0, now - row["updated"]) * per_second)

    @staticmethod
    def _store(db: Database, bucket: str, tokens: float, now: float) -> None:
        db.conn.execute("INSERT INTO gateway_buckets (name, tokens, updated) VALUES (?, ?, ?) ON CONFLICT (name) "
                        "DO UPDATE SET tokens = excluded.tokens, updated = excluded.updated", (bucket, tokens, now))

    # ------------------------------------------------------------------------------------------- stream slots

    @property
    def holder(self) -> str:
        """This process's name on its stream slots: host/pid/random (a new one in a forked child)."""
        pid = os.getpid()
        if self._holder is None or self._holder[0] != pid:
            self._holder = (pid, f"{self.host}/{pid}/{uuid.uuid4().hex[:8]}")
            self._heartbeat = None  # a forked child has no copy of the parent's thread
        return self._holder[1]

    def open_stream(self, bucket: str, stream_id: str, limit: int, now: float | None = None) -> bool:
        """Take one of `limit` stream slots of `bucket` for stream_id (False: all taken). Slots of holders whose
        lease ran out (a crashed host) or of dead processes on this host (a killed gunicorn worker) are freed here."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            self._lock_stream_bucket(db, bucket, now)
            return self.hold_slot(db, bucket, stream_id, limit, now)

    def hold_slot(self, db: Database, bucket: str, slot_id: str, limit: int, now: float | None = None) -> bool:
        """open_stream's take, in the caller's write transaction, which serializes the takes of `bucket` (open_stream:
        a row named for it; a conversation's turn: the conversation's row). Freed by close_stream(slot_id), or when
        this process dies or stops renewing its lease."""
        now = time.time() if now is None else now
        holder = self.holder
        self._start_heartbeat()
        self._free_abandoned_slots(db, bucket, holder, now)
        held = db.conn.execute("SELECT COUNT(*) AS held FROM gateway_stream_slots WHERE bucket = ?",
                               (bucket,)).fetchone()["held"]
        if held >= limit:
            return False
        self._renew(db, now)
        db.conn.execute("INSERT INTO gateway_stream_slots (id, bucket, holder) VALUES (?, ?, ?)",
                        (slot_id, bucket, holder))
        return True

    def _lock_stream_bucket(self, db: Database, bucket: str, now: float) -> None:
        """PostgreSQL: count-then-insert must not interleave between hosts; they serialize on a row named for the
        key's stream slots (in gateway_buckets, where each key's buckets are). SQLite's write lock covers it."""
        if self.postgres:
            db.conn.execute("INSERT INTO gateway_buckets (name, tokens, updated) VALUES (?, 0, ?) "
                            "ON CONFLICT (name) DO NOTHING", (bucket, now))
            db.conn.execute("SELECT name FROM gateway_buckets WHERE name = ? FOR UPDATE", (bucket,))

    def _free_abandoned_slots(self, db: Database, bucket: str, holder: str, now: float) -> None:
        rows = db.conn.execute(
            "SELECT DISTINCT s.holder AS holder, h.host AS host, h.pid AS pid, h.renewed AS renewed "
            "FROM gateway_stream_slots s LEFT JOIN gateway_stream_holders h ON h.holder = s.holder "
            "WHERE s.bucket = ?", (bucket,)).fetchall()
        for row in rows:
            if row["holder"] == holder:
                continue
            expired = row["renewed"] is None or row["renewed"] < now - self.lease_s
            dead_here = row["host"] == self.host and not pid_alive(row["pid"])
            if expired or dead_here:
                log.info("freeing the stream slots of %s (%s)", row["holder"],
                         "process gone" if dead_here else f"lease expired {now - (row['renewed'] or 0):.0f} s ago")
                db.conn.execute("DELETE FROM gateway_stream_slots WHERE holder = ?", (row["holder"],))
                db.conn.execute("DELETE FROM gateway_stream_holders WHERE holder = ?", (row["holder"],))

    def _renew(self, db: Database, now: float) -> None:
        db.conn.execute("INSERT INTO gateway_stream_holders (holder, host, pid, renewed) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (holder) DO UPDATE SET renewed = excluded.renewed",
                        (self.holder, self.host, os.getpid(), now))

    def renew_lease(self) -> None:
        """Tell the other gateway processes (and hosts) that this one's stream slots are still in use; free those
        whose close failed."""
        with self._unclosed_lock:
            unclosed = list(self._unclosed)
        with self.transaction() as db:
            self._delete_slots(db, unclosed)
            self._renew(db, time.time())
        with self._unclosed_lock:
            self._unclosed.difference_update(unclosed)

    def _start_heartbeat(self) -> None:
        """From the first stream on, a daemon thread renews this process's lease every lease_s / 3."""
        if self._heartbeat is not None:
            return
        stop = threading.Event()
        thread = threading.Thread(target=self._heartbeat_loop, args=(stop,), name="stream-slot-lease", daemon=True)
        self._heartbeat = (thread, stop)
        thread.start()

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.lease_s / 3):
            try:
                self.renew_lease()
            except Exception as exc:  # the database is away for a while: the next beat tries again
                log.warning("could not renew the stream-slot lease: %s", exc)

    def stop_heartbeat(self, timeout_s: float = 5.0) -> None:
        """Stop renewing the lease (close(); tests also use it to play a host that crashed); waits at most timeout_s
        for a renewal under way."""
        if self._heartbeat is not None:
            thread, stop = self._heartbeat
            stop.set()
            if thread is not threading.current_thread():
                thread.join(timeout=timeout_s)
            self._heartbeat = None

    def close_stream(self, stream_id: str) -> None:
        """Free a stream slot (once more on a broken connection); failing that, at the lease's next renewal (the
        error raised meanwhile)."""
        try:
            self.write_once_more(lambda db: self._delete_slots(db, [stream_id]))
        except WRITE_FAILED:
            with self._unclosed_lock:
                self._unclosed.add(stream_id)
            raise

    def write_once_more(self, write: Callable[[Database], None]) -> None:
        """write(db) in a write transaction; once more when it failed on a connection open before it, before its
        COMMIT was sent (a PostgreSQL restart breaks the open connection, which fails at BEGIN: connection()
        reconnects on the next call; SQLite's write lock not had in its busy timeout), so what a request gives back
        at its end is not lost to a blip. Not after a failed connect (a second waits as long, under the process's
        one connection lock), nor once COMMIT was sent to PostgreSQL (the server may have committed: a refund
        twice; SQLite's failed COMMIT has not, and is tried again)."""
        attempt = WriteAttempt()
        try:
            with self.transaction(attempt) as db:
                write(db)
        except WRITE_FAILED:
            if not attempt.may_retry:
                raise
            with self.transaction() as db:
                write(db)

    @staticmethod
    def _delete_slots(db: Database, stream_ids: list[str]) -> None:
        for stream_id in stream_ids:
            db.conn.execute("DELETE FROM gateway_stream_slots WHERE id = ?", (stream_id,))

    # ------------------------------------------------------------------------------------------- cold starts

    def first_sighting(self, instance_id: str) -> bool:
        """True for exactly one caller across all gateway processes (and hosts) per instance id."""
        with self.transaction() as db:
            cur = db.conn.execute("INSERT INTO gateway_seen_instances (instance_id, seen_at) VALUES (?, ?) "
                                  "ON CONFLICT (instance_id) DO NOTHING", (instance_id, time.time()))
            return cur.rowcount == 1

    def close(self, timeout_s: float = 5.0) -> None:
        self.stop_heartbeat(timeout_s)
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
        with self._shared_lock:
            self._drop_shared_connection()


def _column_definition(creates: list[str], table: str, column: str) -> str:
    """`column TYPE ...` as the table's CREATE TABLE among `creates` defines it: an added column's one source."""
    for create in creates:
        if re.match(rf"\s*CREATE TABLE (IF NOT EXISTS )?{table}\b", create, re.IGNORECASE):
            found = re.search(rf"[(,]\s*({column}\s[^,]+?)\s*(,|\)\s*$)", create)
            if found:
                return found.group(1)
    raise ValueError(f"the schema defines no column {table}.{column}")


@dataclass
class WriteAttempt:
    """How far one write transaction got, to know whether trying it again is safe and worth it."""

    on_open_connection: bool = False  # it ran on a connection open before it (not one it had to make)
    commit_sent: bool = False

    @property
    def may_retry(self) -> bool:
        return self.on_open_connection and not self.commit_sent


def _is_database_error(exc: BaseException) -> bool:
    """A psycopg error (imported only where PostgreSQL is used)."""
    return type(exc).__module__.split(".")[0] == "psycopg"
