"""Wire types of the Files API (OpenAI's FileObject, its list and deletion answers)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hpcllm.gateway.files import EXPIRES_MAX_S, EXPIRES_MIN_S, PAGE_MAX
from hpcllm.gateway.protocol import ListPage, OpenAIRequest, OpenAIResponse

# What a client may upload a file for: batch inputs only (the other purposes serve APIs this gateway has not).
UPLOAD_PURPOSES = ("batch",)
# A batch's output and error files.
OUTPUT_PURPOSE = "batch_output"
# OpenAI's bound on one page of the file list, and its default.
FILES_PAGE_MAX = 10_000


class ExpiresAfter(OpenAIRequest):
    """When a file expires (OpenAI's expiration policy): `seconds` after its creation."""

    anchor: Literal["created_at"]
    seconds: int = Field(ge=EXPIRES_MIN_S, le=EXPIRES_MAX_S)


class UploadOptions(OpenAIRequest):
    """An upload's form fields besides the file and its purpose (the openai client sends expires_after[anchor] and
    expires_after[seconds])."""

    expires_after: ExpiresAfter | None = None


class FileObject(OpenAIResponse):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


FileList = ListPage[FileObject]


class FileDeleted(OpenAIResponse):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class PageQuery(OpenAIRequest):
    """A list's query (OpenAI's): `limit` items after the item `after`, newest first (a batch list's)."""

    limit: int = Field(20, ge=1, le=PAGE_MAX)
    after: str | None = None

    @property
    def newest_first(self) -> bool:
        return True


class ListQuery(PageQuery):
    """The file list's query: up to 10,000 items, newest first (order desc) or oldest first, of one purpose. All
    10,000 by default, as OpenAI's: the openai client's pager asks for the next page after the last file of the one
    before, which a clean-up loop (delete each file as it is listed) has deleted by then."""

    limit: int = Field(FILES_PAGE_MAX, ge=1, le=FILES_PAGE_MAX)
    order: Literal["asc", "desc"] = "desc"
    purpose: str | None = None

    @property
    def newest_first(self) -> bool:
        return self.order == "desc"
