"""Stand-in workers for gateway tests: the generate API's NDJSON lines without a model, paced by the test."""

from __future__ import annotations

import contextlib
import threading
import time


class InFlight:
    """How many generations a stand-in worker is streaming now, and the most it streamed at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self.now = 0
        self.most = 0

    def __enter__(self) -> None:  # a generation starts
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc_info) -> None:  # and ends
        with self._lock:
            self.now -= 1


def slow_worker_app(seconds_per_token: float, in_flight: InFlight | None = None):
    """A stand-in worker that streams one token per seconds_per_token: a generation that is still running when the
    gateway's drain time runs out. in_flight: counts its generations running at once."""
    return stand_in_worker_app("slow-worker", lambda index: time.sleep(seconds_per_token), in_flight=in_flight)


def stand_in_worker_app(name: str, after_token, finished: threading.Event | None = None, fail_with: str | None = None,
                        received: list | None = None, in_flight: InFlight | None = None,
                        queued_until: threading.Event | None = None):
    """A stand-in worker streaming the generate API's NDJSON lines: max_tokens tokens "x", after_token(index) called
    after each, then `finished` set and the final line (with fail_with: a final "error" line with that message, as a
    request its engine could not go on with). received: each GenerateRequest is appended to it. in_flight: counts
    each generation from its first line until its stream ends (finished or its client gone). queued_until: each
    request waits for a slot until it is set, sending the worker's keep-alive lines (blank) meanwhile."""
    from flask import Flask, Response, request

    from hpcllm.worker.protocol import GENERATE_PATH, ErrorInfo, FinalLine, GenerateRequest, TokenLine, Usage

    app = Flask(name)

    @app.post(GENERATE_PATH)
    def generate():
        req = GenerateRequest.model_validate_json(request.get_data())
        if received is not None:
            received.append(req)
        total = req.max_tokens or 16

        def lines():
            with in_flight if in_flight is not None else contextlib.nullcontext():
                while queued_until is not None and not queued_until.wait(0.05):
                    yield "\n"  # waiting for a slot: a keep-alive, as the worker sends every keepalive_seconds
                for index in range(total):
                    yield TokenLine(index=index, token_id=100, text="x").model_dump_json() + "\n"
                    after_token(index)
                usage = Usage(prompt_tokens=len(req.prompt_token_ids), completion_tokens=total,
                              total_tokens=len(req.prompt_token_ids) + total)
                if finished is not None:
                    finished.set()
                if fail_with is not None:
                    error = ErrorInfo(message=fail_with, type="internal_error")
                    yield FinalLine(finish_reason="error", usage=usage, error=error).model_dump_json() + "\n"
                    return
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


def token_pieces(tokenizer, text: str, skip_special_tokens: bool = False,
                 prompt_ids: list[int] | tuple[int, ...] = ()) -> list[tuple[int, str]]:
    """`text` as a worker streams it after `prompt_ids`: each token's id and the text it adds, by the worker's own
    detokenizer (hpcllm.worker.detokenizer: the prompt's last tokens as context; a token that ends inside a character
    adds nothing, the character coming whole with the token that ends it); skip_special_tokens: as a worker decodes
    (a special token adds no text)."""
    from hpcllm.worker.detokenizer import IncrementalDetokenizer, prompt_context

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    context = prompt_context(decode, prompt_ids)
    detokenizer = IncrementalDetokenizer(decode, context=context)
    pieces = [(token_id, detokenizer.add(token_id)) for token_id in ids]
    if pieces:
        pieces[-1] = (pieces[-1][0], pieces[-1][1] + detokenizer.flush())
    assert "".join(piece for _, piece in pieces) == decode(context + ids)[len(decode(context)):]
    return pieces


class Script:
    """What a scripted worker answers: `answer` (set by the test before its request), token by token; the prompts
    of the requests it was sent, and the requests, in order."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.answer = ""
        self.prompts: list[list[int]] = []
        self.requests: list = []  # GenerateRequest


def scripted_worker_app(script: Script):
    """A stand-in worker answering every request with script.answer, one token line per token (cut at max_tokens:
    finish_reason "length", else "stop"; a special token's line without its text, as workers decode; asked for
    logprobs, each token's is 0: the answer is certain), each request's prompt recorded in script.prompts."""
    from flask import Flask, Response, request

    from hpcllm.worker.protocol import GENERATE_PATH, FinalLine, GenerateRequest, TokenLine, TokenLogprobs, Usage

    app = Flask("scripted-worker")

    @app.post(GENERATE_PATH)
    def generate():
        req = GenerateRequest.model_validate_json(request.get_data())
        script.prompts.append(list(req.prompt_token_ids))
        script.requests.append(req)
        pieces = token_pieces(script.tokenizer, script.answer, skip_special_tokens=True,
                              prompt_ids=req.prompt_token_ids)
        sent = pieces[:req.max_tokens] if req.max_tokens is not None else pieces

        def lines():
            for index, (token_id, text) in enumerate(sent):
                logprobs = (None if req.logprobs is None else
                            TokenLogprobs(token=script.tokenizer.decode([token_id]), logprob=0.0))
                yield TokenLine(index=index, token_id=token_id, text=text, logprobs=logprobs).model_dump_json() + "\n"
            usage = Usage(prompt_tokens=len(req.prompt_token_ids), completion_tokens=len(sent),
                          total_tokens=len(req.prompt_token_ids) + len(sent))
            finish = "length" if len(sent) < len(pieces) else "stop"
            yield FinalLine(finish_reason=finish, usage=usage).model_dump_json() + "\n"

        return Response(lines(), mimetype="application/x-ndjson")

    @app.get("/ready")
    def ready():
        return {"status": "ready"}

    return app
