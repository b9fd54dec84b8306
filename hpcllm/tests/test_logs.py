"""What the services' logs hold."""

from __future__ import annotations

import logging

import httpx

from hpcllm.logs import QUIET_LIBRARIES, setup_service_logging


def test_a_service_log_has_no_line_per_internal_http_call_but_keeps_hpcllm_s_own(caplog, monkeypatch):
    """An agent polls each worker's /ready every second: with httpx's INFO line per request, its log was mostly
    'HTTP Request: GET .../ready 200 OK'. A failed call still shows (WARNING and up)."""
    for name in QUIET_LIBRARIES:  # restored after the test: other tests' loggers stay as they were
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    setup_service_logging()
    caplog.set_level(logging.INFO)
    with httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200))) as client:
        for _ in range(3):
            client.get("http://worker.invalid/ready")
    logging.getLogger("hpcllm.node.workers").info("instance i-1 (m): ready")
    logging.getLogger("httpx").warning("a call failed")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("hpcllm.node.workers", "instance i-1 (m): ready"), ("httpx", "a call failed")]
