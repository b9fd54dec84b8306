"""Stand-in workers for gateway tests: the generate API's NDJSON lines without a model, paced by the test."""

from __future__ import annotations

import threading
import time


def slow_worker_app(seconds_per_token: float):
    """A stand-in worker that streams one token per seconds_per_token: a generation that is still running when the
    gateway's drain time runs out."""
    return stand_in_worker_app("slow-worker", lambda index: time.sleep(seconds_per_token))


def stand_in_worker_app(name: str, after_token, finished: threading.Event | None = None):
    """A stand-in worker streaming the generate API's NDJSON lines: max_tokens tokens "x", after_token(index) called
    after each, then `finished` set and the final line."""
    from flask import Flask, Response, request

    from hpcllm.worker.protocol import GENERATE_PATH, FinalLine, GenerateRequest, TokenLine, Usage

    app = Flask(name)

    @app.post(GENERATE_PATH)
    def generate():
        req = GenerateRequest.model_validate_json(request.get_data())
        total = req.max_tokens or 16

        def lines():
            for index in range(total):
                yield TokenLine(index=index, token_id=100, text="x").model_dump_json() + "\n"
                after_token(index)
            usage = Usage(prompt_tokens=len(req.prompt_token_ids), completion_tokens=total,
                          total_tokens=len(req.prompt_token_ids) + total)
            if finished is not None:
                finished.set()
            yield FinalLine(finish_reason="length", usage=usage).model_dump_json() + "\n"

        return Response(lines(), mimetype="application/x-ndjson")

    @app.get("/ready")
    def ready():
        return {"status": "ready"}

    return app


def gated_worker_app(release: threading.Event, finished: threading.Event):
    """A stand-in worker that streams one token, then the rest once `release` is set (or after 20 s), then sets
    `finished`."""
    return stand_in_worker_app("gated-worker", lambda index: index == 0 and release.wait(20), finished)
