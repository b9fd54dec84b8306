"""Running batches: every gateway process polls for an active batch nobody holds, claims it (a lease in the limits
database, hpcllm.gateway.batches.store) and runs its requests, each through the gateway's own WSGI app as the HTTP
request it stands for: the same authentication with the batch owner's key (its rate limits and group), validation,
routing, context length and usage accounting as the endpoint's.

Batch requests run at gateway.batch_priority (lower is sooner, interactive requests have 0): a worker serves waiting
interactive requests first, so a batch fills idle capacity without making interactive users wait behind it.

A process runs gateway.batch_concurrency requests at once in all: while a slot is free that its batches cannot use
(Slots), it claims another batch, each in a thread of its own with its own lease, turn, cancel and end.

Each result is appended to the output (2xx) or error file as it comes while the lease is held (as this process last
renewed it: LocalLease, no database query per result); the lease is renewed with the counts and tokens every third of
it, and at once for a cancel made on this process. A process that takes a batch over (the holder's lease ran out)
skips the requests already in the files. Cancelling stops starting requests, lets those running finish, and
publishes what finished; past the completion window the requests not run go to the error file as batch_expired.
A draining gateway stops starting requests and hands each of its batches back (the lease released) for another
process.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flask import Flask
from werkzeug.test import EnvironBuilder, run_wsgi_app

from hpcllm.controller.errors import DatabaseError
from hpcllm.gateway.batches.input_file import BatchEntry, parse_input
from hpcllm.gateway.batches.protocol import (BatchErrors, BatchObject, BatchUsage, LineError, RequestCounts,
                                             ResultError, ResultLine, ResultResponse)
from hpcllm.gateway.batches.results import ResultFile
from hpcllm.gateway.batches.store import BatchStore, Claim
from hpcllm.gateway.errors import ServiceUnavailable
from hpcllm.gateway.files.protocol import OUTPUT_PURPOSE
from hpcllm.gateway.files.store import FileStore, StoredFile
from hpcllm.gateway.protocol import unsupported
from hpcllm.gateway.response_store import owner_of
from hpcllm.gateway.runtime import Gateway
from hpcllm.gateway.usage import BATCH_ENVIRON

log = logging.getLogger(__name__)

# A process looks for a batch to run at least this often (and at once when one is created on it).
MAX_POLL_S = 10.0
# A process deletes the expired files (hpcllm.gateway.files.store) at most this often: they are invisible at once,
# this is when their disk space comes back.
SWEEP_S = 600.0
# 503s (a cold start past its wait, no capacity) a request is retried through before its error is the result;
# 429s with a Retry-After (the owner's rate limits) are waited out for as long as the batch runs.
RETRIES_503 = 5
DEFAULT_RETRY_S = 2.0
# A gateway going away answers these: the request is not the batch's failure, another process runs it again.
SHUTDOWN_CODES = ("draining", "gateway_shutdown")
# Of a close's budget (half of a shorter one), what is kept for handing the batches back: the requests still running
# after the rest are cancelled, so that no batch stays held by a process that exits, a lease's length, for nothing.
HAND_BACK_S = 2.0
# Runs of one batch that may fail in a row in a process (a bug, a bad file on disk: not the database being away)
# before the batch fails naming why, instead of being claimed again every poll ahead of every younger batch.
MAX_RUN_FAILURES = 3


def result_file_ids(batch_id: str) -> tuple[str, str]:
    """The output and error files' ids, fixed by the batch's id (a process taking over writes the same files)."""
    tag = batch_id.removeprefix("batch_")
    return f"file-{tag}-output", f"file-{tag}-errors"


def partial_path(files: FileStore, file_id: str) -> Path:
    """Where a batch's output or error file is written until the batch ends (a hidden name: never a file's bytes)."""
    return files.directory / f".{file_id}.partial"


class BatchRunner:
    """This process's runner thread: it claims a batch while a request slot is free that the batches it runs do not
    use (Slots), and runs each claimed batch in a thread of its own, gateway.batch_concurrency requests of them all
    at once."""

    def __init__(self, app: Flask, gw: Gateway, files: FileStore, batches: BatchStore):
        self.app, self.gw, self.files, self.batches = app, gw, files, batches
        self.concurrency = gw.config.gateway.batch_concurrency
        self.poll_s = min(MAX_POLL_S, batches.lease_s / 3)
        self.slots = Slots(self.concurrency, freed=self.look)
        self._look = threading.Event()  # look for a batch to claim now
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._runs: dict[str, BatchRun] = {}  # batch id: its run in this process
        self._threads: list[threading.Thread] = []
        self._failures: dict[str, int] = {}  # batch id: its runs that failed in a row (MAX_RUN_FAILURES)
        self._next_sweep = 0.0  # time.monotonic() of the next sweep of expired files
        self._sweeping = threading.Lock()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="batch-runner", daemon=True)
        self._thread.start()

    @property
    def holder(self) -> str:
        """This process's name on the leases it holds: the one its stream slots have (host/pid/tag)."""
        return self.gw.shared.holder

    @property
    def running(self) -> dict[str, Claim]:
        """The batches this process runs now, by id."""
        return {batch_id: run.claim for batch_id, run in list(self._runs.items())}

    def wake(self, batch_id: str | None = None) -> None:
        """Have the run of that batch (all, for None) renew at once, which tells it of a cancel made here, and look
        for a batch now (a cancelled one nobody runs is ended as cancelled)."""
        runs = list(self._runs.values()) if batch_id is None else [self._runs.get(batch_id)]
        for run in runs:
            if run is not None:
                run.wake()
        self.look()

    def look(self) -> None:
        """Look for a batch to claim now (a slot was freed, a run started or ended)."""
        self._look.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set() or self.gw.draining

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop claiming and starting requests, and hand the batches running here back within timeout_s: their
        running requests finish and are kept while the budget allows (all of it but HAND_BACK_S); those still running
        then are cancelled, not recorded (the process that takes the batch over runs them again), and the runs
        release their batches; the batch of a run still busy half of HAND_BACK_S later (a request whose route's poll
        of the controller is in flight) is released from here."""
        self._stop.set()
        self.wake()
        deadline = time.monotonic() + timeout_s
        cancel_at = deadline - min(HAND_BACK_S, timeout_s / 2)
        self._join(self._thread, cancel_at)  # first: a claim it has in progress starts a run's thread
        if not self._join_runs(cancel_at):
            cancelled = self.gw.stop_batch_generations("the gateway process is closing")
            log.warning("batch runner: closing: batch runs still busy near the close's end; cancelled the %d batch "
                        "requests they were generating (not recorded: the process that takes a batch over runs them "
                        "again)", cancelled)
            # A request waiting for its route ends only when its poll of the controller returns (up to
            # route_poll_seconds): its run would hold the batch past the process's exit, a lease's length. What is
            # left of it is not recorded anyway: its batch goes back now, and the run writes nothing after that.
            if not self._join_runs(deadline - (deadline - cancel_at) / 2):
                for run in list(self._runs.values()):
                    run.lease.give_up()

    def _join_runs(self, deadline: float) -> bool:
        """Wait until deadline for the batch runs' threads to end; whether they all have."""
        for thread in list(self._threads):
            self._join(thread, deadline)
        return not any(thread.is_alive() for thread in self._threads if thread is not threading.current_thread())

    @staticmethod
    def _join(thread: threading.Thread | None, deadline: float) -> None:
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))

    def _loop(self) -> None:
        while not self.stopping:
            self._look.clear()  # cleared before looking: a look asked for meanwhile is the next one
            try:
                self.sweep_when_due()
                if self._has_room() and self.batches.claimable():
                    self._claim()
            except Exception:  # the database is away, or a bug: looked for again at the next poll
                log.exception("batch runner: claiming a batch failed")
            self._look.wait(self.poll_s)

    def _has_room(self) -> bool:
        """A slot is free that the batches running here do not use, and each has started its requests (a batch just
        claimed takes the free slots it can use first)."""
        runs = list(self._runs.values())
        return (len(runs) < self.concurrency and all(run.started.is_set() for run in runs)
                and self.slots.free() > 0)

    def full(self) -> bool:
        """Whether the process runs as many batches as gateway.batch_concurrency allows (a batch waiting for one is
        not claimed here until a run ends or hands its batch back)."""
        return len(self._runs) >= self.concurrency

    def _claim(self) -> None:
        """Claim the batch that waited longest and start running it in the free slot held for it meanwhile."""
        ticket = object()
        if not self.slots.reserve(ticket):
            return
        try:
            claim = self.batches.claim(self.holder)
        except Exception:
            self.slots.unreserve(ticket)
            raise
        if claim is None or claim.batch_id in self._runs:  # another process took it, or a run of it here lost the
            self.slots.unreserve(ticket)  # lease and is still ending: handed back, claimed once that run has ended
            if claim is not None:  # (two runs of one batch in one process would write its files at once)
                self._release_quietly(claim)
            return
        run: BatchRun | None = None
        try:
            run = BatchRun(self, claim)
            self.slots.transfer(ticket, run)
            self._runs[claim.batch_id] = run
            thread = threading.Thread(target=self._run, args=(run,), name=f"batch-{claim.batch_id[-6:]}",
                                      daemon=True)
            thread.start()
        except Exception:
            self._unclaim(ticket, run, claim)
            raise
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _unclaim(self, ticket: object, run: BatchRun | None, claim: Claim) -> None:
        """A claimed batch's run could not start: its slot and the batch go back (a run listed that never starts
        would keep the runner from claiming any other batch)."""
        self.slots.unreserve(ticket)
        if run is not None:
            self.slots.leave(run)
            if self._runs.get(claim.batch_id) is run:
                del self._runs[claim.batch_id]
        self._release_quietly(claim)

    def _run(self, run: BatchRun) -> None:
        """Run a claimed batch; a run that fails (the database is away, or a bug) releases the batch to be tried
        again."""
        claim = run.claim
        try:
            run.run()
            self._failures.pop(claim.batch_id, None)
        except Exception as exc:
            log.exception("batch runner: running batch %s failed", claim.batch_id)
            self._after_failure(claim, exc)
        finally:
            self.slots.leave(run)
            run.started.set()
            if self._runs.get(claim.batch_id) is run:
                del self._runs[claim.batch_id]
            # Looked again once the run is gone from the list (the look its slots' leaving asked for may have found
            # it there); a failed run's batch, released, waits behind those that waited meanwhile.
            self.look()

    def sweep_when_due(self) -> None:
        """Sweep the expired files if SWEEP_S have passed (between batches, and while they run for hours; one
        thread sweeps, the others go on)."""
        if time.monotonic() < self._next_sweep or not self._sweeping.acquire(blocking=False):
            return
        try:
            if time.monotonic() < self._next_sweep:  # another thread swept between the check and the lock
                return
            self._next_sweep = time.monotonic() + SWEEP_S
            self.sweep()
        except Exception as exc:  # the database is away: the next sweep deletes them
            log.warning("files: could not delete the expired files: %s", exc)
        finally:
            self._sweeping.release()

    def sweep(self) -> int:
        """Delete the expired files but the inputs of batches not yet ended, and the ended batches whose files
        expired; how many files went."""
        gone = self.files.sweep()
        if gone:
            log.info("files: deleted %d expired files", gone)
        ended = self.batches.sweep(self.files.clock())
        if ended:
            log.info("batches: deleted %d ended batches whose files expired", ended)
        return gone

    def _after_failure(self, claim: Claim, exc: Exception) -> None:
        """Release the batch to be tried again, or fail it once its runs failed MAX_RUN_FAILURES times in a row for
        another reason than the database."""
        failures = self._failures.get(claim.batch_id, 0) + (not _database_error(exc))
        if failures < MAX_RUN_FAILURES:
            self._failures[claim.batch_id] = failures
            self._release_quietly(claim)
            return
        self._failures.pop(claim.batch_id, None)
        try:
            BatchRun(self, claim).fail("batch_run_failed", f"Running the batch failed {failures} times in a row: "
                                                           f"{type(exc).__name__}: {str(exc)[:400]}")
        except Exception as again:  # the database went away meanwhile: tried again
            log.warning("batch runner: could not fail batch %s: %s", claim.batch_id, again)
            self._release_quietly(claim)

    def _release_quietly(self, claim: Claim) -> None:
        try:
            self.batches.release(claim)
        except Exception as exc:  # its lease runs out instead
            log.warning("batch runner: could not release batch %s: %s", claim.batch_id, exc)

    def api_token(self, owner: str) -> str | None:
        """The API key the batch's owner digest names (None on an open gateway, or when the key was removed: its
        requests are then refused as any request without a key)."""
        for token, key in self.gw.api_keys.items():
            if owner_of(key) == owner:
                return token
        return None

    def call(self, url: str, body: dict, token: str | None, request_id: str) -> tuple[int, dict, dict]:
        """POST the request through the gateway's own app: its status, headers and JSON body."""
        headers = {"X-Request-Id": request_id}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        environ = EnvironBuilder(path=url, method="POST", json=body, headers=headers,
                                 environ_base={BATCH_ENVIRON: True}).get_environ()  # usage as batch:<endpoint>
        chunks, status, response_headers = run_wsgi_app(self.app, environ, buffered=True)
        raw = b"".join(chunks)
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {"error": {"message": raw.decode(errors="replace")[:1000], "type": "internal_error",
                                "param": None, "code": "internal_error"}}
        return int(status.split()[0]), dict(response_headers), answer


