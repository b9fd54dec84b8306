"""Stored responses of the Responses API (`store`, OpenAI's default): what `previous_response_id`, GET/DELETE
/v1/responses/{id} and its input_items read.

A response is kept with the input items of its whole conversation (earlier turns' included, each with an id as
OpenAI lists them) and the response object as answered (its output items, instructions and tools among its
settings), as JSON. They live in the limits database (hpcllm.gateway.shared_state: SQLite in the gateway's state
dir, or PostgreSQL shared by every gateway host), through its connections, so every gateway process and host that
shares the limits shares the responses too.

A response belongs to the API key that made it (a digest of the key, never the key): any other key is told it does
not exist. An open gateway (no keys) has one owner. Rows older than the TTL are invisible at once and deleted by
the next store; beyond the byte bound the oldest are deleted first. Contents are never logged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hpcllm.config import ApiKey, Config
from hpcllm.controller.registry.databases import Database
from hpcllm.gateway.ratelimit import key_digest
from hpcllm.gateway.shared_state import SharedState

SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_responses (id TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL,
                                              size INTEGER NOT NULL, input TEXT NOT NULL, response TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS gateway_responses_age ON gateway_responses (created, size);
"""
# Rows deleted per store when over the byte bound (the rest go at the next ones).
PRUNE_BATCH = 1000
OPEN_GATEWAY_OWNER = "open"  # every request's owner where the gateway has no API keys


def owner_of(key: ApiKey | None) -> str:
    return OPEN_GATEWAY_OWNER if key is None else key_digest(key)


@dataclass(frozen=True)
class StoredResponse:
    input: list[dict[str, Any]]  # the conversation's input items, earlier turns' included
    response: dict[str, Any]  # the response object as answered

    def conversation(self) -> list[dict[str, Any]]:
        """What a request naming this response as previous_response_id continues: its input, then its output."""
        return [*self.input, *self.response["output"]]


class ResponseStore:
    def __init__(self, shared: SharedState, *, ttl_s: float, max_bytes: int,
                 clock: Callable[[], float] = time.time):
        self.shared, self.ttl_s, self.max_bytes, self.clock = shared, ttl_s, max_bytes, clock
        shared.create_tables(SCHEMA)

    @classmethod
    def of(cls, config: Config, shared: SharedState) -> ResponseStore:
        gw = config.gateway
        return cls(shared, ttl_s=gw.responses_ttl_hours * 3600, max_bytes=gw.responses_max_bytes)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def put(self, owner: str, stored: StoredResponse) -> bool:
        """Keep a response (False: larger than the whole byte bound, not kept); expired rows, and the oldest beyond
        the bound, are deleted in the same transaction."""
        input_json, response_json = json.dumps(stored.input), json.dumps(stored.response)
        size = len(input_json.encode()) + len(response_json.encode())
        if size > self.max_bytes:
            return False
        now = self.clock()
        with self.shared.transaction() as db:
            db.conn.execute("INSERT INTO gateway_responses (id, owner, created, size, input, response) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (stored.response["id"], owner, now, size, input_json, response_json))
            self._prune(db, now)
        return True

    def _prune(self, db: Database, now: float) -> None:
        db.conn.execute("DELETE FROM gateway_responses WHERE created < ?", (now - self.ttl_s,))
        total = db.conn.execute("SELECT COALESCE(SUM(size), 0) AS total FROM gateway_responses").fetchone()["total"]
        excess = total - self.max_bytes
        if excess <= 0:
            return
        oldest = db.conn.execute("SELECT id, size FROM gateway_responses ORDER BY created, id LIMIT ?",
                                 (PRUNE_BATCH,)).fetchall()
        doomed = []
        for row in oldest:
            if excess <= 0:
                break
            doomed.append((row["id"],))
            excess -= row["size"]
        db.conn.executemany("DELETE FROM gateway_responses WHERE id = ?", doomed)

    def get(self, owner: str, response_id: str) -> StoredResponse | None:
        """The owner's response, None when there is none (unknown, expired, deleted, or another owner's)."""
        with self.shared.connection() as db:
            row = db.conn.execute("SELECT input, response FROM gateway_responses WHERE id = ? AND owner = ? AND "
                                  "created >= ?", (response_id, owner, self.clock() - self.ttl_s)).fetchone()
        if row is None:
            return None
        return StoredResponse(input=json.loads(row["input"]), response=json.loads(row["response"]))

    def delete(self, owner: str, response_id: str) -> bool:
        """False when the owner has no such response."""
        with self.shared.connection() as db:
            cur = db.conn.execute("DELETE FROM gateway_responses WHERE id = ? AND owner = ? AND created >= ?",
                                  (response_id, owner, self.clock() - self.ttl_s))
            return cur.rowcount == 1
