"""A batched job status watcher and a Job handle (after submitit's core).

Many callers ask about many jobs; Slurm is asked once per poll for all of them (`backend.statuses(ids)` is one
squeue / REST call). Polls back off while nothing changes: 0, 2, 4, 8, ... seconds up to `max_interval`
(60 s by default), and start again from the minimum when a job is added or changes state, so a fresh job is seen
quickly and a quiet cluster is not hammered. Thread-safe: the controller's threads share one watcher.

    watcher = StatusWatcher(backend)
    job = watcher.submit(spec)        # or watcher.job(existing_id)
    job.state()                       # cached state, refreshed by at most one squeue per interval
    job.wait(timeout=30)              # blocks until a terminal state, raises TimeoutError otherwise
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from hpcllm.slurm.base import JobSpec, JobState, JobStatus, SlurmBackend
from hpcllm.slurm.errors import SlurmError, SlurmUnavailable

if TYPE_CHECKING:
    from hpcllm.config import SlurmConfig

log = logging.getLogger(__name__)


class StatusWatcher:
    def __init__(self, backend: SlurmBackend, *, min_interval: float = 2.0, max_interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        if min_interval <= 0 or max_interval < min_interval:
            raise ValueError("need 0 < min_interval <= max_interval")
        self.backend = backend
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._clock = clock
        self._lock = threading.RLock()
        # Serializes polls so concurrent callers share one Slurm call instead of each making one.
        self._poll_lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._watched: set[str] = set()
        self._statuses: dict[str, JobStatus] = {}
        # Jobs forgotten since the poll in flight (if any) took its list: its answers for them predate the forget
        # (a requeue's), so they are dropped, not written back. Polls are serialized, so the next one clears it.
        self._forgotten_since_poll: set[str] = set()
        self._interval = 0.0  # the first poll after a change happens at once
        self._last_poll: float | None = None
        self.poll_count = 0

    @classmethod
    def from_config(cls, backend: SlurmBackend, config: SlurmConfig) -> StatusWatcher:
        """A watcher polling with [slurm] status_poll_min_seconds / status_poll_max_seconds."""
        return cls(backend, min_interval=config.status_poll_min_seconds,
                   max_interval=max(config.status_poll_max_seconds, config.status_poll_min_seconds))

    # ---------------------------------------------------------------------------------------------- watching

    def submit(self, spec: JobSpec) -> Job:
        job_id = self.backend.submit(spec)
        return self.job(job_id)

    def job(self, job_id: str) -> Job:
        """A handle on a job (submitted by us or not); the watcher starts following it."""
        self.watch(job_id)
        return Job(self, str(job_id))

    def watch(self, *job_ids: str) -> None:
        with self._lock:
            new = {str(j) for j in job_ids} - self._watched
            if new:
                self._watched |= new
                self._interval = 0.0

    def forget(self, *job_ids: str) -> None:
        with self._lock:
            for job_id in job_ids:
                self._watched.discard(str(job_id))
                self._statuses.pop(str(job_id), None)
                self._forgotten_since_poll.add(str(job_id))

    def expedite(self) -> None:
        """Make the next poll due now (after an action whose effect callers will look for)."""
        with self._lock:
            self._interval = 0.0

    def watched(self) -> list[str]:
        with self._lock:
            return sorted(self._watched)

    # ----------------------------------------------------------------------------------------------- polling

    def next_poll_in(self) -> float:
        """Seconds until the next poll is due (0 when due now)."""
        with self._lock:
            if self._last_poll is None:
                return 0.0
            return max(0.0, self._last_poll + self._interval - self._clock())

    def poll(self, force: bool = False) -> dict[str, JobStatus]:
        """Ask Slurm about every watched, unfinished job in one call if a poll is due (or forced); returns the
        known statuses of all watched jobs."""
        with self._poll_lock:
            with self._lock:
                due = force or self.next_poll_in() == 0.0
                pending = sorted(j for j in self._watched
                                 if j not in self._statuses or not self._statuses[j].is_terminal)
                self._forgotten_since_poll.clear()
            if due and pending:
                try:
                    fresh = self.backend.statuses(pending)  # outside self._lock: readers keep the cached view
                except SlurmUnavailable:
                    with self._lock:  # the next try waits its turn: a down slurmctld is not asked in a tight loop
                        self._last_poll = self._clock()
                        self._interval = self._backed_off()
                    raise
                with self._lock:
                    self.poll_count += 1
                    fresh = {j: s for j, s in fresh.items()
                             if j in self._watched and j not in self._forgotten_since_poll}
                    changed = any(self._statuses.get(j) is None or self._statuses[j].state != s.state
                                  or self._statuses[j].restart_count != s.restart_count for j, s in fresh.items())
                    self._statuses.update(fresh)
                    self._last_poll = self._clock()
                    self._interval = self.min_interval if changed else self._backed_off()
                    if self._forgotten_since_poll & self._watched:  # requeued meanwhile: its new state at once
                        self._interval = 0.0
                    self._changed.notify_all()
            elif due:
                with self._lock:
                    self._last_poll = self._clock()
        with self._lock:
            return {j: self._statuses[j] for j in self._watched if j in self._statuses}

    def _backed_off(self) -> float:
        """The interval after a poll that saw no change (or could not ask): doubled, within the bounds."""
        return min(max(self._interval * 2, self.min_interval), self.max_interval)

    def status(self, job_id: str) -> JobStatus:
        """The job's status, polling first if a poll is due."""
        job_id = str(job_id)
        self.watch(job_id)
        statuses = self.poll()
        if job_id not in statuses:
            statuses = self.poll(force=True)
        return statuses[job_id]

    def wait(self, job_ids: list[str], timeout: float | None = None,
             until: Callable[[JobStatus], bool] = lambda s: s.is_terminal) -> dict[str, JobStatus]:
        """Poll (with back-off) until `until` holds for every job; TimeoutError after `timeout` seconds. While
        Slurm cannot be asked (SlurmUnavailable) it waits on, polling with back-off, as the jobs still run."""
        ids = [str(j) for j in job_ids]
        self.watch(*ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        unavailable: SlurmUnavailable | None = None
        while True:
            try:
                statuses = self.poll()
                unavailable = None
            except SlurmUnavailable as exc:  # a squeue timeout, slurmctld restarting: the jobs are not gone
                if unavailable is None:
                    log.warning("cannot ask Slurm about jobs %s (%s); waiting on", ", ".join(ids), exc)
                unavailable = exc
                with self._lock:
                    statuses = dict(self._statuses)
            if all(j in statuses and until(statuses[j]) for j in ids):
                return {j: statuses[j] for j in ids}
            sleep_for = max(self.next_poll_in(), 0.05)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    states = ", ".join(f"{j}: {_state_text(statuses.get(j))}" for j in ids)
                    still = f"; Slurm could not be asked: {unavailable}" if unavailable else ""
                    raise TimeoutError(f"jobs not done after {timeout:.0f} s ({states}){still}")
                sleep_for = min(sleep_for, remaining)
            time.sleep(sleep_for)


def _state_text(status: JobStatus | None) -> str:
    """A job's state for a message, with Slurm's reason (why a queued job has not started: Resources, JobHeldAdmin,
    launch failed requeued held, ...)."""
    if status is None:
        return "?"
    return f"{status.state.value} ({status.reason})" if status.reason else status.state.value


class Job:
    """A handle on one Slurm job, backed by a shared StatusWatcher (like submitit's Job)."""

    def __init__(self, watcher: StatusWatcher, job_id: str):
        self.watcher = watcher
        self.job_id = str(job_id)

    def __repr__(self) -> str:
        return f"Job({self.job_id})"

    def status(self) -> JobStatus:
        return self.watcher.status(self.job_id)

    def state(self) -> JobState:
        return self.status().state

    def done(self) -> bool:
        return self.status().is_terminal

    def cancel(self, check: bool = True) -> None:
        try:
            self.watcher.backend.cancel(self.job_id)
        except SlurmError:
            if check:
                raise
            log.warning("cancelling job %s failed", self.job_id, exc_info=True)
        self.watcher.watch(self.job_id)
        self.watcher.expedite()  # see the cancellation soon

    def requeue(self) -> None:
        self.watcher.backend.requeue(self.job_id)
        # Its new state and restart count on the next look, not the cached run; a finished job Slurm requeues
        # (scontrol requeue takes those too) is no longer done, so its cached end must go as well.
        self.watcher.forget(self.job_id)
        self.watcher.watch(self.job_id)

    def signal(self, sig: str, batch_only: bool = True) -> None:
        self.watcher.backend.signal(self.job_id, sig, batch_only=batch_only)
        self.watcher.expedite()  # a drain or a kill changes its state soon

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Block until the job reaches a terminal state; TimeoutError after `timeout` seconds."""
        return self.watcher.wait([self.job_id], timeout=timeout)[self.job_id]

    def wait_until(self, until: Callable[[JobStatus], bool], timeout: float | None = None) -> JobStatus:
        return self.watcher.wait([self.job_id], timeout=timeout, until=until)[self.job_id]
