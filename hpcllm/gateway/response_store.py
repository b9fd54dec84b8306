"""Stored responses (Responses API, `store`: OpenAI's default) and conversations (Conversations API): what
`previous_response_id`, `conversation`, `item_reference` input items, GET/DELETE /v1/responses/{id} and its
input_items, and /v1/conversations read.

Two tables in the limits database (hpcllm.gateway.shared_state: SQLite in the gateway's state dir, or PostgreSQL
shared by every gateway host), so every gateway process and host that shares the limits shares them too:

- gateway_stored: one row per response or conversation (`kind`), its JSON body (a response as answered, its output
  left out; a conversation's object), and for a response the response it continued (`previous`).
- gateway_items: every item once, JSON, in the order stored (`seq`), held by one response (its own input items,
  then its output items) or one conversation. The one exception: a stored response in a conversation holds its own
  copy of its turn's items, which are also appended to the conversation (the conversation's items may be deleted
  later, the response's input_items may not change), so they count twice against the bound and the quota.

A response chained by previous_response_id stores only its new input items and a link: its conversation is rebuilt
by following the links, so a chain of n turns stores O(n) items (a stored response used to copy its whole
conversation: n(n+1)/2 items). A response keeps its ancestors alive: storing it sets `used` on the whole chain (and
on the conversation the chain began in, whose earlier items it replays), and rows are deleted by `used` (after the
TTL, or oldest first beyond the byte bound), so an ancestor never goes before its descendants. A deleted response
that others continue is only hidden until they go.

Everything belongs to the API key that made it (a digest of the key, never the key): any other key is told it does
not exist. An open gateway (no keys) has one owner. Sizes are the bytes of the stored JSON: each item's, and each
body's; they count against the whole bound (max_bytes) and, where set, the owner's quota (max_bytes_per_key).
Contents are never logged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from hpcllm.config import ApiKey, Config
from hpcllm.controller.registry.databases import Database
from hpcllm.gateway.ratelimit import key_digest
from hpcllm.gateway.shared_state import SharedState

SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_stored (id TEXT PRIMARY KEY, owner TEXT NOT NULL, kind TEXT NOT NULL,
                                           seen REAL NOT NULL, used REAL NOT NULL, size INTEGER NOT NULL,
                                           previous TEXT, hidden INTEGER NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS gateway_stored_used ON gateway_stored (used, seen);
CREATE INDEX IF NOT EXISTS gateway_stored_previous ON gateway_stored (previous);
CREATE INDEX IF NOT EXISTS gateway_stored_owner ON gateway_stored (owner);
CREATE TABLE IF NOT EXISTS gateway_items (seq INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL,
                                          id TEXT NOT NULL, holder TEXT NOT NULL, output INTEGER NOT NULL,
                                          size INTEGER NOT NULL, item TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS gateway_items_holder ON gateway_items (holder, seq);
CREATE INDEX IF NOT EXISTS gateway_items_id ON gateway_items (owner, id);
"""
# The layout before gateway_stored: each response with its whole conversation's input copied (session 29's).
OLD_LAYOUT = "gateway_responses"
RESPONSE, CONVERSATION = "response", "conversation"  # gateway_stored.kind
# Rows deleted per store when over the byte bound (the rest go at the next ones).
PRUNE_BATCH = 1000
OPEN_GATEWAY_OWNER = "open"  # every request's owner where the gateway has no API keys
# A response's chain, from it back to the first response (hidden and invisible ancestors included: they are kept
# for it). The owner is checked on the first row; a chain never crosses owners.
CHAIN = ("WITH RECURSIVE chain (id, previous) AS (SELECT id, previous FROM gateway_stored WHERE id = ? AND owner = ? "
         "UNION ALL SELECT s.id, s.previous FROM gateway_stored s JOIN chain c ON s.id = c.previous) ")


def owner_of(key: ApiKey | None) -> str:
    return OPEN_GATEWAY_OWNER if key is None else key_digest(key)


