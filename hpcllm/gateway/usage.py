"""Usage accounting: requests and tokens per UTC day, API key name, group, model and endpoint, for reports to
departments and fair-share discussions (GET /v1/admin/usage, `hpcllm usage`).

Rows live in the limits database (hpcllm.gateway.shared_state: SQLite in the gateway's state dir, or PostgreSQL
shared by every gateway host), as the limits and stored responses do. A key is recorded by its name, never the key
itself. A finished request (streamed or not, failed or closed by its client: what was used) is one UPSERT adding
to its day's row, written by a background thread per process: the request never waits on the database, and a
database error is logged once and counted (hpcllm_usage_records_dropped), never the request's failure. Rows older
than the retention are deleted by the first write of each day.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

from hpcllm.config import ApiKey, Config
from hpcllm.gateway.errors import InvalidRequest
from hpcllm.gateway.metrics import GatewayMetrics
from hpcllm.gateway.shared_state import SharedState

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_usage (day TEXT NOT NULL, key_name TEXT NOT NULL, key_group TEXT NOT NULL,
                                          model TEXT NOT NULL, endpoint TEXT NOT NULL, requests INTEGER NOT NULL,
                                          prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
                                          PRIMARY KEY (day, key_name, key_group, model, endpoint));
"""
UPSERT = ("INSERT INTO gateway_usage (day, key_name, key_group, model, endpoint, requests, prompt_tokens, "
          "completion_tokens) VALUES (?, ?, ?, ?, ?, 1, ?, ?) ON CONFLICT (day, key_name, key_group, model, endpoint) "
          "DO UPDATE SET requests = gateway_usage.requests + 1, "
          "prompt_tokens = gateway_usage.prompt_tokens + excluded.prompt_tokens, "
          "completion_tokens = gateway_usage.completion_tokens + excluded.completion_tokens")
# Records waiting for the writer; beyond this (the database stalled for long) new ones are dropped and counted.
MAX_PENDING = 10_000
# A shutdown waits this long for the queued records before it logs that it waits on the database.
QUIET_CLOSE_S = 1.0
# At most this long, unless the shutdown has less time (Gateway.close's budget).
CLOSE_TIMEOUT_S = 5.0
# What rows a report groups by (the API's `by`) -> the column.
GROUP_BY = {"day": "day", "key": "key_name", "group": "key_group", "model": "model", "endpoint": "endpoint"}
# Set in the WSGI environ of the requests the batch runner sends through the app (a client cannot set it: headers
# arrive as HTTP_*): their usage is recorded under "batch:<endpoint>", apart from interactive use.
BATCH_ENVIRON = "hpcllm.batch"
BATCH_ENDPOINT_PREFIX = "batch:"
DEFAULT_REPORT_DAYS = 30
RELATIVE_DAYS = re.compile(r"(\d{1,5})d")


@dataclass(frozen=True)
class UsageRecord:
    day: str  # YYYY-MM-DD, UTC
    key_name: str  # "" on an open gateway (no keys)
    group: str  # "" for a key without a group
    model: str  # as asked for: an adapter is itself
    endpoint: str  # completions, chat, responses, embeddings, score, rerank, classify; batch:chat... for batches
    prompt_tokens: int
    completion_tokens: int


def usage_endpoint(blueprint: str, environ: dict[str, Any]) -> str:
    """The endpoint a request's usage is recorded under: its API's name, prefixed batch: for a batch's request."""
    return f"{BATCH_ENDPOINT_PREFIX}{blueprint}" if environ.get(BATCH_ENVIRON) else blueprint


def utc_day(timestamp: float) -> date:
    return datetime.fromtimestamp(timestamp, timezone.utc).date()


