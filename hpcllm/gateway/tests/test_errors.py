"""Bad requests get the documented status and OpenAI error body, and the server keeps serving afterwards."""

from __future__ import annotations

import json

import httpx
import pytest

from hpcllm.gateway.chat.protocol import ChatCompletionRequest
from hpcllm.gateway.completions.protocol import CompletionRequest
from hpcllm.gateway.errors import see_the_log
from hpcllm.gateway.routing import Router

from .conftest import ADMIN_KEY, MODEL, USER_KEY

GOOD = {"model": MODEL, "prompt": "hello", "max_tokens": 2}


def assert_error(resp: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert resp.headers.get("X-Request-Id")
    return error


def assert_still_serving(gateway) -> None:
    resp = gateway.post("/v1/completions", json=GOOD)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_malformed_json_is_400(gateway, body):
    resp = gateway.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert_error(resp, 400, "invalid_json")
    assert_still_serving(gateway)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/embeddings"])
@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_body_not_sent_as_json_is_400_saying_what_to_send(gateway, path, content_type):
    # curl -d without -H sends a JSON text as form data: refused (as vLLM does), not parsed anyway.
    headers = {"Content-Type": content_type} if content_type else {}
    resp = gateway.post(path, content=json.dumps(GOOD), headers=headers)
    error = assert_error(resp, 400, "unsupported_media_type")
    assert "Content-Type: application/json" in error["message"]
    assert_still_serving(gateway)


def test_a_json_content_type_with_parameters_is_accepted(gateway):
    resp = gateway.post("/v1/completions", content=json.dumps(GOOD),
                        headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi"}, "model"),
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/chat/completions", {"model": MODEL}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "hi"}]}, "messages[0].role"),
])
def test_missing_fields_are_400_naming_the_field(gateway, path, body, param):
    assert_error(gateway.post(path, json=body), 400, "missing_field", param)
    assert_still_serving(gateway)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {**GOOD, "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": -1}, "max_tokens"),  # 0 is a 400 without echo (test_echo.py)
    ("/v1/completions", {**GOOD, "temperature": 5}, "temperature"),
    ("/v1/completions", {**GOOD, "stream": "yes"}, "stream"),
    ("/v1/completions", {**GOOD, "prompt": 5}, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": []}, "prompt"),
    ("/v1/completions", {**GOOD, "stop": [1]}, "stop"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
     "messages[0].role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "system", "content": None},
                                                           {"role": "user", "content": "hi"}]}, "messages[0].content"),
])
def test_wrong_types_and_out_of_range_values_are_422(gateway, path, body, param):
    assert_error(gateway.post(path, json=body), 422, "invalid_value", param)
    assert_still_serving(gateway)


def test_422_messages_say_what_is_expected(gateway):
    error = assert_error(gateway.post("/v1/completions", json={**GOOD, "prompt": 5}), 422, "invalid_value")
    assert error["message"] == ("invalid value for 'prompt': prompt must be a string, a list of strings, a list of "
                                "token ids, or a list of lists of token ids")
    error = assert_error(gateway.post("/v1/completions", json={**GOOD, "max_tokens": "ten"}), 422, "invalid_value")
    assert "valid integer" in error["message"]