class Slots:
    """The process's gateway.batch_concurrency request slots, shared by the batches it runs. A run keeps a slot it
    used while it has requests to start, unless a run waiting in line holds at least two fewer (the slot is then
    handed to it: a batch of many requests does not keep its slots from one that joined beside it); a slot nobody
    wants (a batch's last requests, a small batch, one waiting out its key's rate limit) is free, and the runner
    claims another batch for it (BatchRunner.look)."""

    def __init__(self, count: int, freed: Callable[[], None]):
        self._lock = threading.Lock()
        self._free = count
        self._held: dict[BatchRun | object, int] = {}  # runs, and the tickets of batches being claimed
        self._waiting: list[BatchRun] = []  # runs that asked for a slot none had, in the order they asked
        self._freed = freed

    def take(self, run: BatchRun, in_use: int) -> bool:
        """Whether the run may start one more request now (it holds a spare slot no other run needs more, or one is
        free); if not, it waits in line and run.nudge is set when a slot is handed to it."""
        with self._lock:
            self._hand_over(run, in_use, keep=True)  # kept: frees none
            held = self._held.get(run, 0)
            if held > in_use:
                return True
            if self._free:
                self._free -= 1
                self._held[run] = held + 1
                return True
            if run not in self._waiting:
                self._waiting.append(run)
            return False

    def reserve(self, ticket: object) -> bool:
        """Hold a free slot for a batch about to be claimed (transfer, or unreserve when there is none after all), so
        that a running batch does not take it meanwhile; False when none is free."""
        with self._lock:
            if not self._free:
                return False
            self._free -= 1
            self._held[ticket] = 1
            return True

    def transfer(self, ticket: object, run: BatchRun) -> None:
        with self._lock:
            self._held[run] = self._held.get(run, 0) + self._held.pop(ticket, 0)

    def unreserve(self, ticket: object) -> None:
        """The reserved slot goes back (to a run waiting, else free), not asking the runner to look again."""
        with self._lock:
            self._hand_over(ticket, 0, keep=False)

    def spare(self, run: BatchRun, in_use: int, keep: bool) -> None:
        """Give back the run's slots beyond the in_use ones (keep: it would start its next requests in them)."""
        with self._lock:
            if not keep and run in self._waiting:
                self._waiting.remove(run)
            freed = self._hand_over(run, in_use, keep)
        if freed:
            self._freed()

    def _hand_over(self, run: BatchRun, in_use: int, keep: bool) -> bool:
        """Hand the run's slots beyond in_use to the runs that need them more (_taker), under the lock; whether one
        was freed."""
        freed = False
        while self._held.get(run, 0) > in_use:
            taker = self._taker(run, keep)
            if taker is None:
                break
            self._held[run] -= 1
            if taker is run:  # nobody wants it
                self._free += 1
                freed = True
            else:
                self._waiting.remove(taker)
                self._held[taker] = self._held.get(taker, 0) + 1
                taker.nudge.set()
        if not self._held.get(run):
            self._held.pop(run, None)
        return freed

    def _taker(self, giver: BatchRun, keep: bool) -> BatchRun | None:
        """Who gets a slot the giver does not use now: the waiting run that holds fewest (the first to ask among
        equals), if the giver does not keep it or that run holds two fewer; the giver itself when nobody else wants
        it and it does not keep it; None when it keeps it."""
        held = self._held.get(giver, 0)
        others = [run for run in self._waiting if run is not giver]
        neediest = min(others, key=lambda run: self._held.get(run, 0), default=None)
        if neediest is not None and (not keep or self._held.get(neediest, 0) + 1 < held):
            return neediest
        return None if keep else giver

    def leave(self, run: BatchRun) -> None:
        """The run has ended: its slots go to the runs waiting, or are free."""
        self.spare(run, 0, keep=False)

    def free(self) -> int:
        with self._lock:
            return self._free


