"""Batches in the limits database: their Batch objects (as JSON), their owner, and the lease of the process that
runs them.

A batch belongs to the API key that created it (its digest, as files and stored responses: another key's id is a
404). Exactly one gateway process runs an active batch: it claims the batch by writing itself as the lease's
holder with an expiry, renews the expiry while it runs, and writes results only while it still holds the lease.
A batch whose lease ran out (its process crashed, its host was cut off) is claimed by the next process that looks
(every process polls), which continues from what the output files already hold.

An ended batch is kept as long as its output and error files (`expires`: their expiry, or when they would have
expired for a batch that has none): from then on it is gone for its owner, and the runners' sweep deletes its row
PLACE_KEPT_S later (as a file's: a list's `after` naming it still places the next page till then). A batch not
yet ended, or whose files never expire (gateway.files_ttl_days 0 and no output_expires_after), is kept.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from hpcllm.controller.registry.databases import Database
from hpcllm.gateway.batches import ACTIVE
from hpcllm.gateway.batches.protocol import BatchObject
from hpcllm.gateway.errors import InvalidRequest
from hpcllm.gateway.files.protocol import PageQuery
from hpcllm.gateway.files.store import LIVE, PLACE_KEPT_S, FileStore, StoredFile, live_clause, page

SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_batches (id TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL,
                                            status TEXT NOT NULL, lease_holder TEXT, lease_expires REAL NOT NULL,
                                            batch TEXT NOT NULL, output_ttl REAL, turn REAL, expires REAL,
                                            waiting INTEGER);
CREATE INDEX IF NOT EXISTS gateway_batches_owner ON gateway_batches (owner, created);
CREATE INDEX IF NOT EXISTS gateway_batches_status ON gateway_batches (status, lease_expires);
CREATE INDEX IF NOT EXISTS gateway_batches_expires ON gateway_batches (expires);
"""
ACTIVE_SQL = ", ".join(f"'{status}'" for status in ACTIVE)
# An active batch nobody holds, but one handed back until its key's rate limit ends (its turn then; a cancel is
# ended at once). Parameters: now, now.
CLAIMABLE_SQL = (f"status IN ({ACTIVE_SQL}) AND lease_expires < ? AND (turn IS NULL OR turn <= ? OR "
                 f"status = 'cancelling')")


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class Claim:
    """A batch this process holds the lease of."""

    batch_id: str
    owner: str
    holder: str
    output_ttl: float | None = None  # the seconds its output files are kept (its output_expires_after)


@dataclass(frozen=True)
class BatchRow:
    id: str
    created: float
    batch: BatchObject


def _row(row) -> BatchRow:
    return BatchRow(row["id"], row["created"], BatchObject.model_validate_json(row["batch"]))


def _waiting(batch: BatchObject) -> int:
    """The batch's requests without a result yet (the /metrics queue: a column, so a scrape parses no JSON)."""
    counts = batch.request_counts
    return counts.total - counts.completed - counts.failed


def _ended_at(batch: BatchObject) -> int:
    """When an ended batch ended (its status's time: completed_at, failed_at, ...)."""
    return getattr(batch, f"{batch.status}_at", None) or batch.created_at