@pytest.mark.parametrize("extra, param", [
    ({"suffix": "x"}, "suffix"), ({"best_of": 3, "n": 2, "stream": True}, "best_of"),
    # vLLM's extensions that would change the output (they were silently ignored)
    ({"min_tokens": 5}, "min_tokens"),
    ({"include_stop_str_in_output": True, "stop": ["a"]}, "include_stop_str_in_output"),
    ({"include_stop_str_in_output": True, "stop_token_ids": [7]}, "include_stop_str_in_output"),
    ({"skip_special_tokens": False}, "skip_special_tokens"),
    ({"bad_words": ["hello"]}, "bad_words"),
    ({"allowed_token_ids": [7, 8]}, "allowed_token_ids"),
    ({"logprob_token_ids": [7], "logprobs": 1}, "logprob_token_ids"),
    ({"return_tokens_as_token_ids": True, "logprobs": 1}, "return_tokens_as_token_ids"),
    ({"use_beam_search": True, "length_penalty": 0.5}, "use_beam_search"),
    ({"return_token_ids": True}, "return_token_ids"),
    ({"repetition_detection": {"max_pattern_size": 4, "min_count": 3}}, "repetition_detection"),
])
def test_unsupported_parameters_are_400(gateway, extra, param):
    assert_error(gateway.post("/v1/completions", json={**GOOD, **extra}), 400, "unsupported_parameter", param)


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


@pytest.mark.parametrize("extra, param", [
    ({"include_stop_str_in_output": True, "stop": ["a"]}, "include_stop_str_in_output"),
    ({"skip_special_tokens": False}, "skip_special_tokens"),
    ({"bad_words": ["hello"]}, "bad_words"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"echo": True}, "echo"),  # vLLM's chat echo: the last message repeated at the answer's start
    ({"return_token_ids": True}, "return_token_ids"),
    ({"repetition_detection": {"max_pattern_size": 4, "min_count": 3}}, "repetition_detection"),
])
def test_unsupported_chat_parameters_are_400(gateway, extra, param):
    assert_error(gateway.post("/v1/chat/completions", json={**CHAT, **extra}), 400, "unsupported_parameter", param)


def neutral_fields(request_type) -> dict:
    """Every vLLM extension the request type refuses, at its neutral value (a client sending every field)."""
    return {name: neutral for name, (neutral, *_) in request_type.unimplemented_parameters.items()}


@pytest.mark.parametrize("path, extra", [
    # vLLM's no-ops: no stop string or token to include; the special tokens skipped, so no spaces between them; no
    # logprobs to write as token ids; a length penalty without beam search
    ("/v1/completions", {"include_stop_str_in_output": True}),
    ("/v1/chat/completions", {"include_stop_str_in_output": True}),
    ("/v1/completions", {"spaces_between_special_tokens": False}),
    ("/v1/completions", {"return_tokens_as_token_ids": True}),
    ("/v1/chat/completions", {"return_tokens_as_token_ids": True, "logprobs": False}),
    ("/v1/completions", {"length_penalty": 0.5}),
    ("/v1/chat/completions", {"repetition_detection": {"max_pattern_size": 0}}),  # vLLM's off
    # vLLM's watermark comes from the server's config, and without one (hpcllm has none) true answers unmarked
    ("/v1/completions", {"watermarking": True}),
    ("/v1/chat/completions", {"watermarking": True}),
])
def test_vllm_parameters_that_change_nothing_here_are_accepted(gateway, path, extra):
    body = GOOD if path == "/v1/completions" else CHAT
    resp = gateway.post(path, json={**body, **extra})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/completions", {"return_tokens_as_token_ids": True, "logprobs": 0}, "return_tokens_as_token_ids"),
    ("/v1/chat/completions", {"return_tokens_as_token_ids": True, "logprobs": True}, "return_tokens_as_token_ids"),
    ("/v1/completions", {"spaces_between_special_tokens": False, "skip_special_tokens": False},
     "skip_special_tokens"),
])
def test_vllm_parameters_refused_where_they_would_matter(gateway, path, extra, param):
    body = GOOD if path == "/v1/completions" else CHAT
    assert_error(gateway.post(path, json={**body, **extra}), 400, "unsupported_parameter", param)


def test_unknown_fields_are_ignored_and_defaults_accepted(gateway):
    resp = gateway.post("/v1/completions", json={**GOOD, "n": 1, "presence_penalty": 0, "some_new_field": 1,
                                                 "repetition_penalty": 1.0, "min_p": 0.0, "stop_token_ids": [],
                                                 "add_special_tokens": True, "length_penalty": 1.0,
                                                 **neutral_fields(CompletionRequest)})
    assert resp.status_code == 200, resp.text
    resp = gateway.post("/v1/chat/completions", json={**CHAT, "add_special_tokens": False,
                                                      **neutral_fields(ChatCompletionRequest)})
    assert resp.status_code == 200, resp.text


