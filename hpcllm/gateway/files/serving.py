"""The Files API's answers: upload, list, retrieve, content, delete (the key's own files only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Request, send_file
from pydantic import ValidationError

from hpcllm.gateway.errors import InvalidRequest, NotFound
from hpcllm.gateway.files import MULTIPART_OVERHEAD
from hpcllm.gateway.files.protocol import UPLOAD_PURPOSES, FileDeleted, FileList, FileObject, ListQuery
from hpcllm.gateway.files.store import FileStore, StoredFile
from hpcllm.gateway.protocol import validation_error
from hpcllm.httpkit.errors import RequestTooLarge


def upload(files: FileStore, owner: str, request: Request) -> FileObject:
    """POST /v1/files (multipart/form-data: `file` and `purpose`)."""
    limit = files.max_bytes + MULTIPART_OVERHEAD
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(f"the upload is {request.content_length} bytes, more than the {files.max_bytes} "
                              f"bytes a file may be on this gateway (gateway.files_max_bytes)")
    request.max_content_length = limit  # instead of the JSON endpoints' max_request_bytes
    if not request.mimetype.startswith("multipart/form-data"):
        raise InvalidRequest("upload a file as multipart/form-data with the fields 'file' and 'purpose'",
                             code="invalid_request")
    purpose = request.form.get("purpose")
    if purpose is None:
        raise InvalidRequest("'purpose' is a required property", param="purpose", code="missing_field")
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(f"'purpose': {purpose[:40]!r} is not supported here; files are for batches "
                             f"(purpose {', '.join(UPLOAD_PURPOSES)})", param="purpose", code="invalid_value")
    sent = request.files.get("file")
    if sent is None:
        raise InvalidRequest("'file' is a required property (the file's part of the multipart form)",
                             param="file", code="missing_field")
    return files.save(owner, sent.filename or "upload.jsonl", purpose, sent.stream).wire()


def owned_file(files: FileStore, owner: str, file_id: str, param: str = "id") -> StoredFile:
    """The key's file; 404 for any id it cannot see (another key's too: its existence is not told)."""
    stored = files.get(owner, file_id)
    if stored is None:
        raise _not_found(file_id, param)
    return stored


def _not_found(file_id: str, param: str) -> NotFound:
    return NotFound(f"No such File object: {file_id[:80]}", param=param, code="file_not_found")


def list_files(files: FileStore, owner: str, args: Mapping[str, str]) -> FileList:
    rows, more = files.list(owner, list_query(args))
    data = [row.wire() for row in rows]
    return FileList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                    has_more=more)


def list_query(args: Mapping[str, str]) -> ListQuery:
    try:
        return ListQuery.model_validate(dict(args), strict=False)  # query values are strings
    except ValidationError as exc:
        raise validation_error(exc) from None


def content(files: FileStore, owner: str, file_id: str) -> Any:
    stored = owned_file(files, owner, file_id)
    return send_file(files.path(stored.id), mimetype="application/octet-stream", download_name=stored.filename,
                     conditional=False, etag=False)


def delete(files: FileStore, owner: str, file_id: str) -> FileDeleted:
    if not files.delete(owner, file_id):
        raise _not_found(file_id, "id")
    return FileDeleted(id=file_id)
