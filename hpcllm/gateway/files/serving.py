"""The Files API's answers: upload, list, retrieve, content, delete (the key's own files only)."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator, Mapping
from typing import IO
from urllib.parse import quote

from flask import Request, Response

from hpcllm.gateway.errors import InvalidRequest, NotFound
from hpcllm.gateway.files import MULTIPART_OVERHEAD
from hpcllm.gateway.files.protocol import (UPLOAD_PURPOSES, FileDeleted, FileList, FileObject, ListQuery,
                                           UploadOptions)
from hpcllm.gateway.files.store import COPY_CHUNK, FileStore, StoredFile
from hpcllm.gateway.protocol import parse_query
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
    options = _upload_options(request.form)
    seconds = options.expires_after.seconds if options.expires_after else None
    return files.save(owner, _filename(sent.filename), purpose, sent.stream, seconds).wire()


def _filename(sent: str | None) -> str:
    """The upload's name without control characters (a newline sent as filename*=UTF-8''a%0Ab would make every
    download's Content-Disposition header one the server refuses)."""
    name = "".join(char for char in sent or "" if unicodedata.category(char) != "Cc").strip()
    return name or "upload.jsonl"


def _upload_options(form: Mapping[str, str]) -> UploadOptions:
    expires_after = {field: form[f"expires_after[{field}]"] for field in ("anchor", "seconds")
                     if f"expires_after[{field}]" in form}
    return parse_query(UploadOptions, {"expires_after": expires_after or None})  # form values: strings too


def owned_file(files: FileStore, owner: str, file_id: str, param: str = "id") -> StoredFile:
    """The key's file; 404 for any id it cannot see (another key's too: its existence is not told)."""
    stored = files.get(owner, file_id)
    if stored is None:
        raise file_not_found(file_id, param)
    return stored


def file_not_found(file_id: str, param: str) -> NotFound:
    return NotFound(f"No such File object: {file_id[:80]}", param=param, code="file_not_found")


def list_files(files: FileStore, owner: str, args: Mapping[str, str]) -> FileList:
    rows, more = files.list(owner, parse_query(ListQuery, args))
    data = [row.wire() for row in rows]
    return FileList.of(data, more)


def content(files: FileStore, owner: str, file_id: str) -> Response:
    """The file's bytes, streamed from disk. Not flask.send_file: its response goes to the server as a bare file
    wrapper, whose end never runs the response's close callbacks (the in-flight count a drain waits on)."""
    stored = owned_file(files, owner, file_id)
    try:
        source = open(files.path(stored.id), "rb")
    except FileNotFoundError:  # deleted since it was looked up
        raise file_not_found(file_id, "id") from None
    response = Response(_read(source), mimetype="application/octet-stream")
    response.headers["Content-Length"] = str(stored.bytes)
    response.headers.set("Content-Disposition", "attachment", **_download_names(stored.filename))
    return response


def _download_names(filename: str) -> dict[str, str]:
    """Content-Disposition's filename (ASCII, as headers are Latin-1) and, for another name, RFC 5987's filename*
    (what flask.send_file sends)."""
    if filename.isascii():
        return {"filename": filename}
    plain = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode("ascii")
    return {"filename": plain, "filename*": f"UTF-8''{quote(filename, safe='!#$&+-.^_`|~')}"}


def _read(source: IO[bytes]) -> Iterator[bytes]:
    with source:
        yield from iter(lambda: source.read(COPY_CHUNK), b"")


def delete(files: FileStore, owner: str, file_id: str) -> FileDeleted:
    if not files.delete(owner, file_id):
        raise file_not_found(file_id, "id")
    return FileDeleted(id=file_id)
