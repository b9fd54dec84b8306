"""Token buckets in SQLite: correct arithmetic, and one limit shared by several processes (gunicorn workers)."""

from __future__ import annotations

import multiprocessing

from hpcllm.gateway.shared_state import SharedState


def test_bucket_refills_over_time_and_says_how_long_to_wait(tmp_path):
    state = SharedState(tmp_path / "limits.db")
    kw = dict(capacity=10, per_second=1.0)
    assert state.take("b", cost=10, now=100.0, **kw) is None
    assert state.take("b", cost=1, now=100.0, **kw) == 1.0
    assert state.take("b", cost=4, now=102.0, **kw) == 2.0  # 2 tokens back after 2 s, 4 needed
    assert state.take("b", cost=4, now=104.0, **kw) is None
    assert state.level("b", now=1000.0, **kw) == 10  # never above capacity


def test_oversized_cost_waits_for_a_full_bucket_then_leaves_debt(tmp_path):
    state = SharedState(tmp_path / "limits.db")
    kw = dict(capacity=10, per_second=1.0)
    assert state.take("b", cost=25, now=0.0, **kw) is None  # a full bucket admits it
    assert state.take("b", cost=1, now=10.0, **kw) == 6.0  # -15 + 10 = -5: six seconds to one token


def test_refund_gives_back_unused_tokens_and_charges_overuse(tmp_path):
    state = SharedState(tmp_path / "limits.db")
    kw = dict(capacity=100, per_second=1.0)
    state.take("b", cost=80, now=0.0, **kw)
    state.refund("b", amount=50, now=0.0, **kw)
    assert state.level("b", now=0.0, **kw) == 70
    state.refund("b", amount=-30, now=0.0, **kw)
    assert state.level("b", now=0.0, **kw) == 40


def test_first_sighting_is_true_once(tmp_path):
    state = SharedState(tmp_path / "limits.db")
    assert state.first_sighting("inst-1") is True
    assert state.first_sighting("inst-1") is False
    assert SharedState(tmp_path / "limits.db").first_sighting("inst-1") is False


def _hammer(path, results, n):
    state = SharedState(path)
    ok = sum(state.take("shared", capacity=20, per_second=20 / 3600, cost=1) is None for _ in range(n))
    results.put(ok)


def test_processes_share_one_limit(tmp_path):
    """Four processes taking 15 each from a 20-request bucket: 20 succeed in all, not 20 each."""
    path = tmp_path / "limits.db"
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
