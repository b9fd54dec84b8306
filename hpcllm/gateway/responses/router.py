"""Routes of the Responses API: create, and the stored responses' retrieve, delete, input items and cancel."""

from __future__ import annotations

from flask import Blueprint, request

from hpcllm.gateway.protocol import parse_body, unsupported
from hpcllm.gateway.ratelimit import uses_model
from hpcllm.gateway.responses.protocol import ResponsesRequest, check_include_query
from hpcllm.gateway.responses.serving import (cancel_response, create_response, delete_response, list_input_items,
                                              stored_response)
from hpcllm.gateway.runtime import current_gateway
from hpcllm.gateway.serving import RequestContext

bp = Blueprint("responses", __name__)


@bp.post("/v1/responses")
@uses_model
def responses():
    return create_response(current_gateway(), RequestContext.current(), parse_body(ResponsesRequest))


@bp.get("/v1/responses/<response_id>")
def get_response(response_id: str):
    if request.args.get("stream", "false").lower() not in ("false", "0"):
        raise unsupported("stream", "replaying a stored response as events (leave out 'stream')")
    check_include_query(request.args)
    return stored_response(current_gateway(), RequestContext.current(), response_id).response


@bp.delete("/v1/responses/<response_id>")
def remove_response(response_id: str):
    return delete_response(current_gateway(), RequestContext.current(), response_id)


@bp.get("/v1/responses/<response_id>/input_items")
def input_items(response_id: str):
    check_include_query(request.args)
    return list_input_items(current_gateway(), RequestContext.current(), response_id, request.args)


@bp.post("/v1/responses/<response_id>/cancel")
def cancel(response_id: str):
    return cancel_response(current_gateway(), RequestContext.current(), response_id)
