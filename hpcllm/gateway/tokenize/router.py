"""Routes of the tokenize API (at the root, not under /v1, as vLLM serves them)."""

from __future__ import annotations

from flask import Blueprint, request

from hpcllm.gateway.protocol import parse_body
from hpcllm.gateway.ratelimit import uses_model
from hpcllm.gateway.runtime import current_gateway
from hpcllm.gateway.tokenize.protocol import DetokenizeRequest, TokenizeRequest
from hpcllm.gateway.tokenize.serving import detokenize, tokenize, tokenizer_info

bp = Blueprint("tokenize", __name__)


@bp.post("/tokenize")
@uses_model
def tokenize_route():
    return tokenize(current_gateway(), parse_body(TokenizeRequest))


@bp.post("/detokenize")
@uses_model
def detokenize_route():
    return detokenize(current_gateway(), parse_body(DetokenizeRequest))


@bp.get("/tokenizer_info")
@uses_model
def tokenizer_info_route():
    # A model request, though a read: it loads the model's tokenizer (8 kept, one load at a time per process), so a
    # key cycling ?model= through more models than that would make other users' first requests wait on its loads.
    # The model as a query parameter (?model=NAME): a GET has no body; vLLM's takes none, serving one model.
    return tokenizer_info(current_gateway(), request.args.get("model"))
