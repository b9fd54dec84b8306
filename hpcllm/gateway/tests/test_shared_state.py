"""Token buckets and stream slots in SQLite and PostgreSQL: correct arithmetic, one limit shared by several
processes (gunicorn workers) and, on PostgreSQL, by several gateway hosts."""

from __future__ import annotations

import multiprocessing
import time
from contextlib import contextmanager

import pytest

from hpcllm.gateway.errors import ServiceUnavailable
from hpcllm.gateway.shared_state import SharedState


def test_bucket_refills_over_time_and_says_how_long_to_wait(limits_url):
    state = SharedState(limits_url)
    kw = dict(capacity=10, per_second=1.0)
    assert state.take("b", cost=10, now=100.0, **kw) is None
    assert state.take("b", cost=1, now=100.0, **kw) == 1.0
    assert state.take("b", cost=4, now=102.0, **kw) == 2.0  # 2 tokens back after 2 s, 4 needed
    assert state.take("b", cost=4, now=104.0, **kw) is None
    assert state.level("b", now=1000.0, **kw) == 10  # never above capacity


def test_oversized_cost_waits_for_a_full_bucket_then_leaves_debt(limits_url):
    state = SharedState(limits_url)
    kw = dict(capacity=10, per_second=1.0)
    assert state.take("b", cost=25, now=0.0, **kw) is None  # a full bucket admits it
    assert state.take("b", cost=1, now=10.0, **kw) == 6.0  # -15 + 10 = -5: six seconds to one token


def test_refund_gives_back_unused_tokens_and_charges_overuse(limits_url):
    state = SharedState(limits_url)
    kw = dict(capacity=100, per_second=1.0)
    state.take("b", cost=80, now=0.0, **kw)
    state.refund("b", amount=50, now=0.0, **kw)
    assert state.level("b", now=0.0, **kw) == 70
    state.refund("b", amount=-30, now=0.0, **kw)
    assert state.level("b", now=0.0, **kw) == 40


def test_a_refund_made_while_postgres_restarts_still_comes_back(empty_postgres):
    """A request ending just as the limits database restarts gets its unused reservation back (on a new connection),
    not lost: its key would be short of up to max_tokens x n tokens, a 429 for nothing."""
    state = SharedState(empty_postgres)
    try:
        kw = dict(capacity=100, per_second=1.0)
        state.take("b", cost=80, now=0.0, **kw)
        state._shared_db.conn._conn.close()  # as a server restart leaves it
        state.refund("b", amount=50, now=0.0, **kw)
        assert state.level("b", now=0.0, **kw) == 70
    finally:
        state.close()


def test_first_sighting_is_true_once(limits_url):
    state = SharedState(limits_url)
    assert state.first_sighting("inst-1") is True
    assert state.first_sighting("inst-1") is False
    assert SharedState(limits_url).first_sighting("inst-1") is False


def _hammer(path, results, n):
    state = SharedState(path)
    ok = sum(state.take("shared", capacity=20, per_second=20 / 3600, cost=1) is None for _ in range(n))
    results.put(ok)


def test_processes_share_one_limit(limits_url):
    """Four processes taking 15 each from a 20-request bucket: 20 succeed in all, not 20 each (on PostgreSQL the
    row lock serializes them as SQLite's file lock does)."""
    path = limits_url
    SharedState(path).close()
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(path, results, 15)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    total = sum(results.get(timeout=5) for _ in procs)
    assert total == 20


def test_stream_slots_are_counted_per_bucket_and_freed_on_close(limits_url):
    state = SharedState(limits_url)
    assert state.open_stream("streams:k", "s1", limit=2) and state.open_stream("streams:k", "s2", limit=2)
    assert state.open_stream("streams:k", "s3", limit=2) is False
    assert state.open_stream("streams:other", "s4", limit=2) is True  # another key's slots
    state.close_stream("s1")
    assert state.open_stream("streams:k", "s3", limit=2) is True
    state.close()


def _hold_a_slot(url, ready):
    state = SharedState(url)
    ready.put(state.open_stream("streams:k", "held-by-child", limit=1))
    time.sleep(600)


