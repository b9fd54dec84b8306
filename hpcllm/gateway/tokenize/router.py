"""Routes of the tokenize API (at the root, not under /v1, as vLLM serves them)."""

from __future__ import annotations

from flask import Blueprint

from hpcllm.gateway.protocol import parse_body
from hpcllm.gateway.runtime import current_gateway
from hpcllm.gateway.tokenize.protocol import DetokenizeRequest, TokenizeRequest
from hpcllm.gateway.tokenize.serving import detokenize, tokenize

bp = Blueprint("tokenize", __name__)


@bp.post("/tokenize")
def tokenize_route():
    return tokenize(current_gateway(), parse_body(TokenizeRequest))


@bp.post("/detokenize")
def detokenize_route():
    return detokenize(current_gateway(), parse_body(DetokenizeRequest))
