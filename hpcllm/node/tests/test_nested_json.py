"""A deeply nested JSON body is a clear 400 on the node agent and the worker (issue 15), never a 500."""

from __future__ import annotations

import logging

from hpcllm.httpkit.auth import SECRET_HEADER
from hpcllm.node.app import create_app

from .test_agent import SECRET, make_agent

NESTED = b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def test_node_agent(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    agent = make_agent(tmp_path)
    try:
        resp = create_app(agent).test_client().post("/v1/internal/instances", data=NESTED, content_type="application/json",
                                                     headers={SECRET_HEADER: SECRET})
    finally:
        agent.workers.close()
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert "nested deeper than 200 levels" in resp.get_json()["error"]["message"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_worker(caplog):
    from hpcllm.worker.protocol import GENERATE_PATH
    from hpcllm.worker.server import WorkerService, create_app as create_worker_app

    caplog.set_level(logging.WARNING)
    service = WorkerService("m", secret=SECRET)
    try:
        resp = create_worker_app(service).test_client().post(GENERATE_PATH, data=NESTED,
                                                             content_type="application/json",
                                                             headers={SECRET_HEADER: SECRET})
    finally:
        service.shutdown()
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert "recursion limit exceeded" in resp.get_json()["error"]["message"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
