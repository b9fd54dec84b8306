"""Routes of the Batch API: create, retrieve, list, cancel."""

from __future__ import annotations

from flask import Blueprint, request

from hpcllm.gateway.batches import serving
from hpcllm.gateway.batches.protocol import CreateBatchRequest
from hpcllm.gateway.batches.service import current_batches
from hpcllm.gateway.protocol import parse_body
from hpcllm.gateway.response_store import owner_of
from hpcllm.gateway.serving import RequestContext

bp = Blueprint("batches", __name__)


def _owner() -> str:
    return owner_of(RequestContext.current().api_key)


@bp.post("/v1/batches")
def create_batch():
    return serving.create(current_batches(), _owner(), parse_body(CreateBatchRequest)).model_dump()


@bp.get("/v1/batches")
def list_batches():
    return serving.list_batches(current_batches(), _owner(), request.args).model_dump()


@bp.get("/v1/batches/<batch_id>")
def get_batch(batch_id: str):
    return serving.owned_batch(current_batches(), _owner(), batch_id).model_dump()


@bp.post("/v1/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    return serving.cancel(current_batches(), _owner(), batch_id).model_dump()
