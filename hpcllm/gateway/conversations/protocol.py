"""Wire types of the Conversations API (OpenAI's: openai-python's types/conversations). Items are the Responses
API's input items (hpcllm.gateway.responses.protocol.InputItem), stored and listed in its item shape."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator

from hpcllm.gateway.protocol import OpenAIRequest, OpenAIResponse
from hpcllm.gateway.responses.protocol import InputItem, chat_messages, check_item_types, new_item_id

# OpenAI's bounds: items per request, metadata pairs and their lengths.
MAX_ITEMS = 20
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


def _checked_metadata(metadata: dict[str, str]) -> dict[str, str]:
    if len(metadata) > MAX_METADATA_PAIRS:
        raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise ValueError(f"keys are at most {MAX_METADATA_KEY} characters, values at most {MAX_METADATA_VALUE} "
                             f"({key[:MAX_METADATA_KEY]!r} is longer)")
    return metadata


Metadata = Annotated[dict[str, str], AfterValidator(_checked_metadata)]


def check_readable(items: list[InputItem]) -> None:
    """The 400s a response reading these items (item_references resolved) would give, now, naming `items[i]`."""
    check_item_types(items, "items")
    chat_messages(items, None, "items")


class ConversationItems(OpenAIRequest):
    """POST /v1/conversations/{id}/items: items to add at the end."""

    items: list[InputItem] = Field(min_length=1, max_length=MAX_ITEMS)


class ConversationCreate(OpenAIRequest):
    """POST /v1/conversations."""

    items: list[InputItem] = Field(default_factory=list, max_length=MAX_ITEMS)
    metadata: Metadata | None = None

    @field_validator("items", mode="before")
    @classmethod
    def _null_is_none(cls, value: Any) -> Any:
        return [] if value is None else value  # the openai client sends items=None as null

    def conversation(self, created: int) -> ConversationObject:
        return ConversationObject(id=new_item_id("conv"), created_at=created, metadata=self.metadata or {})


class ConversationUpdate(OpenAIRequest):
    """POST /v1/conversations/{id}: new metadata (replaces the old; null, which the openai client's type allows,
    clears it)."""

    metadata: Metadata | None


class ConversationObject(OpenAIResponse):
    id: str
    object: Literal["conversation"] = "conversation"
    created_at: int
    metadata: dict[str, Any] = Field(default_factory=dict)
