"""What `hpcllm gateway` (gunicorn) writes to its log for the requests it answers."""

from __future__ import annotations

import httpx
import pytest

from hpcllm.tests.ports import free_port

from .conftest import MODEL
from .test_gunicorn import gunicorn_process, write_config


def test_the_access_log_names_each_requests_id(tmp_path, worker_url, tiny_model_dir):
    """A user quotes the X-Request-Id of an answer (a 401, a 429: answers the gateway logs nothing else for); the
    operator finds that request's line in the gateway's log by it."""
    port = free_port()
    config = write_config(tmp_path / "gateway.toml", tmp_path / "state", port, worker_url, tiny_model_dir,
                          worker_url, "gthread", worker_url)
    with gunicorn_process(tmp_path, config, port) as (_, url, _):
        refused = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-wrong"}, timeout=30)
        given = httpx.get(f"{url}/health", headers={"X-Request-Id": "ticket-4711"}, timeout=30)
    assert refused.status_code == 401 and given.headers["X-Request-Id"] == "ticket-4711"
    lines = (tmp_path / "gateway.log").read_text().splitlines()
    [line] = [ln for ln in lines if refused.headers["X-Request-Id"] in ln]
    assert '"GET /v1/models HTTP/1.1" 401' in line
    assert any('"GET /health HTTP/1.1" 200' in ln for ln in lines if "ticket-4711" in ln)


def test_a_failed_generations_log_line_names_the_request_id_its_worker_logs(make_gateway, tiny_model_dir, caplog):
    """The operator looks up the X-Request-Id a user quotes in the gateway's log, then the worker's traceback in
    the worker's log, which knows the request by the id the gateway opened it with: the gateway's line names both."""
    from .conftest import ThreadServer
    from .stand_in_worker import stand_in_worker_app

    received = []
    worker = ThreadServer(stand_in_worker_app("failing-worker", lambda index: None, fail_with="a bad step",
                                              received=received))
    try:
        gw = make_gateway(static_models={MODEL: {"worker_url": worker.url, "source": str(tiny_model_dir)}})
        resp = gw.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 2})
    finally:
        worker.stop()
    assert resp.status_code == 500, resp.text
    [line] = [r.getMessage() for r in caplog.records
              if resp.headers["X-Request-Id"] in r.getMessage() and "a bad step" in r.getMessage()]
    assert received[0].request_id in line


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 2}),
    ("/v1/embeddings", {"model": MODEL, "input": "hello"}),
])
def test_a_worker_refusing_a_request_is_logged_under_its_request_ids(make_gateway, tiny_model_dir, caplog, path, body):
    """A worker answering 500 when the gateway opens the request: the gateway's line about it names the
    X-Request-Id the user quotes, and for a generation the id the worker logs it under."""
    from flask import Flask, request

    from hpcllm.worker.protocol import EMBED_PATH, GENERATE_PATH, GenerateRequest

    from .conftest import ThreadServer

    received = []
    app = Flask("refusing-worker")

    @app.post(GENERATE_PATH)
    @app.post(EMBED_PATH)
    def refuse():
        if request.path == GENERATE_PATH:
            received.append(GenerateRequest.model_validate_json(request.get_data()).request_id)
        return "engine exploded", 500

    worker = ThreadServer(app)
    try:
        gw = make_gateway(static_models={MODEL: {"worker_url": worker.url, "source": str(tiny_model_dir)}})
        resp = gw.post(path, json=body)
    finally:
        worker.stop()
    assert resp.status_code == 503, resp.text
    lines = [r.getMessage() for r in caplog.records if "engine exploded" in r.getMessage()]
    assert lines and all(resp.headers["X-Request-Id"] in line for line in lines), lines
    if path == "/v1/completions":  # and the worker's own id of the generation
        assert received and all(any(rid in line for rid in received) for line in lines), (received, lines)