def test_unknown_model_is_404(gateway):
    error = assert_error(gateway.post("/v1/completions", json={**GOOD, "model": "gpt-9"}), 404, "model_not_found",
                         "model")
    assert MODEL in error["message"]  # tells the caller what exists
    assert_error(gateway.get("/v1/models/gpt-9"), 404, "model_not_found")
    assert_still_serving(gateway)


def test_prompt_longer_than_the_context_is_400(gateway, tiny_model_dir):
    context = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    long_prompt = "hello world " * context
    assert_error(gateway.post("/v1/completions", json={**GOOD, "prompt": long_prompt}), 400,
                 "context_length_exceeded")
    error = assert_error(gateway.post("/v1/completions", json={**GOOD, "max_tokens": context}), 400,
                         "context_length_exceeded", "max_tokens")
    assert f"maximum context length is {context} tokens" in error["message"]
    assert_error(gateway.post("/v1/completions", json={**GOOD, "prompt": [5, 99999]}), 400, "invalid_token_id")
    assert_still_serving(gateway)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_chat_completion_longer_than_the_context_names_the_field_sent(gateway, tiny_model_dir, field):
    context = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], field: context}
    error = assert_error(gateway.post("/v1/chat/completions", json=body), 400, "context_length_exceeded", field)
    assert "max_tokens" not in error["message"].replace(field, "")  # the field the client did not send: not named


def test_missing_and_bad_keys_are_401_and_probes_stay_open(gateway):
    assert_error(gateway.post("/v1/completions", key=None, json=GOOD), 401, "missing_api_key")
    assert_error(gateway.post("/v1/completions", key="sk-wrong", json=GOOD), 401, "invalid_api_key")
    assert_error(gateway.get("/v1/models", key="sk-wrong"), 401, "invalid_api_key")
    wrong = assert_error(gateway.post("/v1/completions", key="sk-wrong-key", json=GOOD), 401, "invalid_api_key")
    assert "sk-...ey" in wrong["message"] and "wrong" not in wrong["message"]  # recognisable, never echoed whole
    # A key pasted with non-ASCII characters (UTF-8 bytes, read as Latin-1 by HTTP) is named as such, not echoed
    # garbled.
    utf8_key = {"Authorization": "Bearer sk-clé-du-labo".encode()}
    garbled = assert_error(gateway.post("/v1/completions", key=None, headers=utf8_key, json=GOOD), 401,
                           "invalid_api_key")
    assert "printable ASCII" in garbled["message"] and "Ã" not in garbled["message"]
    # Admin endpoints need the admin key, not a user key.
    assert_error(gateway.get("/v1/admin/status", key=USER_KEY), 401, "invalid_admin_key")
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{gateway.url}{path}").status_code == 200
    assert_still_serving(gateway)


def test_admin_api_without_a_controller_says_so(gateway):
    assert_error(gateway.get("/v1/admin/status", key=ADMIN_KEY), 501, "not_available")


