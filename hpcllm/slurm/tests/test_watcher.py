"""StatusWatcher / Job against an in-memory backend: batching, back-off, thread safety, the Job handle."""

from __future__ import annotations

import threading
import time

import pytest

from hpcllm.slurm.base import JobSpec, JobState, JobStatus, NodeInfo, PartitionInfo, SlurmBackend, make_job_spec
from hpcllm.slurm.errors import SlurmUnavailable
from hpcllm.slurm.watcher import StatusWatcher


class MemoryBackend(SlurmBackend):
    """Jobs whose states tests set by hand; counts calls like a scheduler would see them."""

    name = "memory"

    def __init__(self):
        self.states: dict[str, JobState] = {}
        self.status_calls: list[list[str]] = []
        self.cancelled: list[str] = []
        self._next = 100
        self._lock = threading.Lock()

    def submit(self, spec: JobSpec) -> str:
        with self._lock:
            self._next += 1
            self.states[str(self._next)] = JobState.PENDING
            return str(self._next)

    def statuses(self, job_ids):
        with self._lock:
            self.status_calls.append(list(job_ids))
            time.sleep(0.01)  # a scheduler call takes a while: concurrent pollers must share it
            return {j: JobStatus(job_id=j, state=self.states.get(j, JobState.UNKNOWN), missing=j not in self.states)
                    for j in job_ids}

    def list_jobs(self) -> dict[str, JobStatus]:
        with self._lock:
            return {j: JobStatus(job_id=j, state=state) for j, state in self.states.items()}

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)
        self.states[job_id] = JobState.CANCELLED

    def requeue(self, job_id: str) -> None:
        self.states[job_id] = JobState.PENDING

    def signal(self, job_id: str, sig: str, batch_only: bool = True) -> None:
        pass

    def nodes(self) -> list[NodeInfo]:
        return []

    def partitions(self) -> list[PartitionInfo]:
        return []


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SPEC = make_job_spec(name="w", script="true")


def test_one_backend_call_per_poll_for_all_watched_jobs():
    backend = MemoryBackend()
    watcher = StatusWatcher(backend, min_interval=0.01, max_interval=0.05)
    jobs = [watcher.submit(SPEC) for _ in range(5)]
    statuses = watcher.poll()
    assert len(backend.status_calls) == 1 and sorted(backend.status_calls[0]) == sorted(j.job_id for j in jobs)
    assert all(s.state is JobState.PENDING for s in statuses.values())


def test_back_off_doubles_while_nothing_changes_and_resets_on_change():
    backend, clock = MemoryBackend(), FakeClock()
    watcher = StatusWatcher(backend, min_interval=2, max_interval=60, clock=clock)
    job = watcher.submit(SPEC)
    intervals = []
    watcher.poll()  # first poll at once (a new job is a change)
    for _ in range(7):
        intervals.append(watcher.next_poll_in())
        clock.now += watcher.next_poll_in()
        watcher.poll()
    assert intervals == [2, 4, 8, 16, 32, 60, 60]
    # Not due: no scheduler call.
    calls = len(backend.status_calls)
    watcher.poll()
    assert len(backend.status_calls) == calls
    backend.states[job.job_id] = JobState.RUNNING
    clock.now += watcher.next_poll_in()
    watcher.poll()
    assert watcher.next_poll_in() == 2  # a change brings polling back to the minimum


def test_a_requeue_or_signal_through_the_handle_is_seen_at_the_next_look_not_after_the_back_off():
    backend, clock = MemoryBackend(), FakeClock()
    watcher = StatusWatcher(backend, min_interval=2, max_interval=60, clock=clock)
    job = watcher.submit(SPEC)
    backend.states[job.job_id] = JobState.RUNNING
    for _ in range(6):  # a quiet job: polls back off to a minute
        clock.now += watcher.next_poll_in()
        watcher.poll()
    assert job.state() is JobState.RUNNING and watcher.next_poll_in() == 60
    job.requeue()
    assert job.state() is JobState.PENDING  # same clock: no minute of the cached RUNNING
    clock.now += watcher.next_poll_in()
    watcher.poll()
    backend.states[job.job_id] = JobState.CANCELLED  # what a TERM ends in
    job.signal("TERM")
    assert job.state() is JobState.CANCELLED
    job.requeue()  # a finished job can be requeued too: it is not done any more
    assert job.state() is JobState.PENDING and not job.done()


