"""A service's Flask app: its blueprints, the one error shape, a bound on request bodies."""

from __future__ import annotations

from collections.abc import Iterable

from flask import Blueprint, Flask

from hpcllm.httpkit.errors import install_error_handlers


def service_app(name: str, blueprints: Iterable[Blueprint], *, max_request_bytes: int | None = None) -> Flask:
    """A Flask app serving `blueprints`, answering every error as {"error": {...}}; bodies above max_request_bytes
    are a 413 before they are read."""
    app = Flask(name)
    if max_request_bytes is not None:
        app.config["MAX_CONTENT_LENGTH"] = max_request_bytes
    install_error_handlers(app)
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    return app