def test_request_limit_is_429_with_retry_after_per_key(make_gateway):
    gw = make_gateway(api_keys=[{"key": USER_KEY, "requests_per_minute": 2}, {"key": "sk-other"}])
    assert gw.post("/v1/completions", json=GOOD).status_code == 200
    assert_error(gw.post("/v1/completions", json={**GOOD, "max_tokens": -1}), 422, "invalid_value")  # counted too
    resp = gw.post("/v1/completions", json=GOOD)
    assert_error(resp, 429, "rate_limit_exceeded")
    assert 20 <= int(resp.headers["Retry-After"]) <= 30  # one request refills every 30 s
    assert gw.post("/v1/completions", json=GOOD, key="sk-other").status_code == 200  # limits are per key
    for path, body in (("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/embeddings", {"model": MODEL, "input": "hi"}), ("/tokenize", {"prompt": "hi"})):
        assert_error(gw.post(path, json=body), 429, "rate_limit_exceeded")
    # /tokenizer_info loads the model's tokenizer (?model= cycling through models would make others wait): counted.
    assert_error(gw.get(f"/tokenizer_info?model={MODEL}"), 429, "rate_limit_exceeded")
    # The models are reads, not model requests: they stay readable.
    for path in ("/v1/models", f"/v1/models/{MODEL}"):
        assert gw.get(path).status_code == 200, path


# Every route of the gateway, by whether it uses a model (takes one of the key's requests per minute: @uses_model).
MODEL_ROUTES = {
    "POST /v1/completions", "POST /v1/chat/completions", "POST /v1/responses", "POST /v1/embeddings",
    "POST /v1/score", "POST /score", "POST /v1/rerank", "POST /v2/rerank", "POST /rerank", "POST /v1/classify",
    "POST /classify", "POST /tokenize", "POST /detokenize", "GET /tokenizer_info",
}
OTHER_ROUTES = {
    "GET /health", "GET /ready", "GET /metrics", "GET /status", "GET /static/<path:filename>", "GET /v1/status",
    "GET /v1/models", "GET /v1/models/<path:model>",
    "POST /v1/files", "GET /v1/files", "GET /v1/files/<file_id>", "DELETE /v1/files/<file_id>",
    "GET /v1/files/<file_id>/content",
    "POST /v1/batches", "GET /v1/batches", "GET /v1/batches/<batch_id>", "POST /v1/batches/<batch_id>/cancel",
    "GET /v1/responses/<response_id>", "DELETE /v1/responses/<response_id>",
    "GET /v1/responses/<response_id>/input_items", "POST /v1/responses/<response_id>/cancel",
    "POST /v1/conversations", "GET /v1/conversations/<conversation_id>", "POST /v1/conversations/<conversation_id>",
    "DELETE /v1/conversations/<conversation_id>", "POST /v1/conversations/<conversation_id>/items",
    "GET /v1/conversations/<conversation_id>/items", "GET /v1/conversations/<conversation_id>/items/<item_id>",
    "DELETE /v1/conversations/<conversation_id>/items/<item_id>",
    "POST /v1/load_lora_adapter", "POST /v1/unload_lora_adapter",
    *(f"{method} /v1/admin/{rest}" for method in ("GET", "POST", "PUT", "PATCH", "DELETE")
      for rest in ("usage", "<path:rest>")),
}


