"""The gateway's Prometheus metrics as an operator reads them: what a user's requests can and cannot add to them."""

from __future__ import annotations

import httpx

from ..batches import serving as batch_serving
from .conftest import MODEL
from .test_batches_api import completion_line, finished, submit


def test_a_batch_naming_a_model_that_does_not_exist_adds_no_series_of_that_name(make_gateway, monkeypatch):
    """A batch's model is whatever its file's lines name: one a user made up (any string, any length) fails every
    request, counted without it as a label, so users cannot grow the metrics by a series per invented name. Such a
    batch is refused when it is made where the gateway can ask which models it serves; it runs where the controller
    could not say then (batches.serving._check_model), as here."""
    monkeypatch.setattr(batch_serving, "_check_model", lambda service, parsed: None)
    gw = make_gateway()
    client = gw.client()
    invented = "no-such-model-" + "x" * 200
    lines = [{**line, "body": {**line["body"], "model": invented}} for line in map(completion_line, ("a", "b"))]
    done = finished(client, submit(client, lines, endpoint="/v1/completions").id)
    real = finished(client, submit(client, [completion_line("c")], endpoint="/v1/completions").id)

    assert (done.request_counts.failed, real.request_counts.completed) == (2, 1)
    text = httpx.get(f"{gw.url}/metrics").text
    assert invented not in text
    assert 'hpcllm_batch_requests_total{model_name="",status="failed"} 2.0' in text
    assert f'hpcllm_batch_requests_total{{model_name="{MODEL}",status="completed"}} 1.0' in text