class UsageLog:
    def __init__(self, shared: SharedState, metrics: GatewayMetrics, *, retention_days: int,
                 clock: Callable[[], float] = time.time):
        self.shared, self.metrics, self.retention_days, self.clock = shared, metrics, retention_days, clock
        shared.create_tables(SCHEMA)
        self._queue: queue.Queue[UsageRecord | None] = queue.Queue(MAX_PENDING)
        self._pending = 0  # records put and not yet written (or dropped)
        self._settled = threading.Condition()
        self._writer_pid: int | None = None  # a forked gunicorn worker starts its own writer
        self._pruned_day: date | None = None
        self._failing = False  # logged once until a write succeeds again
        self._closed = False  # the gateway shut down: a record still coming is dropped, counted

    @classmethod
    def of(cls, config: Config, shared: SharedState, metrics: GatewayMetrics) -> UsageLog:
        return cls(shared, metrics, retention_days=config.gateway.usage_retention_days)

    # ------------------------------------------------------------------------------------------- recording

    def record(self, key: ApiKey | None, model: str, endpoint: str, prompt_tokens: int,
               completion_tokens: int) -> None:
        """Count one finished request (called where it ends; returns at once)."""
        group = (key.group or "") if key is not None else ""
        self.metrics.group_prompt_tokens.labels(model, group).inc(prompt_tokens)
        self.metrics.group_generation_tokens.labels(model, group).inc(completion_tokens)
        entry = UsageRecord(utc_day(self.clock()).isoformat(), key.name if key is not None else "", group, model,
                            endpoint, prompt_tokens, completion_tokens)
        with self._settled:  # one writer per process, however many request threads end at once
            if self._closed:  # a request that ended after the shutdown's close: no writer takes it any more
                self.metrics.usage_records_dropped.inc()
                return
            self._start_writer()
            try:
                self._queue.put_nowait(entry)
            except queue.Full:
                self.metrics.usage_records_dropped.inc()
                return
            self._pending += 1

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until this process's records are written (a report reads its own requests); False on timeout."""
        with self._settled:
            return self._settled.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued, then end the writer (gateway shutdown); records after it are dropped, counted."""
        with self._settled:
            self._closed = True
        if self._writer_pid != os.getpid():
            return
        quiet_s = min(timeout_s, QUIET_CLOSE_S)
        settled = self.flush(quiet_s)
        if not settled and timeout_s > quiet_s:  # the shutdown waits on the database: say why
            log.warning("gateway shutdown: waiting up to %.0f s for the limits database to take %d usage records",
                        timeout_s - quiet_s, self._pending)
            settled = self.flush(timeout_s - quiet_s)
        self._writer_pid = None
        if settled:
            self._queue.put_nowait(None)  # the writer's end (the queue was just emptied)
        else:  # the database stalls the writer, a daemon thread: it ends with the process
            log.warning("gateway shutdown: %d usage records not written after %.0f s (the limits database is slow "
                        "or away); they are lost", self._pending, timeout_s)

    def _start_writer(self) -> None:
        pid = os.getpid()
        if self._writer_pid == pid:
            return
        self._writer_pid = pid
        threading.Thread(target=self._write_loop, name="usage-writer", daemon=True).start()

    def _write_loop(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:  # close()
                return
            try:
                self.write(entry)
            except Exception as exc:  # the database refuses or is away: this record is lost, counted
                self.metrics.usage_records_dropped.inc()
                if not self._failing:
                    self._failing = True
                    log.warning("usage accounting: could not write to the limits database (%s); records are "
                                "dropped until it works again (hpcllm_usage_records_dropped)", exc)
            else:
                if self._failing:
                    self._failing = False
                    log.info("usage accounting: writing to the limits database again")
            with self._settled:
                self._pending -= 1
                self._settled.notify_all()

    def write(self, entry: UsageRecord) -> None:
        """One UPSERT; the first write of a UTC day also deletes the rows older than the retention. Tried once more
        where that is safe (SharedState.write_once_more: a PostgreSQL restart; never after a COMMIT PostgreSQL may
        have made, which would count the tokens twice)."""
        today = utc_day(self.clock())

        def upsert(db) -> None:
            db.conn.execute(UPSERT, (entry.day, entry.key_name, entry.group, entry.model, entry.endpoint,
                                     entry.prompt_tokens, entry.completion_tokens))
            if self._pruned_day != today:
                oldest_kept = today - timedelta(days=self.retention_days - 1)
                db.conn.execute("DELETE FROM gateway_usage WHERE day < ?", (oldest_kept.isoformat(),))

        self.shared.write_once_more(upsert)
        self._pruned_day = today

    # ------------------------------------------------------------------------------------------- reports

    def report(self, args: dict[str, str]) -> dict[str, Any]:
        """GET /v1/admin/usage's answer for its query (a 400 naming the parameter that is wrong)."""
        unknown = sorted(set(args) - {"since", "until", "group", "key", "model", "by"})
        if unknown:
            raise InvalidRequest(f"unknown query parameter {unknown[0]!r} (since, until, group, key, model, by)",
                                 param=unknown[0])
        today = utc_day(self.clock())
        until = parse_day(args["until"], "until", today) if args.get("until") else today
        since = (parse_day(args["since"], "since", today) if args.get("since")
                 else today - timedelta(days=DEFAULT_REPORT_DAYS - 1))
        if since > until:
            raise InvalidRequest(f"since ({since}) is after until ({until})", param="since")
        by = args.get("by", "key")
        if by not in GROUP_BY:
            raise InvalidRequest(f"by must be one of {', '.join(GROUP_BY)}, not {by!r}", param="by")
        where, params = ["day >= ?", "day <= ?"], [since.isoformat(), until.isoformat()]
        for param, column in (("group", "key_group"), ("key", "key_name"), ("model", "model")):
            if param in args:
                where.append(f"{column} = ?")
                params.append(args[param])
        column = GROUP_BY[by]
        self.flush()
        with self.shared.connection() as db:
            rows = db.conn.execute(
                f"SELECT {column} AS name, SUM(requests) AS requests, SUM(prompt_tokens) AS prompt_tokens, "
                f"SUM(completion_tokens) AS completion_tokens FROM gateway_usage WHERE {' AND '.join(where)} "
                f"GROUP BY {column} ORDER BY {column}", tuple(params)).fetchall()
        data = [{by: row["name"] or None, **_totals(row)} for row in rows]
        total = {name: sum(item[name] for item in data) for name in ("requests", "prompt_tokens",
                                                                     "completion_tokens", "total_tokens")}
        return {"object": "usage", "since": since.isoformat(), "until": until.isoformat(), "by": by, "data": data,
                "total": total}


def _totals(row) -> dict[str, int]:
    prompt, completion = int(row["prompt_tokens"]), int(row["completion_tokens"])
    return {"requests": int(row["requests"]), "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def parse_day(value: str, param: str, today: date) -> date:
    """YYYY-MM-DD, or Nd: the last N days, today included (30d: since 29 days ago)."""
    relative = RELATIVE_DAYS.fullmatch(value)
    if relative and int(relative.group(1)) >= 1:
        return today - timedelta(days=int(relative.group(1)) - 1)
    try:
        return date.fromisoformat(value) if len(value) == 10 else _not_a_day(value, param)
    except ValueError:
        return _not_a_day(value, param)


def _not_a_day(value: str, param: str) -> date:
    raise InvalidRequest(f"{param} must be a UTC day YYYY-MM-DD or a number of days like 30d, not {value!r}",
                         param=param)
