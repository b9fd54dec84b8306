"""State every gateway process must share: rate-limit token buckets, stream slots per key, counted instances.

gunicorn runs several gateway processes; limits kept in process memory would multiply by the number of workers
and vanish on restart. This is a small SQLite database in WAL mode on the gateway's local state dir: each
update is one short `BEGIN IMMEDIATE` transaction (a few tens of microseconds), which serializes the processes
correctly without a server to run. One connection per thread (sqlite3 connections are not shared across threads).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

from hpcllm.procs import pid_alive

SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (name TEXT PRIMARY KEY, tokens REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS seen_instances (instance_id TEXT PRIMARY KEY, seen_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS open_streams (id TEXT PRIMARY KEY, bucket TEXT NOT NULL, pid INTEGER NOT NULL);
"""


class SharedState:
    def __init__(self, path: Path | str, *, busy_timeout_s: float = 10.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        with self._transaction() as db:
            for statement in filter(str.strip, SCHEMA.split(";")):
                db.execute(statement)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def _transaction(self):
        return _Immediate(self._conn())

    def take(self, bucket: str, *, capacity: float, per_second: float, cost: float,
             now: float | None = None) -> float | None:
        """Take `cost` tokens from a token bucket (full when new, refilled at per_second up to capacity).

        Succeeds when at least min(cost, capacity) tokens are there, so a cost larger than the whole bucket is
        still admitted once the bucket is full (and leaves it in debt) instead of waiting forever. Returns None on
        success, else the seconds until enough tokens will be there.
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            tokens = self._refilled(db, bucket, capacity, per_second, now)
            need = min(cost, capacity)
            if tokens + 1e-9 >= need:
                tokens -= cost
                wait = None
            else:
                wait = (need - tokens) / per_second
            db.execute("INSERT OR REPLACE INTO buckets (name, tokens, updated) VALUES (?, ?, ?)",
                       (bucket, tokens, now))
        return wait

    def refund(self, bucket: str, *, capacity: float, per_second: float, amount: float,
               now: float | None = None) -> None:
        """Give back tokens reserved but not used (e.g. max_tokens a generation did not produce).

        A negative amount charges tokens used beyond the reservation (the bucket may go into debt)."""
        if amount == 0:
            return
        now = time.time() if now is None else now
        with self._transaction() as db:
            tokens = self._refilled(db, bucket, capacity, per_second, now)
            db.execute("INSERT OR REPLACE INTO buckets (name, tokens, updated) VALUES (?, ?, ?)",
                       (bucket, min(capacity, tokens + amount), now))

    def level(self, bucket: str, *, capacity: float, per_second: float, now: float | None = None) -> float:
        now = time.time() if now is None else now
        with self._transaction() as db:
            return self._refilled(db, bucket, capacity, per_second, now)

    @staticmethod
    def _refilled(db: sqlite3.Connection, bucket: str, capacity: float, per_second: float, now: float) -> float:
        row = db.execute("SELECT tokens, updated FROM buckets WHERE name = ?", (bucket,)).fetchone()
        if row is None:
            return capacity
        tokens, updated = row
        return min(capacity, tokens + max(0.0, now - updated) * per_second)

    def open_stream(self, bucket: str, stream_id: str, limit: int) -> bool:
        """Take one of `limit` stream slots of `bucket` for stream_id (False: all taken). Slots of processes that
        died without closing their streams (a killed gunicorn worker) are freed here."""
        with self._transaction() as db:
            pids = {pid for (pid,) in db.execute("SELECT DISTINCT pid FROM open_streams WHERE bucket = ?", (bucket,))}
            for pid in pids - {os.getpid()}:
                if not pid_alive(pid):
                    db.execute("DELETE FROM open_streams WHERE pid = ?", (pid,))
            (held,) = db.execute("SELECT COUNT(*) FROM open_streams WHERE bucket = ?", (bucket,)).fetchone()
            if held >= limit:
                return False
            db.execute("INSERT INTO open_streams (id, bucket, pid) VALUES (?, ?, ?)", (stream_id, bucket, os.getpid()))
            return True

    def close_stream(self, stream_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM open_streams WHERE id = ?", (stream_id,))

    def first_sighting(self, instance_id: str) -> bool:
        """True for exactly one caller across all gateway processes per instance id."""
        with self._transaction() as db:
            cur = db.execute("INSERT OR IGNORE INTO seen_instances (instance_id, seen_at) VALUES (?, ?)",
                             (instance_id, time.time()))
            return cur.rowcount == 1

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class _Immediate:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): takes the write lock up front, so read-modify-write is atomic."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