@dataclass(frozen=True)
class RateLimited:
    """A request the batch owner's rate limits refused (a 429 with Retry-After): the batch starts no request for
    this long, then runs it again."""

    retry_after_s: float


class LocalLease:
    """The lease as this process last renewed it, so that a result is written without asking the database: renewed
    every third of the lease, and taken as held until a third of it before it runs out (the margin that keeps the
    clocks of several hosts apart and a write in progress within the lease). A process whose renewals fail (the
    database away, the process stopped) thus stops writing before another process can claim the batch."""

    def __init__(self, batches: BatchStore, claim: Claim):
        self.batches, self.claim = batches, claim
        self.valid_until = self.due_at = 0.0  # in batches.clock()'s time (the database lease's)
        self._given_up = False  # give_up(): the batch was released from another thread
        self._lock = threading.Lock()  # a renewal or a result's write, or give_up: one at a time

    def renew(self, **changes) -> BatchObject | None:
        """BatchStore.renew: the batch, None when the lease was lost (from then on never valid)."""
        with self._lock:
            started = self.batches.clock()
            batch = None if self._given_up else self.batches.renew(self.claim, **changes)
            third = self.batches.lease_s / 3
            self.valid_until, self.due_at = 0.0 if batch is None else started + 2 * third, started + third
            return batch

    def valid(self) -> bool:
        return self.batches.clock() < self.valid_until

    @contextmanager
    def writing(self) -> Iterator[bool]:
        """Whether a result may be written (not given up), give_up waiting until it is."""
        with self._lock:
            yield not self._given_up

    def give_up(self) -> None:
        """Release the batch now, from outside its run (the process's close ran out of time): from then on the run
        writes no result and its renewals find the lease lost."""
        with self._lock:
            self._given_up = True
            self.valid_until = 0.0
            try:
                self.batches.release(self.claim)
            except Exception as exc:  # its lease runs out instead
                log.warning("batch runner: could not release batch %s: %s", self.claim.batch_id, exc)

    def due(self) -> bool:
        return self.batches.clock() >= self.due_at

    def until_due(self) -> float:
        return max(0.0, self.due_at - self.batches.clock())