class BatchStore:
    def __init__(self, files: FileStore, lease_s: float, clock: Callable[[], float] = time.time):
        """files: the store of the batches' input and result files, in the same database."""
        self.files, self.shared, self.lease_s, self.clock = files, files.shared, lease_s, clock
        # Columns added to gateway_batches since its first release (stop 32), added to a database made before them.
        self.shared.create_tables(SCHEMA, {"gateway_batches": {"expires": self._fill_expires,
                                                               "waiting": self._fill_waiting}})

    def results_expire(self, ended: float, output_ttl: float | None) -> float | None:
        """When the output and error files of a batch that ended at `ended` expire, and the batch with them (one
        with no files: when they would have)."""
        return self.files.expiry(ended, output_ttl)

    def _fill_expires(self, db: Database) -> None:
        """`expires` of the batches that ended before the column was added: their output and error files' expiry
        (the latest; None, kept, when one of them never expires), or, with no file row left (a batch that failed at
        creation, or whose files were deleted or swept), when its files would have expired."""
        rows = db.conn.execute(f"SELECT id, batch, output_ttl FROM gateway_batches WHERE status NOT IN "
                               f"({ACTIVE_SQL})").fetchall()
        for row in rows:
            batch = BatchObject.model_validate_json(row["batch"])
            file_ids = [file_id for file_id in (batch.output_file_id, batch.error_file_id) if file_id]
            expiries = [found["expires"] for file_id in file_ids for found in db.conn.execute(
                "SELECT expires FROM gateway_files WHERE id = ?", (file_id,)).fetchall()]
            if not expiries:
                expires = self.results_expire(_ended_at(batch), row["output_ttl"])
            else:
                expires = None if None in expiries else max(expiries)
            db.conn.execute("UPDATE gateway_batches SET expires = ? WHERE id = ?", (expires, row["id"]))

    @staticmethod
    def _fill_waiting(db: Database) -> None:
        """`waiting` of the batches not yet ended stored before the column was added (what each write keeps since;
        the queue reads no ended batch's, so theirs are not parsed: a site keeps thousands)."""
        rows = db.conn.execute(f"SELECT id, batch FROM gateway_batches WHERE status IN ({ACTIVE_SQL})").fetchall()
        for row in rows:
            db.conn.execute("UPDATE gateway_batches SET waiting = ? WHERE id = ?",
                            (_waiting(BatchObject.model_validate_json(row["batch"])), row["id"]))

    # ------------------------------------------------------------------------------------------- the API's
    def insert(self, owner: str, batch: BatchObject, output_ttl: float | None = None) -> bool:
        """Record a new batch (one that failed at creation goes when its result files would have, see sweep); False,
        nothing recorded, when the input of a batch to run is gone since it was read (deleted, expired): its deletion
        and this take turns, so a deletion after this sees the batch (FileStore.delete) and keeps the file for it."""
        expires = None if batch.status in ACTIVE else self.results_expire(_ended_at(batch), output_ttl)
        with self.shared.transaction() as db:
            if batch.status in ACTIVE and not self.files.lock_live(db, owner, batch.input_file_id):
                return False
            db.conn.execute("INSERT INTO gateway_batches (id, owner, created, status, lease_holder, lease_expires, "
                            "batch, output_ttl, expires, waiting) VALUES (?, ?, ?, ?, NULL, 0, ?, ?, ?, ?)",
                            (batch.id, owner, self.clock(), batch.status, batch.model_dump_json(), output_ttl,
                             expires, _waiting(batch)))
        return True

    def get(self, owner: str, batch_id: str, *, gone_too: bool = False) -> BatchRow | None:
        """The owner's batch; None when there is none (unknown, another owner's, or gone with its files unless
        gone_too: its row, kept PLACE_KEPT_S, still places a list's next page)."""
        live, now = live_clause(self.files.clock, gone_too)
        with self.shared.connection() as db:
            row = db.conn.execute(f"SELECT * FROM gateway_batches WHERE id = ? AND owner = ?{live}",
                                  (batch_id, owner, *now)).fetchone()
        return None if row is None else _row(row)

    def list(self, owner: str, query: PageQuery) -> tuple[list[BatchRow], bool]:
        rows, more = page(self.shared, "gateway_batches", ["owner = ?", LIVE], [owner, self.files.clock()], query,
                          lambda after: self.get(owner, after, gone_too=True), "batch")
        return [_row(row) for row in rows], more

    def cancel(self, owner: str, batch_id: str) -> BatchObject | None:
        """Ask the batch's runner to stop (status cancelling); None when the owner has no such batch, a 400 when it
        has already ended."""
        with self.shared.transaction() as db:
            live, now = live_clause(self.files.clock)
            row = db.conn.execute(f"SELECT * FROM gateway_batches WHERE id = ? AND owner = ?{live}"
                                  + self.shared.for_update(), (batch_id, owner, *now)).fetchone()
            if row is None:
                return None
            batch = _row(row).batch
            if batch.status in ("cancelling", "cancelled"):
                return batch
            if batch.status != "in_progress":  # the one status a batch may be cancelled in (no validating here)
                raise InvalidRequest(f"Cannot cancel a batch with status {batch.status!r}",
                                     code="batch_not_cancellable")
            batch = batch.model_copy(update={"status": "cancelling", "cancelling_at": int(self.clock())})
            self._write(db, batch)
        return batch

    @staticmethod
    def _write(db: Database, batch: BatchObject) -> None:
        db.conn.execute("UPDATE gateway_batches SET status = ?, batch = ?, waiting = ? WHERE id = ?",
                        (batch.status, batch.model_dump_json(), _waiting(batch), batch.id))

    # ------------------------------------------------------------------------------------------- the runner's
    def claimable(self) -> bool:
        """Whether an active batch has no live lease and may be claimed now (one cheap read before a claim's write
        transaction)."""
        now = self.clock()
        with self.shared.connection() as db:
            return db.conn.execute(f"SELECT id FROM gateway_batches WHERE {CLAIMABLE_SQL} LIMIT 1",
                                   (now, now)).fetchone() is not None

    def claim(self, holder: str) -> Claim | None:
        """Take the lease of the active batch nobody holds (a crashed holder's included) that has waited longest for
        a turn: since its creation, since it was last released (round robin: a batch of 50,000 requests yields to
        those submitted after it, BatchRun._after_turn), or a crashed holder's since its claim. On PostgreSQL a row
        another process is claiming is skipped, not waited for (that process gets it: this one takes the next)."""
        now = self.clock()
        skip_claimed = " FOR UPDATE SKIP LOCKED" if self.shared.postgres else ""
        with self.shared.transaction() as db:
            # A cancelled batch first: it is ended at once, whatever turn it waits for (one handed back while its
            # key's rate limit holds has its turn at the limit's end).
            row = db.conn.execute(f"SELECT id, owner, output_ttl FROM gateway_batches WHERE {CLAIMABLE_SQL} "
                                  f"ORDER BY (status = 'cancelling') DESC, COALESCE(turn, created) "
                                  f"LIMIT 1{skip_claimed}", (now, now)).fetchone()
            if row is None:
                return None
            db.conn.execute("UPDATE gateway_batches SET lease_holder = ?, lease_expires = ?, turn = ? WHERE id = ?",
                            (holder, now + self.lease_s, now, row["id"]))
        return Claim(row["id"], row["owner"], holder, row["output_ttl"])

    def queue(self) -> dict[str, tuple[int, int, float]]:
        """Per status a batch not yet ended has: (how many, their requests without a result yet, when the oldest was
        created). One aggregate over the columns each write keeps: no batch's JSON is read, however many run."""
        with self.shared.connection() as db:
            rows = db.conn.execute(f"SELECT status, COUNT(*) AS batches, COALESCE(SUM(waiting), 0) AS waiting, "
                                   f"MIN(created) AS oldest FROM gateway_batches WHERE status IN ({ACTIVE_SQL}) "
                                   f"GROUP BY status").fetchall()
        return {row["status"]: (row["batches"], row["waiting"], row["oldest"]) for row in rows}

    @staticmethod
    def active_inputs(db: Database, owner: str | None = None) -> set[str]:
        """The input files of the owner's batches not yet ended (None: every owner's), kept past their expiry until
        the batch ends; read through `db` (a file's deletion reads them in its transaction)."""
        mine, params = ("", ()) if owner is None else (" AND owner = ?", (owner,))
        rows = db.conn.execute(f"SELECT batch FROM gateway_batches WHERE status IN ({ACTIVE_SQL}){mine}",
                               params).fetchall()
        return {BatchObject.model_validate_json(row["batch"]).input_file_id for row in rows}

    def _held(self, db: Database, claim: Claim) -> BatchObject | None:
        row = db.conn.execute(f"SELECT * FROM gateway_batches WHERE id = ?{self.shared.for_update()}",
                              (claim.batch_id,)).fetchone()
        if row is None or row["lease_holder"] != claim.holder or row["lease_expires"] < self.clock():
            return None
        return _row(row).batch

    def renew(self, claim: Claim, **changes) -> BatchObject | None:
        """Extend the lease (and record the changes given: progress, status); the batch as it is now, None when the
        lease was lost (it ran out and another process may have the batch: stop writing)."""
        with self.shared.transaction() as db:
            batch = self._held(db, claim)
            if batch is None:
                return None
            if changes:
                batch = batch.model_copy(update=changes)
                self._write(db, batch)
            db.conn.execute("UPDATE gateway_batches SET lease_expires = ? WHERE id = ?",
                            (self.clock() + self.lease_s, claim.batch_id))
        return batch

    def release(self, claim: Claim, not_before: float | None = None, **changes) -> None:
        """Give the batch up unfinished (this process drains, or its turn is over): the next process that polls
        takes it over; it waits from now, behind the batches that waited while it ran (not_before: from then, not
        claimed before, e.g. its key's rate limit's end). The changes given (its progress) are recorded with it, in
        the same transaction, while the lease is held."""
        with self.shared.transaction() as db:
            if changes and (batch := self._held(db, claim)) is not None:
                self._write(db, batch.model_copy(update=changes))
            db.conn.execute("UPDATE gateway_batches SET lease_holder = NULL, lease_expires = 0, turn = ? WHERE id = ? "
                            "AND lease_holder = ?", (max(self.clock(), not_before or 0), claim.batch_id,
                                                     claim.holder))

    def finish(self, claim: Claim, batch: BatchObject, outputs: list[StoredFile], expires: float | None) -> bool:
        """Record the batch's final state and its output files in one transaction (expires: the files' expiry, when
        the batch is deleted with them); False when the lease was lost."""
        with self.shared.transaction() as db:
            if self._held(db, claim) is None:
                return False
            for stored in outputs:
                FileStore.record(db, claim.owner, stored)
            self._write(db, batch)
            db.conn.execute("UPDATE gateway_batches SET lease_holder = NULL, lease_expires = 0, expires = ? "
                            "WHERE id = ?", (expires, claim.batch_id))
        return True

    def sweep(self, now: float) -> int:
        """Delete the ended batches whose output and error files expired PLACE_KEPT_S before `now` (the file store's
        clock: the expiry is theirs); how many went. Gone for their owner since they expired (listings leave them
        out, their id is a 404), their rows placed a list's next page till now."""
        with self.shared.transaction() as db:
            return db.conn.execute(f"DELETE FROM gateway_batches WHERE expires <= ? AND status NOT IN "
                                   f"({ACTIVE_SQL})", (now - PLACE_KEPT_S,)).rowcount
