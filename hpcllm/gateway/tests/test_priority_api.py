"""Request priority through the gateway: vLLM's `priority` (lower is sooner) on completions, chat and Responses
reaches the worker; a key may yield (a larger value) but not jump the queue below its min_priority; batch requests
run at gateway.batch_priority, so a worker busy with a batch serves an interactive request first."""

from __future__ import annotations

import threading

import pytest

from hpcllm.httpkit.tests.thread_server import ThreadServer

from .conftest import MODEL, SECRET, USER_KEY, GatewayFactory
from .stand_in_worker import stand_in_worker_app
from .test_batches_api import chat_line, finished, results, submit
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


def test_batch_requests_run_at_the_batch_priority_and_keep_a_larger_one_of_their_own(recorded):
    gw, received = recorded
    client = gw.client(key=URGENT_KEY)  # even a key that may jump the queue does not do it with a batch
    lines = [chat_line("plain", "a"), chat_line("urgent", "b", priority=-5), chat_line("later", "c", priority=20)]
    batch = finished(client, submit(client, lines).id)
    assert batch.status == "completed" and set(results(client, batch.output_file_id)) == {"plain", "urgent", "later"}
    assert sorted(r.priority for r in received) == [10, 10, 20]


def test_a_worker_busy_with_a_batch_serves_an_interactive_request_before_the_queued_batch_requests(
        tmp_path, tiny_model_dir):
    """One slot at the worker, three batch requests there (one running, two queued): an interactive chat sent then
    runs to its end before the queued batch requests start (it preempts the running one, which resumes after)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcllm.worker.server import ModelForServing, WorkerService, create_app
    from hpcllm.worker.tests.test_priority import StepLog

    service = WorkerService(MODEL, secret=SECRET, keepalive_seconds=0.5, max_running_requests=1)
    engine = service.attach(ModelForServing(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                                            AutoTokenizer.from_pretrained(tiny_model_dir)))
    steps = StepLog(engine, pause_after=1)  # the first batch request's first step waits for the test
    queued, all_queued = [], threading.Event()
    enqueue = engine._enqueue

    def counting_enqueue(state):
        enqueue(state)
        queued.append(state)
        if len(queued) == 4:
            all_queued.set()

    engine._enqueue = counting_enqueue
    worker = ThreadServer(create_app(service))
    factory = GatewayFactory(tmp_path, worker.url, tiny_model_dir)
    try:
        gw = factory(batch_concurrency=3)
        client = gw.client()
        batch = submit(client, [chat_line(f"b{i}", f"question {i}", max_tokens=8) for i in range(3)])
        assert steps.paused.wait(60)
        answer = {}
        chat = threading.Thread(target=lambda: answer.update(response=client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "quick"}], max_tokens=4)))
        chat.start()
        assert all_queued.wait(60)  # the three batch requests and the chat are at the worker
        steps.go.set()
        chat.join(60)
        assert finished(client, batch.id).status == "completed" and answer["response"].choices[0].message.content
    finally:
        steps.go.set()
        factory.stop_all()
        worker.stop()
        service.shutdown()
    interactive = next(r for r in queued if r.priority == 0)
    batch_requests = [r for r in queued if r is not interactive]
    assert sorted(r.priority for r in batch_requests) == [10, 10, 10]
    chat_steps = steps.steps_of(interactive.request_id)
    started = sorted(steps.steps_of(r.request_id)[0] for r in batch_requests)
    assert chat_steps[-1] < started[1]  # done before the second batch request's first step
