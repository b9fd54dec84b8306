"""Route of the completions API."""

from __future__ import annotations

from flask import Blueprint

from hpcllm.gateway.completions.protocol import CompletionRequest
from hpcllm.gateway.completions.serving import create_completion
from hpcllm.gateway.protocol import parse_body
from hpcllm.gateway.ratelimit import uses_model
from hpcllm.gateway.runtime import current_gateway
from hpcllm.gateway.serving import RequestContext

bp = Blueprint("completions", __name__)


@bp.post("/v1/completions")
@uses_model
def completions():
    return create_completion(current_gateway(), RequestContext.current(), parse_body(CompletionRequest))
