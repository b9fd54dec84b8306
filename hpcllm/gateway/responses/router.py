"""Route of the Responses API."""

from __future__ import annotations

from flask import Blueprint

from hpcllm.gateway.protocol import parse_body
from hpcllm.gateway.responses.protocol import ResponsesRequest
from hpcllm.gateway.responses.serving import create_response
from hpcllm.gateway.runtime import current_gateway
from hpcllm.gateway.serving import RequestContext

bp = Blueprint("responses", __name__)


@bp.post("/v1/responses")
def responses():
    return create_response(current_gateway(), RequestContext.current(), parse_body(ResponsesRequest))
