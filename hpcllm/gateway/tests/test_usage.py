"""Usage accounting: per key, group, model and day, through a real gateway and the tiny model's worker
(GET /v1/admin/usage, `hpcllm usage`), and the usage table's retention."""

from __future__ import annotations

import calendar
import csv
import io
import json
import sqlite3
import time

import httpx
import pytest

from hpcllm.cli.main import main
from hpcllm.gateway.runtime import limits_db_url
from hpcllm.gateway.metrics import GatewayMetrics
from hpcllm.gateway.shared_state import SharedState
from hpcllm.gateway.tests.conftest import ADMIN_KEY, MODEL
from hpcllm.gateway.usage import UsageLog, UsageRecord, utc_day

ALICE, BOB = "sk-alice", "sk-bob"
KEYS = [{"key": ALICE, "name": "alice", "group": "physics"}, {"key": BOB, "name": "bob", "group": "chemistry"}]
TOTALS = ("requests", "prompt_tokens", "completion_tokens")


def admin_usage(gw, **query) -> httpx.Response:
    return httpx.get(f"{gw.url}/v1/admin/usage", params=query, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                     timeout=30)


def sse_usage(resp: httpx.Response) -> dict:
    """The usage of a stream with include_usage (its last data event before [DONE])."""
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return json.loads(events[-2])["usage"]


def add(totals: dict, usage: dict) -> None:
    totals["requests"] += 1
    totals["prompt_tokens"] += usage["prompt_tokens"]
    totals["completion_tokens"] += usage.get("completion_tokens", 0)


