"""Routes of the Files API: upload, list, retrieve, content, delete."""

from __future__ import annotations

from flask import Blueprint, request

from hpcllm.gateway.files import serving
from hpcllm.gateway.files.store import current_files
from hpcllm.gateway.response_store import owner_of
from hpcllm.gateway.serving import RequestContext

bp = Blueprint("files", __name__)


def _owner() -> str:
    return owner_of(RequestContext.current().api_key)


@bp.post("/v1/files")
def upload_file():
    return serving.upload(current_files(), _owner(), request).model_dump()


@bp.get("/v1/files")
def list_files():
    return serving.list_files(current_files(), _owner(), request.args).model_dump()


@bp.get("/v1/files/<file_id>")
def get_file(file_id: str):
    return serving.owned_file(current_files(), _owner(), file_id).wire().model_dump()


@bp.get("/v1/files/<file_id>/content")
def file_content(file_id: str):
    return serving.content(current_files(), _owner(), file_id)


@bp.delete("/v1/files/<file_id>")
def delete_file(file_id: str):
    return serving.delete(current_files(), _owner(), file_id).model_dump()
