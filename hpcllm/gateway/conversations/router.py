"""Routes of the Conversations API: conversations (create, retrieve, update metadata, delete) and their items (add,
list, retrieve, delete)."""

from __future__ import annotations

from flask import Blueprint, request

from hpcllm.gateway.conversations import serving
from hpcllm.gateway.conversations.protocol import ConversationCreate, ConversationItems, ConversationUpdate
from hpcllm.gateway.protocol import parse_body
from hpcllm.gateway.responses.protocol import check_include_query
from hpcllm.gateway.runtime import current_gateway
from hpcllm.gateway.serving import RequestContext

bp = Blueprint("conversations", __name__)


@bp.post("/v1/conversations")
def create():
    return serving.create_conversation(current_gateway(), RequestContext.current(), parse_body(ConversationCreate))


@bp.get("/v1/conversations/<conversation_id>")
def retrieve(conversation_id: str):
    return serving.get_conversation(current_gateway(), RequestContext.current(), conversation_id)


@bp.post("/v1/conversations/<conversation_id>")
def update(conversation_id: str):
    return serving.update_conversation(current_gateway(), RequestContext.current(), conversation_id,
                                       parse_body(ConversationUpdate))


@bp.delete("/v1/conversations/<conversation_id>")
def delete(conversation_id: str):
    return serving.delete_conversation(current_gateway(), RequestContext.current(), conversation_id)


@bp.post("/v1/conversations/<conversation_id>/items")
def add_items(conversation_id: str):
    check_include_query(request.args)
    return serving.add_items(current_gateway(), RequestContext.current(), conversation_id,
                             parse_body(ConversationItems))


@bp.get("/v1/conversations/<conversation_id>/items")
def list_items(conversation_id: str):
    check_include_query(request.args)
    return serving.list_items(current_gateway(), RequestContext.current(), conversation_id, request.args)


@bp.get("/v1/conversations/<conversation_id>/items/<item_id>")
def get_item(conversation_id: str, item_id: str):
    check_include_query(request.args)
    return serving.get_item(current_gateway(), RequestContext.current(), conversation_id, item_id)


@bp.delete("/v1/conversations/<conversation_id>/items/<item_id>")
def delete_item(conversation_id: str, item_id: str):
    return serving.delete_item(current_gateway(), RequestContext.current(), conversation_id, item_id)