def test_a_poll_in_flight_during_a_requeue_does_not_bring_back_the_old_end():
    backend, clock = MemoryBackend(), FakeClock()
    watcher = StatusWatcher(backend, min_interval=2, max_interval=60, clock=clock)
    job = watcher.submit(SPEC)
    backend.states[job.job_id] = JobState.FAILED
    slurm_answers = backend.statuses

    def answer_then_requeue(job_ids):
        answer = slurm_answers(job_ids)  # Slurm says FAILED ...
        job.requeue()  # ... and another thread requeues the job before that answer is applied
        return answer

    backend.statuses = answer_then_requeue
    watcher.poll()
    backend.statuses = slurm_answers
    assert watcher.next_poll_in() == 0  # the requeued job is asked about at once, not after the back-off
    assert job.state() is JobState.PENDING and not job.done()  # not FAILED for good, never polled again


def test_terminal_jobs_are_not_polled_again():
    backend = MemoryBackend()
    watcher = StatusWatcher(backend, min_interval=0.01, max_interval=0.02)
    done, running = watcher.submit(SPEC), watcher.submit(SPEC)
    backend.states[done.job_id] = JobState.COMPLETED
    backend.states[running.job_id] = JobState.RUNNING
    watcher.poll(force=True)
    watcher.poll(force=True)
    assert backend.status_calls[-1] == [running.job_id]
    assert done.done() and not running.done()


def test_job_handle_wait_cancel_and_timeout():
    backend = MemoryBackend()
    watcher = StatusWatcher(backend, min_interval=0.01, max_interval=0.05)
    job = watcher.submit(SPEC)
    assert job.state() is JobState.PENDING
    with pytest.raises(TimeoutError, match=f"{job.job_id}: PENDING"):
        job.wait(timeout=0.1)
    threading.Timer(0.05, lambda: backend.states.__setitem__(job.job_id, JobState.COMPLETED)).start()
    assert job.wait(timeout=5).state is JobState.COMPLETED

    other = watcher.submit(SPEC)
    other.cancel()
    assert backend.cancelled == [other.job_id]
    assert other.wait(timeout=5).state is JobState.CANCELLED


class FlakyBackend(MemoryBackend):
    """Slurm that cannot be asked for its first `outage` status calls (a squeue timeout, slurmctld restarting)."""

    def __init__(self, outage: int):
        super().__init__()
        self.outage = outage

    def statuses(self, job_ids):
        if self.outage:
            self.outage -= 1
            raise SlurmUnavailable("squeue --json did not answer within 60 s; is slurmctld up?")
        return super().statuses(job_ids)


def test_wait_rides_out_slurm_being_unreachable():
    backend = FlakyBackend(outage=3)
    watcher = StatusWatcher(backend, min_interval=0.01, max_interval=0.02)
    job = watcher.submit(SPEC)
    backend.states[job.job_id] = JobState.COMPLETED
    assert job.wait(timeout=30).state is JobState.COMPLETED  # not the first outage's SlurmUnavailable
    assert backend.outage == 0

    down = FlakyBackend(outage=10**6)
    with pytest.raises(TimeoutError, match="Slurm could not be asked: squeue --json did not answer"):
        StatusWatcher(down, min_interval=0.01, max_interval=0.02).job("7").wait(timeout=0.2)


def test_a_job_slurm_forgot_counts_as_done():
    backend = MemoryBackend()
    watcher = StatusWatcher(backend, min_interval=0.01, max_interval=0.02)
    ghost = watcher.job("424242")
    status = ghost.wait(timeout=2)
    assert status.missing and status.state is JobState.UNKNOWN and ghost.done()


def test_concurrent_callers_share_polls():
    backend = MemoryBackend()
    watcher = StatusWatcher(backend, min_interval=0.2, max_interval=1)
    jobs = [watcher.submit(SPEC) for _ in range(3)]
    errors = []

    def ask():
        try:
            for _ in range(20):
                for job in jobs:
                    assert job.state() is JobState.PENDING
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    # 8 threads x 60 questions, answered by a handful of scheduler calls (one per due interval).
    assert len(backend.status_calls) <= 5


def test_intervals_are_validated():
    with pytest.raises(ValueError):
        StatusWatcher(MemoryBackend(), min_interval=5, max_interval=1)


def test_from_config_uses_the_slurm_section():
    from hpcllm.config import SlurmConfig

    watcher = StatusWatcher.from_config(MemoryBackend(), SlurmConfig(status_poll_min_seconds=1,
                                                                     status_poll_max_seconds=30))
    assert (watcher.min_interval, watcher.max_interval) == (1, 30)