def metric(gw, name: str, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    found = [ln for ln in httpx.get(f"{gw.url}/metrics").text.splitlines() if ln.startswith(prefix)]
    return float(found[0].rsplit(" ", 1)[1]) if found else 0.0


def wait_generations_closed(gw) -> None:
    deadline = time.monotonic() + 20
    while gw.state._generations and time.monotonic() < deadline:  # the gateway ends a stream at its next write
        time.sleep(0.05)
    assert not gw.state._generations


def test_usage_totals_equal_the_sums_of_the_responses_usage(make_gateway):
    gw = make_gateway(api_keys=KEYS)
    want = {name: dict.fromkeys(TOTALS, 0) for name in ("alice", "bob")}
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    body = {"model": MODEL, "max_tokens": 5, "ignore_eos": True}
    chat = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hello"}]}
    add(want["alice"], gw.post("/v1/completions", key=ALICE, json={**body, "prompt": "one two"}).json()["usage"])
    add(want["alice"], sse_usage(gw.post("/v1/chat/completions", key=ALICE, json={**chat, **stream})))
    add(want["bob"], gw.post("/v1/chat/completions", key=BOB, json=chat).json()["usage"])
    add(want["bob"], sse_usage(gw.post("/v1/completions", key=BOB, json={**body, **stream, "prompt": "three",
                                                                          "n": 2})))
    add(want["bob"], gw.post("/v1/embeddings", key=BOB, json={"model": MODEL, "input": "four five"}).json()["usage"])

    by_key = admin_usage(gw, by="key").json()
    assert [{k: row[k] for k in ("key", *TOTALS)} for row in by_key["data"]] == [
        {"key": name, **want[name]} for name in ("alice", "bob")]
    assert by_key["total"]["requests"] == 5
    by_group = {row["group"]: row for row in admin_usage(gw, by="group").json()["data"]}
    assert {g: by_group[g]["prompt_tokens"] for g in by_group} == {
        "physics": want["alice"]["prompt_tokens"], "chemistry": want["bob"]["prompt_tokens"]}
    only_physics = admin_usage(gw, by="model", group="physics").json()["data"]
    assert [(row["model"], row["completion_tokens"]) for row in only_physics] == [
        (MODEL, want["alice"]["completion_tokens"])]
    today = admin_usage(gw, by="day", key="bob").json()["data"]
    assert len(today) == 1 and today[0]["requests"] == 3
    assert metric(gw, "hpcllm_group_generation_tokens_total", model_name=MODEL, group="chemistry") == \
        want["bob"]["completion_tokens"]


def test_a_stream_its_client_closes_counts_the_tokens_generated(make_gateway):
    gw = make_gateway(api_keys=KEYS)
    request = {"model": MODEL, "prompt": "a", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{gw.url}/v1/completions", json=request, timeout=30,
                      headers={"Authorization": f"Bearer {ALICE}"}) as resp:
        assert next(line for line in resp.iter_lines() if line.startswith("data: {"))
    wait_generations_closed(gw)  # the client left after its first event
    row, = admin_usage(gw, by="key").json()["data"]
    assert row["requests"] == 1
    assert row["completion_tokens"] == metric(gw, "hpcllm_generation_tokens_total", model_name=MODEL)
    assert 1 <= row["completion_tokens"] < 500  # cancelled, not run to the end


def test_a_request_that_failed_counts_what_it_used(make_gateway, tiny_model_dir):
    from .conftest import ThreadServer
    from .stand_in_worker import stand_in_worker_app

    worker = ThreadServer(stand_in_worker_app("failing-worker", lambda index: None, fail_with="a bad step"))
    try:
        gw = make_gateway(api_keys=KEYS, static_models={MODEL: {"worker_url": worker.url,
                                                                "source": str(tiny_model_dir)}})
        resp = gw.post("/v1/completions", key=BOB, json={"model": MODEL, "prompt": "one two", "max_tokens": 3})
        assert resp.status_code == 500 and resp.json()["error"]["code"] == "generation_failed"
        row, = admin_usage(gw).json()["data"]
        assert (row["key"], row["requests"], row["completion_tokens"]) == ("bob", 1, 3)
        assert row["prompt_tokens"] == gw.post("/tokenize", key=BOB, json={"model": MODEL,
                                                                          "prompt": "one two"}).json()["count"]
    finally:
        worker.stop()


def test_a_database_that_refuses_usage_rows_does_not_fail_the_request(make_gateway):
    gw = make_gateway(api_keys=KEYS)
    with sqlite3.connect(limits_db_url(gw.config)) as db:
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON gateway_usage BEGIN SELECT RAISE(ABORT, 'refused'); END")
    resp = gw.post("/v1/completions", key=ALICE, json={"model": MODEL, "prompt": "x", "max_tokens": 3})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
    assert admin_usage(gw).json()["data"] == []
    assert metric(gw, "hpcllm_usage_records_dropped_total") == 1.0


@pytest.mark.parametrize(("query", "param"), [({"since": "yesterday"}, "since"), ({"until": "2026-13-01"}, "until"),
                                              ({"by": "user"}, "by"), ({"since": "2026-02-02", "until": "2026-02-01"},
                                                                       "since"), ({"grup": "x"}, "grup")])
def test_a_bad_query_is_a_400_naming_its_parameter(gateway, query, param):
    resp = admin_usage(gateway, **query)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == param


def test_usage_needs_the_admin_key(gateway):
    assert gateway.get("/v1/admin/usage").status_code == 401


def test_rows_older_than_the_retention_are_pruned(tmp_path, limits_url):
    now = [calendar.timegm((2026, 1, 10, 12, 0, 0))]
    log = UsageLog(SharedState(limits_url), GatewayMetrics(), retention_days=3, clock=lambda: now[0])
    for _ in range(4):  # Jan 10, 11, 12, 13: on the 13th the 10th is beyond 3 days' retention
        log.write(UsageRecord(utc_day(now[0]).isoformat(), "alice", "physics", MODEL, "chat", 2, 3))
        now[0] += 86400.0
    report = log.report({"by": "day", "since": "2026-01-01"})
    assert [row["day"] for row in report["data"]] == ["2026-01-11", "2026-01-12", "2026-01-13"]
    assert report["total"] == {"requests": 3, "prompt_tokens": 6, "completion_tokens": 9, "total_tokens": 15}


def test_a_request_that_ends_after_the_shutdown_is_counted_as_dropped_not_written_by_a_new_writer(tmp_path,
                                                                                                    limits_url):
    """A request still running when the gateway closed ends a moment later: its record started a new writer thread
    against the closed database, cut off unseen as the process exits. It is counted as dropped instead."""
    metrics = GatewayMetrics()
    state = SharedState(limits_url)
    log = UsageLog(state, metrics, retention_days=3)
    try:
        log.record(None, MODEL, "chat", 2, 3)
        log.close()
        log.record(None, MODEL, "chat", 4, 5)
        assert metrics.usage_records_dropped._value.get() == 1.0
        assert log.report({"by": "day"})["total"]["requests"] == 1
    finally:
        state.close()


def test_the_cli_prints_a_table_and_csv(make_gateway, tmp_path, capsys):
    gw = make_gateway(api_keys=KEYS)
    for key in (ALICE, BOB, BOB):
        gw.post("/v1/completions", key=key, json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    config = tmp_path / "hpcllm.toml"
    config.write_text(f'[gateway]\nadmin_key = "{ADMIN_KEY}"\n')
    common = ["usage", "--config", str(config), "--url", gw.url, "--by", "group"]
    assert main([*common, "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["group", "requests", "prompt_tokens", "completion_tokens", "total_tokens"]
    assert {row[0]: row[1] for row in rows[1:]} == {"chemistry": "2", "physics": "1"}
    assert main([*common, "--since", "7d"]) == 0
    table = capsys.readouterr().out
    assert "chemistry" in table and "physics" in table and "total" in table
    assert main([*common, "--since", "last week"]) == 1
    assert "since must be a UTC day" in capsys.readouterr().err
    assert main([*common[:-1], "weekday"]) == 1  # --by checked by the gateway, which names the choices
    err = capsys.readouterr().err
    assert "refused (400): by must be one of day, key, group, model, endpoint, not 'weekday'" in err


def test_a_record_whose_commit_answer_is_lost_is_counted_once(empty_postgres):
    """The connection drops while COMMIT's answer is on its way (PostgreSQL committed): the usage writer does not
    write the record again on a new connection, which counted the request and its tokens twice."""
    import psycopg

    from hpcllm.gateway.tests.test_shared_state import _Failing

    now = calendar.timegm((2026, 1, 10, 12, 0, 0))
    state = SharedState(empty_postgres)
    metrics = GatewayMetrics()
    log = UsageLog(state, metrics, retention_days=3, clock=lambda: now)
    try:
        log.record(None, MODEL, "chat", 2, 3)
        assert log.flush()  # written: the connection is open before the failing write, as in a running gateway
        db = state._shared_db
        db.conn = _Failing(db.conn, "COMMIT", psycopg.OperationalError("server closed the connection"), after=True)
        log.record(None, MODEL, "chat", 2, 3)
        assert log.flush()
        total = log.report({"by": "day", "since": "2026-01-01"})["total"]
        assert total == {"requests": 2, "prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    finally:
        log.close()
        state.close()
