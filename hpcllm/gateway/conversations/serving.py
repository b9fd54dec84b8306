"""The Conversations API over the stored items (hpcllm.gateway.response_store): a conversation and its items
belong to the API key that made them; any other key is told they do not exist (404, as an unknown id)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from hpcllm.gateway.conversations.protocol import (ConversationCreate, ConversationItems, ConversationUpdate,
                                                   check_readable)
from hpcllm.gateway.errors import NotFound
from hpcllm.gateway.protocol import parse_query
from hpcllm.gateway.response_store import DuplicateItem, OverQuota, TooLarge, owner_of
from hpcllm.gateway.responses.protocol import (InputItem, InputItemsQuery, ItemList, annotated, check_unique_ids,
                                               duplicate_item)
from hpcllm.gateway.responses.serving import quota_error, referenced, storage_disabled, too_large
from hpcllm.gateway.runtime import Gateway
from hpcllm.gateway.serving import RequestContext


def _owner(gw: Gateway, ctx: RequestContext) -> str:
    if not gw.responses.enabled:
        raise storage_disabled()
    return owner_of(ctx.api_key)


def _not_found(conversation_id: str) -> NotFound:
    return NotFound(f"Conversation with id '{conversation_id[:100]}' not found.", param="conversation_id")


@contextmanager
def _bounded(param: str) -> Iterator[None]:
    """A write over the whole byte bound, or over the key's quota, or repeating an item id of the conversation's, as
    the 400 naming what was sent."""
    try:
        yield
    except TooLarge:
        raise too_large(param) from None
    except OverQuota as exc:
        raise quota_error(exc, param) from None
    except DuplicateItem as exc:
        raise duplicate_item(exc.item_id, f"{param}[{exc.place}]") from None


def _stored_items(gw: Gateway, owner: str, items: list[InputItem]) -> list[dict[str, Any]]:
    """The items as kept and listed (item_references replaced by the owner's items), checked as a response would
    read them, and for an id repeated among them (one of the conversation's: when they are added)."""
    items = referenced(gw, owner, items, "items")
    check_readable(items)
    check_unique_ids((), items, "items")
    return [item.listed() for item in items]


def create_conversation(gw: Gateway, ctx: RequestContext, req: ConversationCreate) -> dict[str, Any]:
    owner = _owner(gw, ctx)
    items = _stored_items(gw, owner, req.items)
    conversation = req.conversation(ctx.created).model_dump()
    with _bounded("items"):
        gw.responses.create_conversation(owner, conversation, items)
    return conversation


def get_conversation(gw: Gateway, ctx: RequestContext, conversation_id: str) -> dict[str, Any]:
    conversation = gw.responses.conversation(_owner(gw, ctx), conversation_id)
    if conversation is None:
        raise _not_found(conversation_id)
    return conversation


def update_conversation(gw: Gateway, ctx: RequestContext, conversation_id: str,
                        req: ConversationUpdate) -> dict[str, Any]:
    with _bounded("metadata"):
        updated = gw.responses.update_conversation(_owner(gw, ctx), conversation_id,
                                                   lambda body: {**body, "metadata": req.metadata or {}})
    if updated is None:
        raise _not_found(conversation_id)
    return updated


def delete_conversation(gw: Gateway, ctx: RequestContext, conversation_id: str) -> dict[str, Any]:
    if not gw.responses.delete_conversation(_owner(gw, ctx), conversation_id):
        raise _not_found(conversation_id)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


def add_items(gw: Gateway, ctx: RequestContext, conversation_id: str, req: ConversationItems) -> dict[str, Any]:
    owner = _owner(gw, ctx)
    items = _stored_items(gw, owner, req.items)
    with _bounded("items"):
        added = gw.responses.add_items(owner, conversation_id, items)
    if not added:
        raise _not_found(conversation_id)
    return ItemList.of(items, has_more=False).model_dump()


def list_items(gw: Gateway, ctx: RequestContext, conversation_id: str, query: Mapping[str, str]) -> dict[str, Any]:
    asked = parse_query(InputItemsQuery, query)
    items = gw.responses.conversation_items(_owner(gw, ctx), conversation_id)
    if items is None:
        raise _not_found(conversation_id)
    return asked.page(items)


def _item_not_found(item_id: str) -> NotFound:
    return NotFound(f"Item with id '{item_id[:100]}' not found.", param="item_id")


def get_item(gw: Gateway, ctx: RequestContext, conversation_id: str, item_id: str) -> dict[str, Any]:
    owner = _owner(gw, ctx)
    item = gw.responses.conversation_item(owner, conversation_id, item_id)
    if item is None:
        get_conversation(gw, ctx, conversation_id)  # which one is missing: the conversation, or its item
        raise _item_not_found(item_id)
    return annotated(item)


def delete_item(gw: Gateway, ctx: RequestContext, conversation_id: str, item_id: str) -> dict[str, Any]:
    """OpenAI's answer: the conversation."""
    deleted = gw.responses.delete_item(_owner(gw, ctx), conversation_id, item_id)
    if deleted is None:
        raise _not_found(conversation_id)
    if not deleted:
        raise _item_not_found(item_id)
    return get_conversation(gw, ctx, conversation_id)