def test_a_killed_process_frees_its_slots_at_once(limits_url):
    """A gunicorn worker killed with its streams open: its pid is gone on this host, no need to wait for a lease."""
    state = SharedState(limits_url, lease_s=3600)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Queue()
    child = ctx.Process(target=_hold_a_slot, args=(limits_url, ready))
    child.start()
    try:
        assert ready.get(timeout=30) is True
        assert state.open_stream("streams:k", "mine", limit=1) is False  # the child is alive and holds it
    finally:
        child.kill()
        child.join(10)
    assert state.open_stream("streams:k", "mine", limit=1) is True
    state.close()


# ------------------------------------------------------------------ several gateway hosts on one PostgreSQL server


def test_two_hosts_share_one_bucket(empty_postgres):
    kw = dict(capacity=100, per_second=100 / 60)
    host_a, host_b = SharedState(empty_postgres, host="gw-a"), SharedState(empty_postgres, host="gw-b")
    assert host_a.take("tokens:k", cost=70, **kw) is None
    wait = host_b.take("tokens:k", cost=70, **kw)  # host b sees the 70 host a used
    assert wait is not None and wait > 20
    assert host_b.take("tokens:k", cost=25, **kw) is None
    assert host_a.level("tokens:k", **kw) < 10
    host_a.close(), host_b.close()


def test_a_crashed_hosts_stream_slots_are_freed_after_its_lease(empty_postgres):
    lease = 3.0  # renewed every 1 s: margin for a loaded machine
    crashed = SharedState(empty_postgres, host="gw-crashed", lease_s=lease)
    alive = SharedState(empty_postgres, host="gw-alive", lease_s=lease)
    other = SharedState(empty_postgres, host="gw-other", lease_s=lease)
    assert crashed.open_stream("streams:k", "c1", limit=2) is True
    assert alive.open_stream("streams:k", "a1", limit=2) is True
    assert other.open_stream("streams:k", "o1", limit=2) is False  # the two hosts hold the key's 2 slots
    crashed.stop_heartbeat()  # the host goes silent with its stream open: no close_stream ever comes
    time.sleep(lease * 1.6)  # past the crashed host's lease; the live host renewed twice meanwhile
    assert other.open_stream("streams:k", "o1", limit=2) is True  # the crashed host's slot was freed...
    assert other.open_stream("streams:k", "o2", limit=2) is False  # ...the live host's was not
    for state in (crashed, alive, other):
        state.close()


def _take_from_a_host(url, host, results):
    state = SharedState(url, host=host)
    results.put(sum(state.take("shared", capacity=30, per_second=30 / 3600, cost=1) is None for _ in range(20)))


def test_hosts_racing_on_one_bucket_take_exactly_its_capacity(empty_postgres):
    """Three "hosts" (processes with their own connections) x 20 takes from a 30-request bucket: 30 in all."""
    SharedState(empty_postgres).close()
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_take_from_a_host, args=(empty_postgres, f"gw-{i}", results)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sum(results.get(timeout=5) for _ in procs) == 30


def test_an_unreachable_postgres_is_a_clear_error(tmp_path):
    from hpcllm.controller.errors import DatabaseError
    from hpcllm.tests.ports import free_port

    pytest.importorskip("psycopg")
    url = f"postgresql://gw:secret@127.0.0.1:{free_port()}/limits"
    with pytest.raises(DatabaseError, match=r"cannot connect to the gateway limits database "
                                            r"postgresql://gw:\*\*\*@127\.0\.0\.1"):
        SharedState(url)


def test_the_limits_follow_a_postgresql_registry_unless_set(tmp_path):
    from hpcllm.config import parse_config
    from hpcllm.gateway.runtime import limits_db_url

    def url(**sections) -> str:
        return limits_db_url(parse_config({"paths": {"state_dir": str(tmp_path)}, **sections}))

    assert url() == str(tmp_path / "gateway" / "limits.db")  # the default: this host's SQLite file
    assert url(controller={"database_url": f"sqlite:///{tmp_path}/c.db"}) == str(tmp_path / "gateway" / "limits.db")
    registry = "postgresql://hpcllm@db.example/hpcllm"
    assert url(controller={"database_url": registry}) == registry  # every gateway host shares the registry's
    assert url(controller={"database_url": registry}, gateway={"limits_db": "/var/tmp/l.db"}) == "/var/tmp/l.db"


