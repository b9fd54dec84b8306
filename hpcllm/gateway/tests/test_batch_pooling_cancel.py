"""A gateway process closing while a batch's embeddings request is being pooled on a worker cancels that call on the
worker, as it cancels a batch's generation (Gateway.stop_batch_generations): the worker stops pooling for nobody,
the request's late answer is not written, and the batch is handed back for another process to run it again."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager

from flask import Flask, Response, request

from hpcllm.gateway.batches import FINAL
from hpcllm.httpkit.tests.thread_server import ThreadServer
from hpcllm.worker.protocol import (CANCEL_PATH, EMBED_PATH, EmbedResult, ErrorInfo, ErrorResponse,
                                    RequestTokens)

from .conftest import MODEL, GatewayFactory
from .test_batches_api import service_of, submit, wait_until

EMBEDDINGS = "/v1/embeddings"
EMBED_LINE = {"custom_id": "e0", "method": "POST", "url": EMBEDDINGS, "body": {"model": MODEL, "input": "hi"}}


def embedded(body: dict) -> Response:
    """A worker's answer to an embed call: a vector for each input."""
    result = EmbedResult(embeddings=[[1.0, 0.0] for _ in body["inputs"]],
                         prompt_tokens=sum(len(ids) for ids in body["inputs"]))
    return Response(result.model_dump_json(), mimetype="application/json")


class PoolingWorker:
    """A worker whose embedding calls pool until they are cancelled (POST cancel with the call's request_id), or
    for 60 s; what it was asked is kept. A silent one (answers_cancel False) answers no cancel until `release`."""

    def __init__(self, answers_cancel: bool = True) -> None:
        self.embedded: list[str | None] = []  # each embed call's request_id
        self.cancelled: list[str] = []
        self.reached, self.stop = threading.Event(), threading.Event()
        self.cancel_asked, self.release, self.cancel_answered = threading.Event(), threading.Event(), threading.Event()
        app = Flask("pooling-worker")

        @app.post(EMBED_PATH)
        def embed():
            body = json.loads(request.get_data())
            self.embedded.append(body.get("request_id"))
            self.reached.set()
            if self.stop.wait(60):
                error = ErrorResponse(error=ErrorInfo(message="embedding cancelled by its caller",
                                                      type="overloaded_error"))
                return Response(error.model_dump_json(), status=503, mimetype="application/json")
            return embedded(body)

        @app.post(CANCEL_PATH.replace("{request_id}", "<request_id>"))
        def cancel(request_id: str):
            self.cancelled.append(request_id)
            self.cancel_asked.set()
            if not answers_cancel:
                self.release.wait(60)
            self.cancel_answered.set()
            self.stop.set()
            tokens = RequestTokens(request_id=request_id, state="finished", prompt_token_ids=[], output_token_ids=[],
                                   seed=0, finish_reason="abort")
            return Response(tokens.model_dump_json(), mimetype="application/json")

        self.server = ThreadServer(app)


@contextmanager
def pooling_batch(worker: PoolingWorker, tmp_path, model_dir):
    """A gateway in front of `worker` running one embeddings batch (one line), its call now pooling on the worker:
    (gateway, batch); the worker released, and all stopped, on leaving."""
    factory = GatewayFactory(tmp_path, worker.server.url, model_dir)
    try:
        gw = factory(batch_concurrency=1, batch_lease_seconds=300)
        batch = submit(gw.client(), [EMBED_LINE], EMBEDDINGS)
        assert worker.reached.wait(30)
        yield gw, batch
    finally:
        worker.release.set()
        worker.stop.set()
        factory.stop_all()
        worker.server.stop()


def batch_row(gw):
    """The gateway's one batch as stored (status, lease_holder and the batch's JSON)."""
    with service_of(gw).batches.shared.connection() as db:
        return db.conn.execute("SELECT status, lease_holder, batch FROM gateway_batches").fetchone()


def test_a_closing_gateway_cancels_its_batch_embedding_call_on_the_worker(tmp_path, tiny_model_dir):
    from hpcllm.gateway.server import QUICK_CLOSE_S

    worker = PoolingWorker()
    with pooling_batch(worker, tmp_path, tiny_model_dir) as (gw, batch):
        gw.state.close(QUICK_CLOSE_S)  # the call pools for 60 s unless cancelled: it outlasts the close's budget

        assert worker.stop.wait(30), "the worker was not asked to cancel the call: it pools on for nobody"
        assert worker.cancelled == worker.embedded and worker.embedded[0] is not None
        row = wait_until(lambda: (row := batch_row(gw))["lease_holder"] is None and row, timeout_s=30)
        kept = json.loads(row["batch"])
        assert row["status"] not in FINAL and kept["id"] == batch.id
        assert (kept["request_counts"]["completed"], kept["request_counts"]["failed"]) == (0, 0)  # nothing written


def test_a_worker_that_never_answers_the_cancel_does_not_hold_the_close(tmp_path, tiny_model_dir):
    """The close has about two seconds left when it cancels: a worker silent to the cancel must not hold it (nor the
    batch's hand-back behind it) for the HTTP client's timeouts."""
    from hpcllm.gateway.server import QUICK_CLOSE_S

    worker = PoolingWorker(answers_cancel=False)
    with pooling_batch(worker, tmp_path, tiny_model_dir) as (gw, batch):
        closed = threading.Event()
        threading.Thread(target=lambda: (gw.state.close(QUICK_CLOSE_S), closed.set()), daemon=True).start()

        assert worker.cancel_asked.wait(30)
        assert closed.wait(30), "the close waited on the worker's answer to the cancel"
        assert not worker.cancel_answered.is_set()  # it closed while the cancel was still unanswered
        row = batch_row(gw)
        assert row["lease_holder"] is None and json.loads(row["batch"])["id"] == batch.id  # handed back
        assert row["status"] not in FINAL


def test_a_worker_older_than_call_ids_still_pools_a_batchs_embeddings(tmp_path, tiny_model_dir):
    """A rolling upgrade that reaches the gateway first: the old worker's request model forbids request_id (400
    naming it); the gateway asks again without one, and the batch's lines are answered, not failed; its next call
    goes without one at once (not the whole inputs sent twice again)."""
    bodies: list[dict] = []
    app = Flask("old-worker")

    @app.post(EMBED_PATH)
    def embed():
        body = json.loads(request.get_data())
        bodies.append(body)
        if "request_id" in body:  # as an old worker's extra='forbid' EmbedRequest answers
            error = ErrorResponse(error=ErrorInfo(message="request_id: Extra inputs are not permitted",
                                                  type="invalid_request_error", param="request_id",
                                                  code="invalid_request"))
            return Response(error.model_dump_json(), status=400, mimetype="application/json")
        return embedded(body)

    server = ThreadServer(app)
    factory = GatewayFactory(tmp_path, server.url, tiny_model_dir)
    try:
        client = factory(batch_concurrency=1).client()
        batch = submit(client, [{**EMBED_LINE, "custom_id": f"e{i}"} for i in range(2)], EMBEDDINGS)
        done = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status in FINAL and b, timeout_s=60)
        assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 2, 0)
        results = [json.loads(text) for text in client.files.content(done.output_file_id).text.splitlines()]
        assert [result["response"]["body"]["data"][0]["embedding"] for result in results] == [[1.0, 0.0]] * 2
        # The first line asked again without the id; the second without it at once
        assert ["request_id" in body for body in bodies] == [True, False, False]
    finally:
        factory.stop_all()
        server.stop()