def _has_table(db: Database, postgres: bool, table: str) -> bool:
    sql = ("SELECT to_regclass(?) IS NOT NULL AS found" if postgres
           else "SELECT COUNT(*) > 0 AS found FROM sqlite_master WHERE type = 'table' AND name = ?")
    return bool(db.conn.execute(sql, (table,)).fetchone()["found"])


def _size(text: str) -> int:
    return len(text.encode())


@dataclass(frozen=True)
class StoredResponse:
    input: list[dict[str, Any]]  # the conversation's input items, earlier turns' included
    response: dict[str, Any]  # the response object as answered
    # Where the chain began as a turn of a conversation: that conversation's items before the turn (its context,
    # not the response's own input: input_items leaves them out), and the conversation's id (ResponseStore.continued
    # reads both; None for a chain not begun in one).
    before: list[dict[str, Any]] = field(default_factory=list)
    origin: str | None = None

    def conversation(self) -> list[dict[str, Any]]:
        """What a request naming this response as previous_response_id continues: all its context held (the
        conversation's items before the chain, where it began in one), its input, then its output."""
        return [*self.before, *self.input, *self.response["output"]]


@dataclass(frozen=True)
class NewResponse:
    """A finished response to keep (`store`; else only its items appended to its conversation): its
    conversation's input items, of which the first `carried` came from `previous` (stored there already; `origin`:
    the conversation its chain began in, StoredResponse.origin) or from `conversation` (whose items this response's
    own are appended to; `read_upto`: the largest `seq` of those the turn read, 0 for none)."""

    response: dict[str, Any]
    input: list[dict[str, Any]]
    previous: str | None = None
    conversation: str | None = None
    carried: int = 0
    store: bool = True
    read_upto: int = 0
    origin: str | None = None

    @property
    def own_input(self) -> list[dict[str, Any]]:
        """This request's own input items (the carried ones are stored already)."""
        return self.input[self.carried:]


# Item ids one `IN (...)` reads (an input may name 100,000 item_references; PostgreSQL takes 65,535 parameters).
ITEMS_PER_QUERY = 1000


class Kept(NamedTuple):
    """What ResponseStore.put kept: the response (`stored`), and its items appended to its conversation (`appended`;
    False for a response in none); why a response asked to be stored was not (`refused`): larger than the whole
    bound ("bound"), or its owner's stored bytes at its quota ("quota")."""

    stored: bool
    appended: bool
    refused: Literal["bound", "quota"] | None = None


class TooLarge(Exception):
    """A conversation's write that would not fit in the whole byte bound (of_response: a response to store whose
    input alone would not)."""

    def __init__(self, of_response: bool = False):
        super().__init__()
        self.of_response = of_response


class DuplicateItem(Exception):
    """Items appended to a conversation that already has an item of one's id (`place`: its index among them): kept
    twice, a listing paged by `after` (an item id) could not page past it."""

    def __init__(self, place: int, item_id: str):
        super().__init__(f"item {place} ({item_id[:100]}) is in the conversation already")
        self.place, self.item_id = place, item_id


class OverQuota(Exception):
    """An owner's write that would take it over its quota (max_bytes_per_key)."""

    def __init__(self, stored: int, quota: int):
        super().__init__(f"{stored} bytes stored, quota {quota}")
        self.stored, self.quota = stored, quota


