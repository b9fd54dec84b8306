"""The databases the registry runs on: SQLite (the default, in the standard library) and PostgreSQL (psycopg 3, the
optional extra `pip install 'hpcllm[postgres]'`).

The registry writes its SQL once, in SQLite's dialect with `?` placeholders and portable upserts
(`INSERT ... ON CONFLICT (key) DO UPDATE`, SQLite >= 3.24, PostgreSQL >= 9.5). For PostgreSQL this module turns
placeholders into psycopg's `%s`, widens the schema's types (SQLite's INTEGER is 64-bit and REAL double precision;
PostgreSQL's are 32-bit and single precision, which would truncate byte counts and epoch timestamps), and opens
transactions with PostgreSQL's words. Rows come back addressable by column name from both.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from hpcllm.controller.errors import DatabaseError

POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")


@dataclass
class Database:
    """An open connection and how to drive it: `conn.execute(sql, params)` / `conn.executemany(sql, rows)` return
    cursors (fetchone, fetchall, iteration, rowcount) whose rows are addressable by column name."""

    kind: str  # "sqlite" or "postgresql"
    conn: Any
    label: str  # the file, or the URL without its password: for logs and messages
    begin_write: str  # opens a transaction that takes the write lock at once (SQLite) / a plain one (PostgreSQL)
    begin_read: str  # opens a consistent read snapshot

    def create_schema(self, ddl: str) -> None:
        if self.kind == "sqlite":
            self.conn.executescript(ddl)  # commits on its own
        else:
            self.conn.execute(postgres_schema(ddl))

    def dialect(self, ddl: str) -> str:
        """One DDL statement (a CREATE, an ALTER TABLE ... ADD COLUMN) in this database's types: an added column
        gets the width a new table's has (PostgreSQL's REAL alone is single precision)."""
        return postgres_schema(ddl) if self.kind == "postgresql" else ddl

    def close(self) -> None:
        self.conn.close()


def open_database(database_url: str, *, setting: str = "controller.database_url",
                  purpose: str = "controller database") -> Database:
    """sqlite:///relative, sqlite:////absolute, sqlite:///:memory:, a bare path, or postgresql://user@host/db.

    `setting` (the config key the URL came from) and `purpose` name the database in error messages: the gateway's
    limits database opens through here too."""
    if is_postgres_url(database_url):
        return _open_postgres(database_url, setting, purpose)
    return _open_sqlite(sqlite_path_from_url(database_url, setting), purpose)


def is_postgres_url(database_url: str) -> bool:
    return "://" in database_url and database_url.split("://", 1)[0].lower() in POSTGRES_SCHEMES


def sqlite_path_from_url(database_url: str, setting: str = "controller.database_url") -> str:
    """sqlite:///relative/path, sqlite:////absolute/path (SQLAlchemy's convention), sqlite:///:memory:, or a path."""
    if database_url.startswith("sqlite:///"):
        path = database_url[len("sqlite:///"):]
    elif "://" in database_url:
        scheme = database_url.split("://", 1)[0]
        raise DatabaseError(
            f"{setting} {redact_password(database_url)!r}: the {scheme!r} scheme is not supported; use "
            f"sqlite:///relative/path, sqlite:////absolute/path or postgresql://user:password@host:port/database"
        )
    else:
        path = database_url
    if not path:
        raise DatabaseError(f"{setting} {database_url!r} names no file")
    return path


def _open_sqlite(path: str, purpose: str) -> Database:
    if path != ":memory:":
        parent = Path(path).expanduser().resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseError(f"cannot create the folder {parent} for the {purpose}: {exc}") from None
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
    except sqlite3.DatabaseError as exc:
        raise DatabaseError(f"cannot open the {purpose} {path}: {exc}") from None
    return Database("sqlite", conn, path, begin_write="BEGIN IMMEDIATE", begin_read="BEGIN")


def _psycopg_unusable(setting: str, label: str, exc: ImportError) -> DatabaseError:
    """psycopg is installed but does not load: its pure-Python driver found no system libpq, most often (psycopg
    then says 'no pq wrapper available' or 'libpq library not found'); the libpq fix only for that reason."""
    reason = " ".join(str(exc).split())
    fix = ("; its pure-Python driver needs the system's PostgreSQL client library (Debian: libpq5, which `make host` "
           "installs), or pip install 'psycopg[binary]'") if re.search(r"\b(lib)?pq\b", reason) else ""
    return DatabaseError(f"{setting} {label} needs psycopg 3 (PostgreSQL driver), which is installed but does not "
                         f"load: {reason}{fix}")


def _open_postgres(database_url: str, setting: str, purpose: str) -> Database:
    label = redact_password(database_url)
    try:
        import psycopg
        from psycopg.rows import dict_row
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "psycopg":
            raise _psycopg_unusable(setting, label, exc) from None
        raise DatabaseError(f"{setting} {label} needs psycopg 3 (PostgreSQL driver), which is not "
                            f"installed: pip install 'hpcllm[postgres]' (or psycopg[binary])") from None
    except ImportError as exc:
        raise _psycopg_unusable(setting, label, exc) from None
    conninfo = re.sub(r"^[^:]+://", "postgresql://", database_url)
    try:
        conn = psycopg.connect(conninfo, autocommit=True, row_factory=dict_row, connect_timeout=30)
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot connect to the {purpose} {label}: {str(exc).strip()}") from None
    # Explicit BEGIN/COMMIT in autocommit mode, like the SQLite connection. READ COMMITTED writes are enough: one
    # controller process, whose writes a lock serializes; reads see one snapshot.
    return Database("postgresql", _PostgresConnection(conn), label, begin_write="BEGIN",
                    begin_read="BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")


def redact_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def postgres_schema(ddl: str) -> str:
    """SQLite DDL -> PostgreSQL: 64-bit integers, double-precision reals, an identity column for AUTOINCREMENT."""
    ddl = ddl.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
    ddl = re.sub(r"\bINTEGER\b", "BIGINT", ddl)
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", ddl)


def table_columns(conn, table: str) -> set[str]:
    """Column names of a table (portable: the cursor's description, on SQLite and PostgreSQL alike)."""
    return {d[0] for d in conn.execute(f"SELECT * FROM {table} LIMIT 0").description}


def postgres_sql(sql: str) -> str:
    """`?` placeholders -> psycopg's `%s` (a literal % doubled). The registry's SQL has no `?` inside literals."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PostgresConnection:
    """What the registry calls on a connection (execute, executemany, close), over psycopg."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, sql: str, params: tuple | list = ()):
        cursor = self._conn.cursor()
        if params:
            cursor.execute(postgres_sql(sql), tuple(params))
        else:
            cursor.execute(sql)
        return cursor

    def executemany(self, sql: str, rows):
        cursor = self._conn.cursor()
        rows = [tuple(row) for row in rows]
        if rows:
            cursor.executemany(postgres_sql(sql), rows)
        return cursor

    def close(self) -> None:
        self._conn.close()
