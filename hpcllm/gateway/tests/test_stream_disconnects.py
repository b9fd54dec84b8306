"""Clients that hang up before their answer's first token: the worker must hear of it, not only once it generates."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from .conftest import MODEL, GatewayFactory, ThreadServer, raw_post
from .stand_in_worker import InFlight, stand_in_worker_app


@pytest.fixture
def queueing(tmp_path, tiny_model_dir):
    """(gateway, in_flight) of a gateway in front of a queueing worker that holds every request while the test
    runs (released at its end); in_flight counts the requests it holds (queued or streaming) until their stream ends
    or its client (the gateway) is gone."""
    release, in_flight = threading.Event(), InFlight()
    worker = ThreadServer(stand_in_worker_app("queueing-worker", lambda index: None, in_flight=in_flight,
                                              queued_until=release))
    factory = GatewayFactory(tmp_path, worker.url, tiny_model_dir)
    try:
        yield factory(max_streams_per_key=1), in_flight
    finally:
        release.set()
        factory.stop_all()
        worker.stop()


def wait_until(condition, what: str, within_s: float = 20) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def abort_count(gateway) -> float:
    line = f'hpcllm_request_success_total{{finished_reason="abort",model_name="{MODEL}"}} '
    found = [ln for ln in httpx.get(f"{gateway.url}/metrics", timeout=10).text.splitlines() if ln.startswith(line)]
    return float(found[0].rsplit(" ", 1)[1]) if found else 0.0


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_while_its_request_waits_on_the_worker_frees_its_place_there(queueing, stream):
    """A request queued on a full worker (its slots all taken) stayed queued after its client had gone: the gateway
    looked for the client only when a token came (a delta, a write), so the worker later ran its prefill and a
    token for nobody, and under load the queue filled with requests whose clients had given up and retried."""
    gateway, in_flight = queueing
    before = abort_count(gateway)
    client = raw_post(gateway, "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 5,
                                                    "stream": stream})
    wait_until(lambda: in_flight.now == 1, "the request never reached the worker")
    client.close()  # the client gives up while its request still waits for a slot

    wait_until(lambda: in_flight.now == 0, "the worker still holds the request of a client that left")
    wait_until(lambda: gateway.state.in_flight == 0, "the gateway still counts the request as running")
    assert abort_count(gateway) == before + 1
    # The key's one stream slot is free again: its next stream is taken (it waits on the worker too).
    again = raw_post(gateway, "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 5,
                                                   "stream": True})
    wait_until(lambda: in_flight.now == 1, "the next stream was not taken")
    again.close()
