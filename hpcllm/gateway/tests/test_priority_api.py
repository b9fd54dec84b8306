"""Request priority through the gateway: vLLM's `priority` (lower is sooner) on completions, chat and Responses
reaches the worker; a key may yield (a larger value) but not jump the queue below its min_priority."""

from __future__ import annotations

import pytest

from hpcllm.httpkit.tests.thread_server import ThreadServer

from .conftest import MODEL, SECRET, USER_KEY, GatewayFactory
from .stand_in_worker import stand_in_worker_app
from .test_errors import assert_error

URGENT_KEY = "sk-test-urgent"
KEYS = [{"key": USER_KEY, "name": "alice"}, {"key": URGENT_KEY, "name": "ops", "min_priority": -5}]


@pytest.fixture
def recorded(tmp_path, tiny_model_dir):
    """(a gateway on a stand-in worker, the GenerateRequests that worker received)."""
    received: list = []
    worker = ThreadServer(stand_in_worker_app("recording", lambda index: None, received=received))
    factory = GatewayFactory(tmp_path, worker.url, tiny_model_dir)
    yield factory(api_keys=KEYS, batch_concurrency=2), received
    factory.stop_all()
    worker.stop()


ENDPOINTS = {
    "/v1/completions": {"model": MODEL, "prompt": "hello", "max_tokens": 2},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 2},
}


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_priority_reaches_the_worker_and_only_a_key_allowed_to_may_jump_the_queue(recorded, path):
    gw, received = recorded
    for key, priority in [(USER_KEY, None), (USER_KEY, 7), (URGENT_KEY, -5)]:
        body = ENDPOINTS[path] | ({} if priority is None else {"priority": priority})
        assert gw.post(path, key=key, json=body).status_code == 200
        assert received.pop().priority == (priority or 0)
    refused = assert_error(gw.post(path, key=USER_KEY, json=ENDPOINTS[path] | {"priority": -1}), 400,
                           "invalid_value", "priority")
    assert "priority of 0 or more" in refused["message"]
    assert_error(gw.post(path, key=URGENT_KEY, json=ENDPOINTS[path] | {"priority": -6}), 400, "invalid_value",
                 "priority")
    assert_error(gw.post(path, key=USER_KEY, json=ENDPOINTS[path] | {"priority": "high"}), 422, "invalid_value",
                 "priority")
    assert not received  # nothing refused reached the worker