class BatchRun:
    """One claimed batch, run to its end (or until its lease is lost or the gateway drains)."""

    def __init__(self, runner: BatchRunner, claim: Claim):
        self.runner, self.claim = runner, claim
        self.batches = runner.batches
        self.lease = LocalLease(runner.batches, claim)
        self.halt = threading.Event()  # stop retrying: the batch stops (cancelled, expired, lost, released)
        self.turn_s = runner.gw.config.gateway.batch_turn_seconds
        self.turn_ends = time.monotonic() + self.turn_s
        self.slots = runner.slots
        self.nudge = threading.Event()  # look again now: a request ended, a slot was handed over, a wake
        self.started = threading.Event()  # it has taken the free slots it can use (the runner may claim another)
        self._woken = threading.Event()
        self.resume_at = 0.0  # time.monotonic() until which its key's rate limit holds its requests back
        self.model_label = ""  # its model as the metrics label (_model_label), found once per run

    def wake(self) -> None:
        """Renew at once (a cancel made on this process: the renewal reads it)."""
        self._woken.set()
        self.nudge.set()

    def woken(self) -> bool:
        """Whether wake() was called since last asked."""
        woken = self._woken.is_set()
        self._woken.clear()
        return woken

    def run(self) -> None:
        batch = self.lease.renew()
        if batch is None:
            return
        self.model_label = self._model_label(batch.model)
        files = self.runner.files
        lines = self._input_lines(batch)
        if lines is None:
            self._fail(batch, "input_file_missing", "The batch's input file was deleted before the batch ran")
            return
        # Checked against gateway.batch_max_requests when it was made: a limit the site lowered since must not cut
        # off the requests of a batch it accepted.
        entries = parse_input(lines, batch.endpoint, max_requests=batch.request_counts.total).entries
        out_id, err_id = result_file_ids(batch.id)
        output = ResultFile(partial_path(files, out_id), files.path(out_id))
        errors = ResultFile(partial_path(files, err_id), files.path(err_id))
        try:
            self._run(batch, entries, output, errors)
        finally:
            output.close()
            errors.close()

    def _input_lines(self, batch: BatchObject) -> Iterator[bytes] | None:
        """The input file's lines; None when it was deleted (its row, or its bytes since)."""
        files = self.runner.files
        if files.get(self.claim.owner, batch.input_file_id, expired_too=True) is None:
            return None
        try:
            return files.read_lines(batch.input_file_id)
        except FileNotFoundError:
            return None

    def _run(self, batch: BatchObject, entries: list[BatchEntry], output: ResultFile, errors: ResultFile) -> None:
        done = output.custom_ids | errors.custom_ids
        pending = deque(entry for entry in entries if entry.custom_id not in done)
        if done:
            log.info("batch %s: continuing after %d of %d requests", batch.id, len(done), len(entries))
        stop = self._stop_reason(batch)  # cancelled or expired before any process ran it

        def progress() -> dict:
            return self._progress(entries, output, errors)

        while stop is None:
            batch, stop = self._run_requests(batch, pending, progress, output, errors)
            if stop == "turn_over":
                batch, stop = self._after_turn(batch, pending, progress())
            if not pending:
                break
        if stop in ("release", "turn_over", "lost"):
            if stop != "lost":  # its counts as its files hold them (a drain's last results came after its renewal)
                self.batches.release(self.claim, not_before=self._limit_ends(), **progress())
            return
        if stop == "expired":
            for entry in pending:
                self._write(batch, ResultLine(id=new_request_id(), custom_id=entry.custom_id, error=ResultError(
                    code="batch_expired",
                    message="This request could not be executed before the completion window expired.")),
                    output, errors)
        self._finalize(batch, entries, output, errors, expired=stop == "expired")

    def _run_requests(self, batch: BatchObject, pending: deque[BatchEntry], progress: Callable[[], dict],
                      output: ResultFile, errors: ResultFile) -> tuple[BatchObject, str | None]:
        """Run the pending requests as the process's slots allow (Slots), each result written as it comes while the
        lease is held, until none is left or a reason to stop (then those running finish first); the batch as it is
        then, and that reason: cancelled, expired, release (the gateway drains), turn_over (another batch's turn),
        lost (the lease), None (all ran)."""
        token = self.runner.api_token(self.claim.owner)
        self.halt.clear()  # a new turn of this run
        # The slots go back (to the other batches, or for a claim) only once the pool's exit has waited for the
        # requests running: a loop that raises (a renewal or a result's write failing) must not let other batches
        # start theirs beside them, past gateway.batch_concurrency.
        try:
            with ThreadPoolExecutor(self.runner.concurrency, thread_name_prefix=f"batch-{batch.id[-6:]}") as pool:
                try:
                    return self._serve(pool, batch, token, pending, progress, output, errors)
                finally:
                    self.halt.set()  # before the pool's exit waits: requests waiting to retry give up
        finally:
            self.slots.spare(self, 0, keep=False)

    def _serve(self, pool: ThreadPoolExecutor, batch: BatchObject, token: str | None, pending: deque[BatchEntry],
               progress: Callable[[], dict], output: ResultFile, errors: ResultFile) -> tuple[BatchObject, str | None]:
        """_run_requests' loop: start requests as the slots allow, write the results, renew; until none is left to
        start or wait for, or a reason to stop and those running have ended."""
        inflight: dict[Future, BatchEntry] = {}
        stop: str | None = None
        while True:
            limited = False  # a request was refused by the key's rate limit: is another batch waiting for its turn?
            starting = stop is None and not self._rate_limited()
            if starting:
                self._start_requests(pool, batch, token, pending, inflight)
            # Slots it cannot use now go to the other batches (or let the runner claim one).
            self.slots.spare(self, len(inflight), keep=starting and bool(pending))
            if not self.started.is_set():  # it has taken the slots it can use: one left free may run another batch
                self.started.set()
                self.runner.look()
            if not ((pending and stop is None) or inflight):
                return batch, stop
            self.nudge.wait(self._until_next())
            self.nudge.clear()
            for future in [future for future in inflight if future.done()]:
                entry, result = inflight.pop(future), future.result()
                if not isinstance(result, ResultLine):  # not run to a result: run it again later
                    pending.appendleft(entry)
                    if isinstance(result, RateLimited):
                        self.resume_at = max(self.resume_at, time.monotonic() + result.retry_after_s)
                        limited = True
                    continue
                if not self.lease.valid():  # too long since the last renewal to write on it: renew first
                    batch, stop = self._renew(batch, stop, progress())
                if stop != "lost":  # else the process that takes the batch over runs it again
                    self._write(batch, result, output, errors)
            stop = stop or self._stop_reason(batch)
            if self.lease.due() or self.woken() or limited or stop is not None:
                batch, stop = self._renew(batch, stop, progress(), may_turn_over=bool(pending))
            if stop is not None:
                self.halt.set()  # requests waiting to retry give up; those running finish

    def _start_requests(self, pool: ThreadPoolExecutor, batch: BatchObject, token: str | None,
                        pending: deque[BatchEntry], inflight: dict[Future, BatchEntry]) -> None:
        """Start pending requests while the slots allow (one that has none waits in line for one: nudge)."""
        while pending and self.slots.take(self, len(inflight)):
            entry = pending.popleft()
            future = pool.submit(self._request, batch, entry, token)
            inflight[future] = entry
            future.add_done_callback(lambda _: self.nudge.set())

    def _rate_limited(self) -> bool:
        return time.monotonic() < self.resume_at

    def _limit_ends(self) -> float | None:
        """When its key's rate limit ends, in the database's time (None: not limited): a batch handed back while
        waiting it out is not claimed before (each claim would only be refused again, and hand it back)."""
        if not self._rate_limited():
            return None
        return self.batches.clock() + (self.resume_at - time.monotonic())

    def _until_next(self) -> float:
        """Seconds until the loop must look again unprompted: the lease's renewal, or the rate limit's end."""
        if self._rate_limited():
            return min(self.lease.until_due(), self.resume_at - time.monotonic())
        return self.lease.until_due()

    def _renew(self, batch: BatchObject, stop: str | None, progress: dict,
               may_turn_over: bool = False) -> tuple[BatchObject, str | None]:
        """Renew the lease with the progress: the batch as it is now (cancelled meanwhile?) and the reason to stop
        (may_turn_over: requests are left to start, so the turn may be over)."""
        renewed = self.lease.renew(**progress)
        if renewed is None:
            if stop != "lost":
                log.warning("batch %s: its lease was lost (another process may run it); stopping",
                            self.claim.batch_id)
            return batch, "lost"
        self.runner.sweep_when_due()
        return renewed, stop or self._stop_reason(renewed) or (self._turn_over() if may_turn_over else None)

    def _turn_over(self) -> str | None:
        """"turn_over" once the batch has run batch_turn_seconds, or waits out its key's rate limit in a process that
        runs all the batches it may, and another batch waits for a process (asked at a renewal: one read every third
        of the lease at most, and when a request is rate limited): its running requests finish, then _after_turn. A
        batch that waits holds no slot, but it counts among the batch_concurrency batches a process runs: with all
        taken, the process would idle till its turn's end; with one free, the runner claims the waiting batch beside
        it."""
        waits_in_full_process = self._rate_limited() and self.runner.full()
        if (time.monotonic() < self.turn_ends and not waits_in_full_process) or not self.batches.claimable():
            return None
        why = "it waits out its key's rate limit" if waits_in_full_process else "its turn is over"
        log.info("batch %s: %s, another batch waits; handing it over once its running requests end",
                 self.claim.batch_id, why)
        return "turn_over"

    def _after_turn(self, batch: BatchObject, pending: deque[BatchEntry],
                    progress: dict) -> tuple[BatchObject, str | None]:
        """The turn is over and the running requests have finished: a cancel or expiry since wins; the batch is
        handed back ("turn_over") only if requests are left and another batch still waits (an idle process may have
        claimed it meanwhile); else it runs on (None), in a new turn if its own has ended."""
        batch, stop = self._renew(batch, None, progress)
        if stop is not None:
            return batch, stop
        if pending and self.batches.claimable():
            log.info("batch %s: handed over; it goes on at its next turn", self.claim.batch_id)
            return batch, "turn_over"
        log.info("batch %s: no batch waits any more; it runs on", self.claim.batch_id)
        if time.monotonic() >= self.turn_ends:  # a hand-over mid-turn (its key's rate limit) keeps the turn's end
            self.turn_ends = time.monotonic() + self.turn_s
        return batch, None

    def _write(self, batch: BatchObject, result: ResultLine, output: ResultFile, errors: ResultFile) -> None:
        """Write a result while the batch was not given up (the process that takes it over writes it)."""
        with self.lease.writing() as held:
            if not held:
                return
            succeeded = _succeeded(result)
            (output if succeeded else errors).append(result)
            self.runner.gw.metrics.batch_requests.labels(self.model_label, "completed" if succeeded else "failed").inc()

    def _model_label(self, model: str | None) -> str:
        """The batch's model as its metrics label where this gateway serves it, else "": the name comes from the
        user's file (any string, any length), and an invented one must not become a series of its own."""
        if model is None:
            return ""
        try:
            cards = self.runner.gw.router.list_models()
        except ServiceUnavailable:  # no list yet (the controller away since the gateway started): not checkable
            return ""
        return model if any(card.name == model for card in cards) else ""

    def _stop_reason(self, batch: BatchObject) -> str | None:
        if self.runner.stopping:
            return "release"
        if batch.status == "cancelling":
            return "cancelled"
        if batch.expires_at is not None and time.time() >= batch.expires_at:
            return "expired"
        return None

    @staticmethod
    def _progress(entries: list[BatchEntry], output: ResultFile, errors: ResultFile) -> dict:
        """The batch's request_counts and usage from its files (what a process taking it over counts too)."""
        tokens_in, tokens_out = output.input_tokens + errors.input_tokens, output.output_tokens + errors.output_tokens
        return {"request_counts": RequestCounts(total=len(entries), completed=len(output.custom_ids),
                                                failed=len(errors.custom_ids)),
                "usage": BatchUsage(input_tokens=tokens_in, output_tokens=tokens_out,
                                    total_tokens=tokens_in + tokens_out)}

    def _request(self, batch: BatchObject, entry: BatchEntry, token: str | None) -> ResultLine | RateLimited | None:
        """One request's result line; None when the gateway is going away before it has one, RateLimited when the
        owner's rate limits refused it (its slot then serves other batches while this one waits)."""
        request_id = new_request_id()
        body = entry.body
        if body.get("stream"):  # as OpenAI: a batch answers whole responses
            body = unsupported("stream", "streaming in a batch request").body()
            return _result(entry, request_id, 400, request_id, body)
        retries_503 = 0
        request_body = self._prioritized(body)
        while True:
            status, headers, body = self.runner.call(batch.endpoint, request_body, token, request_id)
            code = (body.get("error") or {}).get("code") if isinstance(body, dict) else None
            if status == 503 and code in SHUTDOWN_CODES:
                return None
            retry_after = headers.get("Retry-After")
            if status == 429 and retry_after is not None:
                return RateLimited(float(retry_after))
            if status == 503 and retries_503 < RETRIES_503:  # no capacity: the other batches would find none either
                retries_503 += 1
                if self.halt.wait(float(retry_after or DEFAULT_RETRY_S)):
                    return None
                continue
            return _result(entry, request_id, status, headers.get("X-Request-Id", request_id), body)

    def _prioritized(self, body: dict) -> dict:
        """The request at gateway.batch_priority (a line's own larger priority kept): the worker admits interactive
        requests first and preempts a running batch request for one. A priority that is no integer is left to the
        endpoint's validation (its 400 names it). Embeddings, scores and classifications ignore it (pooling runs
        between generation steps)."""
        own = body.get("priority", 0)
        if not isinstance(own, int) or isinstance(own, bool):
            return body
        return {**body, "priority": max(own, self.runner.gw.config.gateway.batch_priority)}

    def _finalize(self, batch: BatchObject, entries: list[BatchEntry], output: ResultFile, errors: ResultFile,
                  expired: bool) -> None:
        now = int(time.time())
        batch = self.batches.renew(self.claim, **self._progress(entries, output, errors), status="finalizing",
                                   finalizing_at=batch.finalizing_at or now)
        if batch is None:
            return
        expires = self.batches.results_expire(now, self.claim.output_ttl)
        published, ids = self._published(batch, output, errors, now, expires)
        status = "cancelled" if batch.cancelling_at else "expired" if expired else "completed"
        final = batch.model_copy(update={"status": status, f"{status}_at": now, **ids})
        if not self._finish(final, published, expires):
            return
        log.info("batch %s %s: %d requests, %d completed, %d failed", batch.id, status, len(entries),
                 final.request_counts.completed, final.request_counts.failed)

    def fail(self, code: str, message: str) -> None:
        """End the batch as failed, with an error saying why (nothing when the lease was lost)."""
        batch = self.lease.renew()
        if batch is not None:
            self._fail(batch, code, message)

    def _fail(self, batch: BatchObject, code: str, message: str) -> None:
        """End the batch as failed, publishing the results its runs wrote (OpenAI's output_file_id and error_file_id
        are there in any status): what finished before it failed stays downloadable."""
        now = int(time.time())
        expires = self.batches.results_expire(now, self.claim.output_ttl)
        published, update = self._publish_results(batch, now, expires)
        failed = batch.model_copy(update={**update, "status": "failed", "failed_at": now, "errors": BatchErrors(
            data=[LineError(code=code, message=message)])})
        self._finish(failed, published, expires)

    def _finish(self, final: BatchObject, published: list[StoredFile], expires: float | None) -> bool:
        """Record the batch ended (BatchStore.finish) and count it; False, said in the log, when the lease was lost
        meanwhile (the process that took the batch over ends it)."""
        if not self.batches.finish(self.claim, final, published, expires):
            log.warning("batch %s: its lease was lost while finishing; the process that took it finishes it",
                        final.id)
            return False
        self.runner.gw.metrics.batches_finished.labels(final.status).inc()
        return True

    @staticmethod
    def _published(batch: BatchObject, output: ResultFile, errors: ResultFile, now: int,
                   expires: float | None) -> tuple[list[StoredFile], dict]:
        """The batch's result files published under their final names: the StoredFiles to record with it, and its
        output_file_id and error_file_id (a file with no line is none)."""
        published: list[StoredFile] = []
        ids = {}
        for name, results in (("output", output), ("error", errors)):
            size = results.publish()
            if size is not None:
                published.append(StoredFile(results.final.name, now, f"{batch.id}_{name}.jsonl", OUTPUT_PURPOSE,
                                            size, expires))
                ids[f"{name}_file_id"] = results.final.name
        return published, ids

    def _publish_results(self, batch: BatchObject, now: int, expires: float | None) -> tuple[list[StoredFile], dict]:
        """The failing batch's result files published (StoredFiles to record) and its fields from them (file ids,
        counts, usage). Files that cannot be read back (the failure may be theirs) are deleted instead: no run reads
        them again, and no sweep would ever see them."""
        files = self.runner.files
        opened: list[ResultFile] = []
        try:
            for file_id in result_file_ids(batch.id):
                opened.append(ResultFile(partial_path(files, file_id), files.path(file_id)))
            output, errors = opened
            update = self._progress([], output, errors)
            update["request_counts"] = update["request_counts"].model_copy(
                update={"total": batch.request_counts.total})
            published, ids = self._published(batch, output, errors, now, expires)
            update.update(ids)
        except (OSError, ValueError) as exc:  # ValueError: pydantic's, a line that is no result
            for results in opened:
                results.close()
            log.warning("batch %s: its results cannot be read back (%s); they are deleted with the failed batch",
                        batch.id, exc)
            for file_id in result_file_ids(batch.id):
                partial_path(files, file_id).unlink(missing_ok=True)
                files.path(file_id).unlink(missing_ok=True)
            return [], {}
        return published, update


def _database_error(exc: Exception) -> bool:
    """The limits database is away or busy (SQLite's error, PostgreSQL's as SharedState's 503)."""
    return isinstance(exc, (sqlite3.Error, DatabaseError, ServiceUnavailable))


def _succeeded(result: ResultLine) -> bool:
    return result.response is not None and 200 <= result.response.status_code < 300


def new_request_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def _result(entry: BatchEntry, line_id: str, status: int, request_id: str, body) -> ResultLine:
    return ResultLine(id=line_id, custom_id=entry.custom_id,
                      response=ResultResponse(status_code=status, request_id=request_id, body=body))