class ResponseStore:
    def __init__(self, shared: SharedState, *, ttl_s: float, max_bytes: int, max_bytes_per_key: int = 0,
                 clock: Callable[[], float] = time.time):
        self.shared, self.ttl_s, self.max_bytes, self.clock = shared, ttl_s, max_bytes, clock
        self.max_bytes_per_key = max_bytes_per_key  # 0: no quota but the whole bound
        shared.create_tables(SCHEMA)
        self._adopt_old_layout()

    def _adopt_old_layout(self) -> None:
        """A gateway upgraded in place keeps the responses the old layout stored: each becomes a response of its
        own (its copied conversation as its input items, no link), in the transaction that drops the old table, so
        every process that starts at the same time finds either the old table whole or none."""
        with self.shared.connection() as db:  # most starts: no old table, and no write lock taken to see that
            if not _has_table(db, self.shared.postgres, OLD_LAYOUT):
                return
        with self.shared.schema_transaction() as db:
            if not _has_table(db, self.shared.postgres, OLD_LAYOUT):  # another process adopted it meanwhile
                return
            for row in db.conn.execute(f"SELECT id, owner, created, input, response FROM {OLD_LAYOUT}").fetchall():
                response = json.loads(row["response"])
                body = json.dumps({**response, "output": []})
                rows = [*self._item_rows(row["owner"], json.loads(row["input"]), False),
                        *self._item_rows(row["owner"], response.get("output", []), True)]
                db.conn.execute("INSERT INTO gateway_stored (id, owner, kind, seen, used, size, previous, hidden, "
                                "body) VALUES (?, ?, ?, ?, ?, ?, NULL, 0, ?)",
                                (row["id"], row["owner"], RESPONSE, row["created"], row["created"],
                                 _size(body) + sum(r[3] for r in rows), body))
                self._insert_items(db, row["id"], rows)
            db.conn.execute(f"DROP TABLE {OLD_LAYOUT}")

    @classmethod
    def of(cls, config: Config, shared: SharedState) -> ResponseStore:
        gw = config.gateway
        return cls(shared, ttl_s=gw.responses_ttl_hours * 3600, max_bytes=gw.responses_max_bytes,
                   max_bytes_per_key=gw.responses_max_bytes_per_key)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _cutoff(self) -> float:
        return self.clock() - self.ttl_s

    def _owner_bytes(self, db: Database, owner: str) -> int:
        """What the owner's rows take now (hidden ones too: they are kept), expired ones left out."""
        return db.conn.execute("SELECT COALESCE(SUM(size), 0) AS total FROM gateway_stored WHERE owner = ? AND "
                               "used >= ?", (owner, self._cutoff())).fetchone()["total"]

    def check_quota(self, owner: str, adding: int = 1, db: Database | None = None) -> None:
        """OverQuota when `adding` more bytes would take the owner over its quota."""
        if not self.max_bytes_per_key or adding <= 0:  # a write that frees bytes is always allowed
            return
        if db is None:
            with self.shared.connection() as db:
                self._within_quota(db, owner, adding)
        else:  # a write's check: one of the owner's at a time across hosts (its total read, then added to)
            self.shared.lock(db, f"responses:{owner}")
            self._within_quota(db, owner, adding)

    def _within_quota(self, db: Database, owner: str, adding: int) -> None:
        stored = self._owner_bytes(db, owner)
        if stored + adding > self.max_bytes_per_key:
            raise OverQuota(stored, self.max_bytes_per_key)

    # ------------------------------------------------------------------------------------------------ writing
    def check_room(self, owner: str, new: NewResponse) -> None:
        """Before a response is generated: TooLarge where its own input items alone would take its conversation
        over the whole bound, or are larger than it for a response to store (of_response); OverQuota where they
        would take the owner over its quota (once per copy kept: the response's, the conversation's). Its output's
        size is known only once generated: put keeps the response whose output crosses the quota, and nothing where
        it takes the conversation or the response over the bound."""
        added = sum(row[3] for row in self._item_rows(owner, new.own_input, False))
        # put would not keep it, whatever its output (a conversation's turn: the conversation's bound says so, below;
        # 'store': false would not help it)
        if new.store and new.conversation is None and added > self.max_bytes:
            raise TooLarge(of_response=True)
        if new.conversation is None and not self.max_bytes_per_key:
            return
        with self.shared.connection() as db:  # one connection for both reads
            conversation = None if new.conversation is None else self._row(db, new.conversation, owner, lock=False)
            if conversation is not None:
                self._within_bound(conversation["size"], added)
            if self.max_bytes_per_key:
                self._within_quota(db, owner, max(1, added * (int(new.store) + int(new.conversation is not None))))

    def put(self, owner: str, new: NewResponse) -> Kept:
        """Keep a response (not `stored`: larger than the whole byte bound, or the owner over its quota), appending
        its items to its conversation (TooLarge: the conversation would not fit in the whole bound; nothing is
        kept). A conversation deleted or expired meanwhile, or appended to by another request since the turn read
        it (an item after `read_upto`: the answer did not read it, and appended after it the conversation would say
        it did): nothing is `appended`, the response is kept on its own (`store`; with every item it read: they are
        kept nowhere else for it), its `conversation` None. Items
        deleted meanwhile are no reason: the turn appended after fewer items is a conversation one could have
        made. Expired rows, and the oldest beyond the bound, are deleted in the same transaction.
        _append's DuplicateItem cannot come from a turn: appended, the conversation holds only items the turn read
        (none after read_upto), its own input was checked against those (check_unique_ids, a 400 before it
        generated) and its output's ids are new. "Those" is ResponsesRequest.continuing's list, which drops the items
        of a type outside ITEM_TYPES: it drops none of a conversation today, as every item written to one is of those
        types (check_item_types on each input; a turn's output items are messages, function calls and reasoning). A
        type stored but dropped there would escape the check, and could meet DuplicateItem here."""
        output = new.response["output"]
        now = self.clock()
        with self.shared.transaction() as db:
            # Locked first, as add_items and update_conversation lock it before the owner's quota.
            conversation = None if new.conversation is None else self._row(db, new.conversation, owner)
            if conversation is not None and self._appended_since(db, new.conversation, new.read_upto):
                conversation = None
            kept_body = {**new.response, "output": []}
            if new.conversation is not None and conversation is None:  # deleted, expired or appended to while it
                # generated: the response kept is in no conversation (the caller's answer says so too)
                kept_body["conversation"] = None
            body = json.dumps(kept_body)
            previous = new.previous if new.previous is not None and self._row(db, new.previous) is not None else None
            # What it carried is not kept elsewhere (its previous response gone; its conversation gone, or not
            # appended to): it keeps every item its answer read, else a chain from it would forget them.
            carried_lost = (new.previous is not None and previous is None) or (new.conversation is not None and
                                                                               conversation is None)
            own = new.input if carried_lost else new.own_input
            rows = [*self._item_rows(owner, own, False), *self._item_rows(owner, output, True)]
            size = _size(body) + sum(row[3] for row in rows)
            # Under its quota still: a response is generated before its size is known, so the one whose output
            # crosses the quota is kept (and the owner's next asks are refused before generating).
            refused = None if not new.store or size <= self.max_bytes else "bound"
            if new.store and refused is None and self.max_bytes_per_key:
                self.shared.lock(db, f"responses:{owner}")  # as check_quota's
                if self._owner_bytes(db, owner) >= self.max_bytes_per_key:
                    refused = "quota"
            kept = new.store and refused is None
            if kept:
                db.conn.execute("INSERT INTO gateway_stored (id, owner, kind, seen, used, size, previous, hidden, "
                                "body) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)",
                                (new.response["id"], owner, RESPONSE, now, now, size, previous, body))
                self._insert_items(db, new.response["id"], rows)
            if kept and previous is not None:  # the chain lives as long as its newest response
                db.conn.execute(CHAIN + "UPDATE gateway_stored SET used = ? WHERE id IN (SELECT id FROM chain)",
                                (previous, owner, now))
                if new.origin is not None:  # and the conversation it began in, whose earlier items it replays
                    db.conn.execute("UPDATE gateway_stored SET used = ? WHERE id = ? AND owner = ? AND kind = ?",
                                    (now, new.origin, owner, CONVERSATION))
            if conversation is not None:
                self._append(db, new.conversation, conversation["size"], rows, now)
            self._prune(db, now)
        return Kept(stored=kept, appended=conversation is not None, refused=refused)

    @staticmethod
    def _appended_since(db: Database, conversation: str, read_upto: int) -> bool:
        """Whether the (locked) conversation has an item stored after `seq` read_upto: appends to it are one at a
        time under its row lock, and seq only grows, so a later item has a larger seq."""
        return db.conn.execute("SELECT seq FROM gateway_items WHERE holder = ? AND seq > ? LIMIT 1",
                               (conversation, read_upto)).fetchone() is not None

    def _row(self, db: Database, stored_id: str, owner: str | None = None, *, lock: bool = True) -> Any:
        """The row (its size and body) if it is still there, else None; locked till the commit (`lock`, in a write
        transaction); with an owner: the owner's conversation if it is there and not expired."""
        sql = "SELECT size, body FROM gateway_stored WHERE id = ?"
        params: tuple = (stored_id,)
        if owner is not None:
            sql += " AND owner = ? AND kind = ? AND seen >= ?"
            params = (stored_id, owner, CONVERSATION, self._cutoff())
        return db.conn.execute(sql + (self.shared.for_update() if lock else ""), params).fetchone()

    @staticmethod
    def _item_rows(owner: str, items: list[dict[str, Any]], output: bool) -> list[tuple]:
        """(owner, id, output, size, item JSON) per item."""
        rows = []
        for item in items:
            text = json.dumps(item)
            rows.append((owner, item["id"], int(output), _size(text), text))
        return rows

    @staticmethod
    def _insert_items(db: Database, holder: str, rows: list[tuple]) -> None:
        db.conn.executemany("INSERT INTO gateway_items (owner, id, holder, output, size, item) "
                            "VALUES (?, ?, ?, ?, ?, ?)", [(*row[:2], holder, *row[2:]) for row in rows])

    def _append(self, db: Database, conversation: str, size: int, rows: list[tuple], now: float) -> None:
        """Items at the end of a (locked) conversation of `size` bytes, as its input (a conversation has no output);
        TooLarge where it would outgrow the whole bound (the prune would then delete it whole), DuplicateItem where it
        has an item of one's id (checked here, locked: another request may have added it since its own check)."""
        added = sum(row[3] for row in rows)
        self._within_bound(size, added)
        ids = [row[1] for row in rows]
        held = set()
        for start in range(0, len(ids), ITEMS_PER_QUERY):  # by (owner, id): not reading the conversation's items
            chunk = ids[start:start + ITEMS_PER_QUERY]
            held.update(row["id"] for row in db.conn.execute(
                f"SELECT id FROM gateway_items WHERE owner = ? AND id IN ({', '.join('?' * len(chunk))}) AND "
                f"holder = ?", (rows[0][0], *chunk, conversation)).fetchall())
        duplicate = next((place for place, item_id in enumerate(ids) if item_id in held), None)
        if duplicate is not None:
            raise DuplicateItem(duplicate, ids[duplicate])
        self._insert_items(db, conversation, [(*row[:2], 0, *row[3:]) for row in rows])
        db.conn.execute("UPDATE gateway_stored SET size = size + ?, seen = ?, used = ? WHERE id = ?",
                        (added, now, now, conversation))

    def _within_bound(self, size: int, added: int) -> None:
        """TooLarge where a conversation of `size` bytes would outgrow the whole bound by `added` more (the prune
        would then delete it whole)."""
        if size + added > self.max_bytes:
            raise TooLarge

    def _prune(self, db: Database, now: float) -> None:
        cutoff = now - self.ttl_s
        db.conn.execute("DELETE FROM gateway_items WHERE holder IN (SELECT id FROM gateway_stored WHERE used < ?)",
                        (cutoff,))
        db.conn.execute("DELETE FROM gateway_stored WHERE used < ?", (cutoff,))
        total = db.conn.execute("SELECT COALESCE(SUM(size), 0) AS total FROM gateway_stored").fetchone()["total"]
        excess = total - self.max_bytes
        if excess <= 0:
            return
        # A response's descendants have the same `used` or an earlier one, and a later `seen`: they go first.
        oldest = db.conn.execute("SELECT id, size FROM gateway_stored ORDER BY used, seen DESC, id LIMIT ?",
                                 (PRUNE_BATCH,)).fetchall()
        doomed = []
        for row in oldest:
            if excess <= 0:
                break
            doomed.append((row["id"],))
            excess -= row["size"]
        self._remove(db, doomed)

    @staticmethod
    def _remove(db: Database, ids: list[tuple[str]]) -> None:
        db.conn.executemany("DELETE FROM gateway_items WHERE holder = ?", ids)
        db.conn.executemany("DELETE FROM gateway_stored WHERE id = ?", ids)

    # ------------------------------------------------------------------------------------------------ reading
    def _visible(self, db: Database, owner: str, stored_id: str, kind: str) -> dict[str, Any] | None:
        row = db.conn.execute("SELECT body FROM gateway_stored WHERE id = ? AND owner = ? AND kind = ? AND "
                              "hidden = 0 AND seen >= ?", (stored_id, owner, kind, self._cutoff())).fetchone()
        return None if row is None else json.loads(row["body"])

    def get(self, owner: str, response_id: str) -> StoredResponse | None:
        """The owner's response, None when there is none (unknown, expired, deleted, or another owner's): its input
        items and its output (`before` left empty: GET and input_items show the response's own)."""
        return self._read(owner, response_id, context=False)

    def continued(self, owner: str, response_id: str) -> StoredResponse | None:
        """get's response with all its context (`before`): what a request naming it as previous_response_id
        continues."""
        return self._read(owner, response_id, context=True)

    def _read(self, owner: str, response_id: str, context: bool) -> StoredResponse | None:
        with self.shared.connection() as db:
            response = self._visible(db, owner, response_id, RESPONSE)
            if response is None:
                return None
            rows = db.conn.execute(CHAIN + "SELECT i.seq, i.holder, i.output, i.item FROM gateway_items i JOIN "
                                   "chain c ON i.holder = c.id ORDER BY i.seq", (response_id, owner)).fetchall()
            # The first item is the chain's first response's (each response holds its own input, stored before its
            # descendants')
            origin = self._origin_conversation(db, rows[0]["holder"]) if context and rows else None
            before = [] if origin is None else self._conversation_before(db, owner, origin, rows[0]["seq"])
        own_output = [row["holder"] == response_id and row["output"] for row in rows]
        response["output"] = [json.loads(row["item"]) for row, out in zip(rows, own_output) if out]
        return StoredResponse(input=[json.loads(row["item"]) for row, out in zip(rows, own_output) if not out],
                              response=response, before=before, origin=origin)

    @staticmethod
    def _origin_conversation(db: Database, first: str) -> str | None:
        """The id of the conversation a chain began in as a turn (its `first` response's `conversation`; None for a
        chain not begun in one: a turn not appended to one says conversation null)."""
        row = db.conn.execute("SELECT body FROM gateway_stored WHERE id = ?", (first,)).fetchone()
        conversation = None if row is None else json.loads(row["body"]).get("conversation")
        return conversation["id"] if conversation else None

    def _conversation_before(self, db: Database, owner: str, conversation: str, first_seq: int) -> list[dict[str, Any]]:
        """The items of the conversation a chain began in (_origin_conversation), before that turn (those it read:
        its own items are stored, then appended to the conversation, in one transaction under the conversation's
        lock, so every item before its first has a smaller seq), as the conversation holds them now: none where it
        was deleted. Past its own TTL (unseen by its routes) it is kept as long as the chain is (put refreshes its
        `used` with the chain's), as an ancestor response is: its items are read while its row is there."""
        rows = db.conn.execute("SELECT i.item FROM gateway_items i JOIN gateway_stored s ON i.holder = s.id WHERE "
                               "i.holder = ? AND i.seq < ? AND s.owner = ? AND s.kind = ? AND s.used >= ? ORDER BY "
                               "i.seq", (conversation, first_seq, owner, CONVERSATION, self._cutoff())).fetchall()
        return [json.loads(row["item"]) for row in rows]

    def exists(self, owner: str, response_id: str) -> bool:
        """Whether the owner has this response (get's None or not, without reading its conversation)."""
        with self.shared.connection() as db:
            return self._visible(db, owner, response_id, RESPONSE) is not None

    def items(self, owner: str, item_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The owner's items with these ids, by id (the latest stored, where a client sent one id twice; an id it
        has none of left out): what item_reference input items name, read in one query."""
        if not item_ids:
            return {}
        wanted = sorted(set(item_ids))
        rows = []
        with self.shared.connection() as db:
            for start in range(0, len(wanted), ITEMS_PER_QUERY):
                chunk = wanted[start:start + ITEMS_PER_QUERY]
                rows += db.conn.execute(
                    "SELECT i.seq, i.id, i.item FROM gateway_items i JOIN gateway_stored s ON i.holder = s.id "
                    f"WHERE i.owner = ? AND i.id IN ({', '.join('?' * len(chunk))}) AND s.used >= ?",
                    (owner, *chunk, self._cutoff())).fetchall()
        rows.sort(key=lambda row: row["seq"])  # the latest stored of an id wins
        return {row["id"]: json.loads(row["item"]) for row in rows}

    def delete(self, owner: str, response_id: str) -> bool:
        """False when the owner has no such response. One that others continue is hidden until they go; a hidden
        ancestor left with no descendants goes with it."""
        with self.shared.transaction() as db:
            if self._visible(db, owner, response_id, RESPONSE) is None:
                return False
            doomed: str | None = response_id
            db.conn.execute("UPDATE gateway_stored SET hidden = 1 WHERE id = ?", (response_id,))
            while doomed is not None:
                if db.conn.execute("SELECT id FROM gateway_stored WHERE previous = ? LIMIT 1",
                                   (doomed,)).fetchone() is not None:
                    break
                row = db.conn.execute("SELECT previous FROM gateway_stored WHERE id = ? AND hidden = 1",
                                      (doomed,)).fetchone()
                if row is None:
                    break
                self._remove(db, [(doomed,)])
                doomed = row["previous"]
            return True

    # ---------------------------------------------------------------------------------------------- conversations
    def create_conversation(self, owner: str, conversation: dict[str, Any], items: list[dict[str, Any]]) -> None:
        """Keep a new conversation object with its first items (TooLarge: over the whole byte bound; OverQuota)."""
        body = json.dumps(conversation)
        rows = self._item_rows(owner, items, False)
        now = self.clock()
        with self.shared.transaction() as db:
            self.check_quota(owner, _size(body) + sum(row[3] for row in rows), db)
            db.conn.execute("INSERT INTO gateway_stored (id, owner, kind, seen, used, size, previous, hidden, body) "
                            "VALUES (?, ?, ?, ?, ?, ?, NULL, 0, ?)",
                            (conversation["id"], owner, CONVERSATION, now, now, _size(body), body))
            self._append(db, conversation["id"], _size(body), rows, now)
            self._prune(db, now)

    def conversation(self, owner: str, conversation_id: str) -> dict[str, Any] | None:
        with self.shared.connection() as db:
            return self._visible(db, owner, conversation_id, CONVERSATION)

    def conversation_items(self, owner: str, conversation_id: str) -> list[dict[str, Any]] | None:
        """A conversation's items, oldest first; None when the owner has no such conversation."""
        read = self.read_conversation(owner, conversation_id)
        return None if read is None else read[0]

    def read_conversation(self, owner: str, conversation_id: str) -> tuple[list[dict[str, Any]], int] | None:
        """A conversation's items, oldest first, and the largest `seq` among them (0: none; a turn's read_upto);
        None when the owner has no such conversation."""
        with self.shared.connection() as db:
            if self._visible(db, owner, conversation_id, CONVERSATION) is None:
                return None
            return self._items(db, conversation_id)

    @classmethod
    def _items(cls, db: Database, conversation_id: str) -> tuple[list[dict[str, Any]], int]:
        """read_conversation's items and largest `seq`, of a conversation known to be there."""
        return cls._decoded(cls._item_rows_of(db, conversation_id))

    @staticmethod
    def _item_rows_of(db: Database, conversation_id: str) -> list:
        return db.conn.execute("SELECT seq, item FROM gateway_items WHERE holder = ? ORDER BY seq",
                               (conversation_id,)).fetchall()

    @staticmethod
    def _decoded(rows: list) -> tuple[list[dict[str, Any]], int]:
        """_items' answer from its rows."""
        return [json.loads(row["item"]) for row in rows], rows[-1]["seq"] if rows else 0

    def conversation_item(self, owner: str, conversation_id: str, item_id: str) -> dict[str, Any] | None:
        """An item of the owner's conversation (the latest with that id), None when there is none."""
        with self.shared.connection() as db:
            if self._visible(db, owner, conversation_id, CONVERSATION) is None:
                return None
            row = db.conn.execute("SELECT item FROM gateway_items WHERE holder = ? AND id = ? ORDER BY seq DESC "
                                  "LIMIT 1", (conversation_id, item_id)).fetchone()
        return None if row is None else json.loads(row["item"])

    def update_conversation(self, owner: str, conversation_id: str,
                            change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any] | None:
        """The conversation object after `change` (its new body), None when the owner has none (TooLarge: it would
        outgrow the whole bound, and the prune delete it whole; OverQuota)."""
        now = self.clock()
        with self.shared.transaction() as db:
            row = self._row(db, conversation_id, owner)
            if row is None:
                return None
            old = row["body"]
            body = change(json.loads(old))
            new = json.dumps(body)
            grown = _size(new) - _size(old)
            self._within_bound(row["size"], grown)
            self.check_quota(owner, grown, db)
            db.conn.execute("UPDATE gateway_stored SET body = ?, size = size + ?, seen = ?, used = ? WHERE id = ?",
                            (new, grown, now, now, conversation_id))
            self._prune(db, now)
        return body

    def add_items(self, owner: str, conversation_id: str, items: list[dict[str, Any]]) -> bool:
        """Items at the end of the owner's conversation: False when it has none (TooLarge: over the whole bound;
        OverQuota; DuplicateItem)."""
        rows = self._item_rows(owner, items, False)
        now = self.clock()
        with self.shared.transaction() as db:
            conversation = self._row(db, conversation_id, owner)
            if conversation is None:
                return False
            self.check_quota(owner, sum(row[3] for row in rows), db)
            self._append(db, conversation_id, conversation["size"], rows, now)
            self._prune(db, now)
        return True

    def begin_turn(self, owner: str, conversation_id: str,
                   turn_id: str) -> tuple[list[dict[str, Any]], int] | Literal[False] | None:
        """A response turn's hold on its conversation while it is generated (one at a time, as OpenAI's), and the
        conversation's items the turn reads (read_conversation's, read under the hold): None when the owner has no
        such conversation, False when another turn holds it. A stream-slot lease (SharedState.hold_slot, under the
        conversation's row lock): freed by end_turn, or when the process holding it dies or its lease runs out."""
        with self.shared.transaction() as db:
            if self._row(db, conversation_id, owner) is None:
                return None
            if not self.shared.hold_slot(db, f"conversation:{conversation_id}", turn_id, 1):
                return False
            rows = self._item_rows_of(db, conversation_id)
        return self._decoded(rows)  # after the commit: other writers wait for the transaction, not the decoding

    def end_turn(self, turn_id: str) -> None:
        """Free begin_turn's hold (again: a no-op)."""
        self.shared.close_stream(turn_id)

    def delete_item(self, owner: str, conversation_id: str, item_id: str) -> bool | None:
        """None: no such conversation; False: no such item in it. A change: the conversation expires the TTL after."""
        now = self.clock()
        with self.shared.transaction() as db:
            if self._row(db, conversation_id, owner) is None:
                return None
            row = db.conn.execute("SELECT seq, size FROM gateway_items WHERE holder = ? AND id = ? "
                                  "ORDER BY seq DESC LIMIT 1", (conversation_id, item_id)).fetchone()
            if row is None:
                return False
            db.conn.execute("DELETE FROM gateway_items WHERE seq = ?", (row["seq"],))
            db.conn.execute("UPDATE gateway_stored SET size = size - ?, seen = ?, used = ? WHERE id = ?",
                            (row["size"], now, now, conversation_id))
        return True

    def delete_conversation(self, owner: str, conversation_id: str) -> bool:
        with self.shared.transaction() as db:
            if self._row(db, conversation_id, owner) is None:
                return False
            self._remove(db, [(conversation_id,)])
        return True
