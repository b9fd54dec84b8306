"""The gateway's WSGI application: `create_app(config)` (what gunicorn and the tests run)."""

from __future__ import annotations

from flask import Flask

from hpcllm.config import Config, load_config
from hpcllm.gateway import middleware
from hpcllm.gateway.admin.router import bp as admin_bp
from hpcllm.gateway.batches.router import bp as batches_bp
from hpcllm.gateway.batches.service import BatchService
from hpcllm.gateway.chat.router import bp as chat_bp
from hpcllm.gateway.classify.router import bp as classify_bp
from hpcllm.gateway.completions.router import bp as completions_bp
from hpcllm.gateway.conversations.router import bp as conversations_bp
from hpcllm.gateway.embeddings.router import bp as embeddings_bp
from hpcllm.gateway.files.router import bp as files_bp
from hpcllm.gateway.health.router import bp as health_bp
from hpcllm.gateway.models.router import bp as models_bp
from hpcllm.gateway.responses.router import bp as responses_bp
from hpcllm.gateway.routing import Router
from hpcllm.gateway.score.router import rerank_bp, score_bp
from hpcllm.gateway.status.router import bp as status_bp
from hpcllm.gateway.tokenize.router import bp as tokenize_bp
from hpcllm.gateway.runtime import EXTENSION_KEY, Gateway


def create_app(config: Config | None = None, *, router: Router | None = None) -> Flask:
    config = config or load_config()
    gateway = Gateway(config, router)
    app = Flask("hpcllm.gateway")
    app.config["MAX_CONTENT_LENGTH"] = config.gateway.max_request_bytes
    app.json.sort_keys = False
    app.json.compact = True
    app.extensions[EXTENSION_KEY] = gateway
    middleware.install(app, gateway)
    for blueprint in (health_bp, models_bp, completions_bp, chat_bp, responses_bp, conversations_bp, embeddings_bp,
                      score_bp, rerank_bp, classify_bp, tokenize_bp, admin_bp, status_bp, files_bp, batches_bp):
        app.register_blueprint(blueprint)
    BatchService.install(app, gateway)
    return app


def gateway_of(app: Flask) -> Gateway:
    return app.extensions[EXTENSION_KEY]
