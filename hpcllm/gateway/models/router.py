"""GET /v1/models and GET /v1/models/<id>: the deployed models in OpenAI's list shape."""

from __future__ import annotations

from flask import Blueprint

from hpcllm.gateway.protocol import ModelCardOut, ModelList
from hpcllm.gateway.routing import ModelCard
from hpcllm.gateway.runtime import current_gateway

bp = Blueprint("models", __name__)


def _out(card: ModelCard) -> ModelCardOut:
    return ModelCardOut(id=card.name, created=card.created, owned_by=card.owned_by, max_model_len=card.max_model_len,
                        root=card.name, parent=card.parent)


@bp.get("/v1/models")
def list_models():
    cards = sorted(current_gateway().router.list_models(), key=lambda c: c.name)
    return ModelList(data=[_out(card) for card in cards]).model_dump()


@bp.get("/v1/models/<path:model>")
def get_model(model: str):
    return _out(current_gateway().router.get_model(model)).model_dump()
