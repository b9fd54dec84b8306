"""Routes of the scoring APIs, at vLLM's paths: /v1/score (and /score), /v1/rerank, /v2/rerank (and /rerank).
Two blueprints, so usage accounting tells scores from reranks."""

from __future__ import annotations

from flask import Blueprint

from hpcllm.gateway.protocol import parse_body
from hpcllm.gateway.ratelimit import uses_model
from hpcllm.gateway.runtime import current_gateway
from hpcllm.gateway.score.protocol import RerankRequest, ScoreRequest
from hpcllm.gateway.score.serving import create_rerank, create_score
from hpcllm.gateway.serving import RequestContext

score_bp = Blueprint("score", __name__)
rerank_bp = Blueprint("rerank", __name__)


@score_bp.post("/v1/score")
@score_bp.post("/score")
@uses_model
def score():
    return create_score(current_gateway(), RequestContext.current(), parse_body(ScoreRequest))


@rerank_bp.post("/v1/rerank")
@rerank_bp.post("/v2/rerank")
@rerank_bp.post("/rerank")
@uses_model
def rerank():
    return create_rerank(current_gateway(), RequestContext.current(), parse_body(RerankRequest))
