"""Route of the embeddings API."""

from __future__ import annotations

from flask import Blueprint

from hpcllm.gateway.embeddings.protocol import EmbeddingRequest
from hpcllm.gateway.embeddings.serving import create_embedding
from hpcllm.gateway.protocol import parse_body
from hpcllm.gateway.ratelimit import uses_model
from hpcllm.gateway.runtime import current_gateway
from hpcllm.gateway.serving import RequestContext

bp = Blueprint("embeddings", __name__)


@bp.post("/v1/embeddings")
@uses_model
def embeddings():
    return create_embedding(current_gateway(), RequestContext.current(), parse_body(EmbeddingRequest))