def test_every_route_is_counted_or_not_by_choice(gateway):
    """A route left unmarked takes nothing from a key's requests per minute: a new route that uses a model must be
    marked @uses_model, and either way be added to one of the two lists above, so that is decided, not forgotten."""
    from hpcllm.gateway.ratelimit import counts_as_request

    routes = {(f"{method} {rule.rule}", counts_as_request(gateway.app.view_functions[rule.endpoint]))
              for rule in gateway.app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert {route for route, counted in routes if counted} == MODEL_ROUTES
    assert {route for route, counted in routes if not counted} == OTHER_ROUTES


def test_token_limit_reserves_max_tokens_and_refunds_what_was_not_generated(make_gateway):
    gw = make_gateway(api_keys=[{"key": USER_KEY, "tokens_per_minute": 40}])
    body = {**GOOD, "max_tokens": 30, "ignore_eos": True}
    first = gw.post("/v1/completions", json=body)
    assert first.status_code == 200, first.text
    resp = gw.post("/v1/completions", json=body)
    error = assert_error(resp, 429, "tokens_limit_exceeded")
    assert "40 tokens per minute" in error["message"]
    assert int(resp.headers["Retry-After"]) >= 30
    # Small requests still fit in what is left: the reservation was settled to what was really used.
    used = first.json()["usage"]["total_tokens"]
    small = {**GOOD, "max_tokens": 1}
    assert used + 1 + first.json()["usage"]["prompt_tokens"] <= 40
    assert gw.post("/v1/completions", json=small).status_code == 200


def test_body_over_the_size_limit_is_413(make_gateway):
    gw = make_gateway(max_request_bytes=2048)
    resp = gw.post("/v1/completions", content=json.dumps({**GOOD, "prompt": "x" * 4000}),
                   headers={"Content-Type": "application/json"})
    assert_error(resp, 413, "request_too_large")
    assert_still_serving(gw)
    # Chunked (no Content-Length): werkzeug stops reading at the limit without a word; the rest is not JSON to parse.
    body = json.dumps({**GOOD, "prompt": "x" * 4000}).encode()
    resp = gw.post("/v1/completions", content=iter([body[:1500], body[1500:]]),
                   headers={"Content-Type": "application/json"})
    assert_error(resp, 413, "request_too_large")
    small = json.dumps(GOOD).encode()
    assert gw.post("/v1/completions", content=iter([small[:10], small[10:]]),
                   headers={"Content-Type": "application/json"}).status_code == 200


def test_unknown_url_and_wrong_method_use_the_error_shape(gateway):
    assert_error(gateway.get("/v1/nothing-here"), 404, "unknown_url")
    assert_error(gateway.get("/v1/completions"), 405, "method_not_allowed")


def test_unreachable_worker_is_503_not_a_hang(make_gateway, tiny_model_dir):
    gw = make_gateway(static_models={MODEL: {"worker_url": "http://127.0.0.1:9", "source": str(tiny_model_dir)}},
                      upstream_connect_timeout_seconds=1)
    resp = gw.post("/v1/completions", json=GOOD)
    assert_error(resp, 503, "worker_unavailable")
    assert resp.headers["Retry-After"]
    ready = httpx.get(f"{gw.url}/ready")
    assert ready.status_code == 503
    for answer in (resp, ready):  # open to anyone: no internal address (the gateway's log has it)
        assert "127.0.0.1:9" not in answer.text, answer.text


def test_a_tokenizer_the_gateway_cannot_read_is_503_without_its_path(make_gateway, tiny_model_dir, tmp_path, caplog):
    """A checkpoint directory the gateway host cannot read the tokenizer from (the shared FS not mounted there,
    files missing): 503 tokenizer_unavailable, and the filesystem path only in the gateway's log, as for a worker's
    address."""
    import shutil

    source = tmp_path / "checkpoints" / "no-tokenizer"
    source.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", source)  # its context length is known, its tokenizer is not there
    gw = make_gateway(static_models={MODEL: {"worker_url": "http://127.0.0.1:9", "source": str(source)}})
    resp = gw.post("/v1/completions", json=GOOD)
    error = assert_error(resp, 503, "tokenizer_unavailable")
    assert "operator" in error["message"] and resp.headers["Retry-After"]
    assert str(tmp_path) not in resp.text, resp.text
    assert str(source) in caplog.text  # the operator learns which path


class ExplodingRouter(Router):
    """A router whose backend has a bug: the gateway must not leak the traceback."""

    def list_models(self):
        raise RuntimeError("secret internal detail")

    def resolve(self, model, wait_s, group=None, abandoned=None):
        raise RuntimeError("secret internal detail")

    def check_ready(self):
        return None


def test_unexpected_exceptions_become_a_500_in_the_error_shape(make_gateway, caplog):
    gw = make_gateway(router=ExplodingRouter())
    resp = gw.post("/v1/completions", json=GOOD)
    error = assert_error(resp, 500, "internal_error")
    assert "secret internal detail" not in resp.text
    assert see_the_log(resp.headers["X-Request-Id"]) in error["message"]  # the wording every 500 uses
    assert "secret internal detail" in caplog.text  # logged for the operator
    assert httpx.get(f"{gw.url}/health").status_code == 200


def test_a_generation_its_worker_fails_names_the_request_id_and_leaves_the_exception_to_the_log(make_gateway,
                                                                                                tiny_model_dir, caplog):
    """A worker's final "error" line carries its exception's text (the engine's: names, values, paths), and the
    client got it in generation_failed's message, answered or streamed. The client gets the request id to quote;
    the text goes to the gateway's log."""
    from .conftest import ThreadServer
    from .stand_in_worker import stand_in_worker_app

    detail = "ValueError: /secret/checkpoints/model.safetensors holds a bad tensor"
    worker = ThreadServer(stand_in_worker_app("failing-worker", lambda index: None, fail_with=detail))
    try:
        gw = make_gateway(static_models={MODEL: {"worker_url": worker.url, "source": str(tiny_model_dir)}})
        resp = gw.post("/v1/completions", json=GOOD)
        error = assert_error(resp, 500, "generation_failed")
        assert "secret" not in resp.text and resp.headers["X-Request-Id"] in error["message"], error
        with httpx.stream("POST", f"{gw.url}/v1/completions", json={**GOOD, "stream": True}, timeout=60,
                          headers={"Authorization": f"Bearer {USER_KEY}"}) as streamed:
            events = [json.loads(line[len("data: "):]) for line in streamed.iter_lines() if line.startswith("data: {")]
        error = events[-1]["error"]
        assert error["code"] == "generation_failed" and "secret" not in json.dumps(events), events
        assert streamed.headers["X-Request-Id"] in error["message"], error
        assert caplog.text.count(detail) >= 2  # logged for the operator, once per request
    finally:
        worker.stop()


@pytest.mark.parametrize("status, error_type", [(503, "engine_unavailable"), (503, "busy"), (500, "internal_error")],
                         ids=["engine-unavailable", "busy", "failed"])
def test_a_worker_that_refuses_leaves_its_own_words_to_the_log(make_gateway, tiny_model_dir, caplog, status,
                                                               error_type):
    """A worker that refuses every try (its model failed to load, its engine died, it is full, it failed) answers
    with its own words ("model failed to load: <the load error, with a path>"): the client got them in the 503 of
    the last try. The client gets the gateway's own words; the worker's go to the gateway's log."""
    from flask import Flask

    from hpcllm.worker.protocol import GENERATE_PATH, ErrorInfo, ErrorResponse

    from .conftest import ThreadServer

    detail = "model failed to load: /secret/checkpoints/model.safetensors is truncated"
    app = Flask("refusing-worker")

    @app.post(GENERATE_PATH)
    def generate():
        body = ErrorResponse(error=ErrorInfo(message=detail, type=error_type)).model_dump_json()
        return app.response_class(body, status=status, mimetype="application/json")

    worker = ThreadServer(app)
    try:
        gw = make_gateway(static_models={MODEL: {"worker_url": worker.url, "source": str(tiny_model_dir)}})
        resp = gw.post("/v1/completions", json=GOOD)
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "worker_unavailable", resp.text
        assert "secret" not in resp.text and "failed to load" not in resp.text, resp.text
        assert detail in caplog.text  # logged for the operator
    finally:
        worker.stop()


def test_draining_refuses_new_requests_and_finishes_running_streams(make_gateway):
    gateway = make_gateway()
    body = {**GOOD, "max_tokens": 40, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith("data: {")
        gateway.state.start_draining()

        resp = gateway.post("/v1/completions", json=GOOD)
        assert_error(resp, 503, "draining")
        assert resp.headers["Retry-After"]
        assert httpx.get(f"{gateway.url}/health").status_code == 200
        assert httpx.get(f"{gateway.url}/ready").status_code == 503

        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    finals = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in rest[:-1]]
    assert finals[-1] == "length"
