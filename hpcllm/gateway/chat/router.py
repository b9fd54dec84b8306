"""Route of the chat completions API."""

from __future__ import annotations

from flask import Blueprint

from hpcllm.gateway.chat.protocol import ChatCompletionRequest
from hpcllm.gateway.chat.serving import create_chat_completion
from hpcllm.gateway.protocol import parse_body
from hpcllm.gateway.ratelimit import uses_model
from hpcllm.gateway.runtime import current_gateway
from hpcllm.gateway.serving import RequestContext

bp = Blueprint("chat", __name__)


@bp.post("/v1/chat/completions")
@uses_model
def chat_completions():
    return create_chat_completion(current_gateway(), RequestContext.current(), parse_body(ChatCompletionRequest))