def test_a_stream_slot_closed_while_postgres_restarts_is_still_freed(empty_postgres):
    """A stream ending just as the limits database restarts: its slot is freed (on a new connection, else by the
    lease's next renewal), not held for the life of the gateway process (the lease kept renewed), which left its
    key at 429 too_many_streams until the gateway restarted."""
    state = SharedState(empty_postgres, host="gw1")
    try:
        assert state.open_stream("streams:k", "s1", 1)
        state._shared_db.conn._conn.close()  # as a server restart leaves it
        state.close_stream("s1")
        assert state.open_stream("streams:k", "s2", 1)  # the key's one slot is free again

        with pytest.MonkeyPatch.context() as patch:  # the database away for a while: the close fails
            patch.setattr(state, "transaction", _failing_transaction)
            with pytest.raises(ServiceUnavailable):
                state.close_stream("s2")
        state.renew_lease()  # the heartbeat, once the database answers again
        assert state.open_stream("streams:k", "s3", 1)
    finally:
        state.close()


@contextmanager
def _failing_transaction(attempt=None):
    raise ServiceUnavailable("the gateway's limits database is unreachable; retry shortly")
    yield


class _Failing:
    """A connection whose statement `fails` (once) raises `error`: after running it (`after`: the server did it, its
    answer was lost) or instead."""

    def __init__(self, conn, fails: str, error: Exception, after: bool = False):
        self.conn, self.fails, self.error, self.after = conn, fails, error, after

    def execute(self, sql, params=()):
        if sql.startswith(self.fails) and self.error is not None:
            error, self.error = self.error, None
            if self.after:
                self.conn.execute(sql, params)
                self.conn._conn.close()  # the connection drops with the answer
            raise error
        return self.conn.execute(sql, params)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_a_charge_whose_commit_answer_is_lost_is_not_made_twice(empty_postgres):
    """The connection drops while COMMIT's answer is on its way (the server committed): the charge (a negative
    refund, tokens used beyond the reservation) is not written again on a new connection, which took it twice."""
    import psycopg

    state = SharedState(empty_postgres)
    try:
        kw = dict(capacity=100, per_second=1.0)
        state.take("b", cost=80, now=0.0, **kw)
        db = state._shared_db
        db.conn = _Failing(db.conn, "COMMIT", psycopg.OperationalError("server closed the connection"), after=True)
        with pytest.raises(ServiceUnavailable):
            state.refund("b", amount=-30, now=0.0, **kw)
        assert state.level("b", now=0.0, **kw) == -10
    finally:
        state.close()


def test_a_write_whose_connect_fails_is_not_tried_again(empty_postgres):
    """The database unreachable: a request's refund fails after one connect attempt (up to connect_timeout, 30 s,
    under the process's one connection lock), not two, which held every other request's close() as long."""
    from hpcllm.controller.errors import DatabaseError

    state = SharedState(empty_postgres)
    connects = []

    def unreachable():
        connects.append(1)
        raise DatabaseError("could not connect to the gateway limits database")

    try:
        state._drop_shared_connection()  # as a failed statement leaves it
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(state, "_open", unreachable)
            with pytest.raises(ServiceUnavailable):
                state.refund("b", amount=50, now=0.0, capacity=100, per_second=1.0)
        assert len(connects) == 1
    finally:
        state.close()


def test_a_refund_that_finds_sqlite_locked_is_written_once_more(tmp_path):
    """SQLite's file locked past its busy timeout at BEGIN or at COMMIT (nothing written either way): the refund is
    tried once more and comes back once; the transaction a failed COMMIT left open is rolled back, so the second
    try (and every later write on that thread's connection) can begin."""
    import sqlite3

    state = SharedState(tmp_path / "limits.db")
    kw = dict(capacity=100, per_second=1.0)
    state.take("b", cost=80, now=0.0, **kw)
    db = state._local.db
    plain = db.conn
    db.conn = _Failing(plain, "BEGIN", sqlite3.OperationalError("database is locked"))
    state.refund("b", amount=50, now=0.0, **kw)
    assert state.level("b", now=0.0, **kw) == 70
    db.conn = _Failing(plain, "COMMIT", sqlite3.OperationalError("database is locked"))
    state.refund("b", amount=10, now=0.0, **kw)
    db.conn = plain
    assert state.level("b", now=0.0, **kw) == 80
