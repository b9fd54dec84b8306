"""The Batch API's answers: create (the input file checked at once: a bad file gives a failed batch naming its
lines), retrieve, list, cancel; the key's own batches only."""

from __future__ import annotations

import time
from collections.abc import Mapping

from hpcllm.gateway.batches import ENDPOINTS
from hpcllm.gateway.batches.input_file import MAX_LISTED_ERRORS, ParsedInput, parse_input
from hpcllm.gateway.batches.protocol import (COMPLETION_WINDOWS, METADATA_MAX_KEY, METADATA_MAX_PAIRS,
                                             METADATA_MAX_VALUE, BatchErrors, BatchList, BatchObject,
                                             CreateBatchRequest, LineError, RequestCounts)
from hpcllm.gateway.batches.service import BatchService
from hpcllm.gateway.batches.store import new_batch_id
from hpcllm.gateway.errors import InvalidRequest, ModelNotFound, NotFound, ServiceUnavailable
from hpcllm.gateway.files.protocol import PageQuery
from hpcllm.gateway.files.serving import file_not_found, owned_file
from hpcllm.gateway.protocol import parse_query


def create(service: BatchService, owner: str, req: CreateBatchRequest) -> BatchObject:
    _check_request(req)
    stored = owned_file(service.files, owner, req.input_file_id, param="input_file_id")
    if stored.purpose != "batch":
        raise InvalidRequest(f"the file {stored.id} was not uploaded for batches (its purpose is "
                             f"{stored.purpose!r}, not 'batch')", param="input_file_id", code="invalid_value")
    try:
        lines = service.files.read_lines(stored.id)
    except FileNotFoundError:  # deleted since it was looked up
        raise file_not_found(stored.id, "input_file_id") from None
    parsed = parse_input(lines, req.endpoint, service.config.gateway.batch_max_requests, keep_entries=False)
    _check_model(service, parsed)
    now = int(time.time())
    batch = BatchObject(id=new_batch_id(), endpoint=req.endpoint, model=parsed.model, input_file_id=stored.id,
                        completion_window=req.completion_window, status="in_progress", created_at=now,
                        in_progress_at=now, expires_at=now + COMPLETION_WINDOWS[req.completion_window],
                        request_counts=RequestCounts(total=parsed.count), metadata=req.metadata)
    if parsed.errors:
        batch = batch.model_copy(update={"status": "failed", "failed_at": now, "in_progress_at": None,
                                         "errors": BatchErrors(data=parsed.errors),
                                         "request_counts": RequestCounts()})
    output_ttl = req.output_expires_after.seconds if req.output_expires_after else None
    if not service.batches.insert(owner, batch, output_ttl):  # deleted (or expired) since it was read
        raise file_not_found(stored.id, "input_file_id")
    if batch.status == "in_progress":
        service.runner.look()
    else:
        service.metrics.batches_finished.labels(batch.status).inc()
    return batch


def _check_model(service: BatchService, parsed: ParsedInput) -> None:
    """A model the gateway does not serve is an error of the first line naming it, as a mismatched one: every request
    would be a 404 model_not_found, and the batch end 'completed'. When the controller cannot say now, each request's
    own answer does: the model list is asked without waiting out a controller outage as an interactive request does
    (wait=False), the batch's requests wait for the controller when they run."""
    if parsed.model is None:  # no line named one (a pooling endpoint's default model, or bad lines)
        return
    try:
        service.router.get_model(parsed.model, wait=False)
    except ModelNotFound as exc:
        parsed.errors.append(LineError(code=exc.code, line=parsed.model_line, param="body.model",
                                       message=exc.message))
        parsed.errors.sort(key=lambda error: error.line or 0)
        del parsed.errors[MAX_LISTED_ERRORS:]
    except ServiceUnavailable:  # the controller cannot say now: each request's own answer will
        return


def _check_request(req: CreateBatchRequest) -> None:
    if req.endpoint not in ENDPOINTS:
        raise InvalidRequest(f"'endpoint': {req.endpoint[:80]!r} is not supported; one of {', '.join(ENDPOINTS)}",
                             param="endpoint", code="invalid_value")
    if req.completion_window not in COMPLETION_WINDOWS:
        raise InvalidRequest(f"'completion_window': {req.completion_window[:20]!r} is not supported; one of "
                             f"{', '.join(COMPLETION_WINDOWS)}", param="completion_window", code="invalid_value")
    metadata = req.metadata or {}
    too_long = [key for key, value in metadata.items()
                if len(key) > METADATA_MAX_KEY or len(value) > METADATA_MAX_VALUE]
    if len(metadata) > METADATA_MAX_PAIRS or too_long:
        raise InvalidRequest(f"'metadata' may have at most {METADATA_MAX_PAIRS} pairs, keys of at most "
                             f"{METADATA_MAX_KEY} and values of at most {METADATA_MAX_VALUE} characters",
                             param="metadata", code="invalid_value")


def owned_batch(service: BatchService, owner: str, batch_id: str) -> BatchObject:
    """The key's batch; 404 for any id it cannot see (another key's too)."""
    row = service.batches.get(owner, batch_id)
    if row is None:
        raise _not_found(batch_id)
    return row.batch


def list_batches(service: BatchService, owner: str, args: Mapping[str, str]) -> BatchList:
    rows, more = service.batches.list(owner, parse_query(PageQuery, args))
    data = [row.batch for row in rows]
    return BatchList.of(data, more)


def cancel(service: BatchService, owner: str, batch_id: str) -> BatchObject:
    batch = service.batches.cancel(owner, batch_id)
    if batch is None:
        raise _not_found(batch_id)
    service.runner.wake(batch_id)  # its run here renews at once; one nobody runs is ended as cancelled at a claim
    return batch


def _not_found(batch_id: str) -> NotFound:
    return NotFound(f"No batch found with id {batch_id[:80]!r}", param="batch_id", code="batch_not_found")
