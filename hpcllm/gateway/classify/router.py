"""Route of the classification API (vLLM's /classify and /v1/classify)."""

from __future__ import annotations

from flask import Blueprint

from hpcllm.gateway.classify.protocol import ClassificationRequest
from hpcllm.gateway.classify.serving import create_classification
from hpcllm.gateway.protocol import parse_body
from hpcllm.gateway.ratelimit import uses_model
from hpcllm.gateway.runtime import current_gateway
from hpcllm.gateway.serving import RequestContext

bp = Blueprint("classify", __name__)


@bp.post("/v1/classify")
@bp.post("/classify")
@uses_model
def classify():
    return create_classification(current_gateway(), RequestContext.current(), parse_body(ClassificationRequest))
