"""Issue 15's smaller gateway findings, reproduced against the real gateway app in front of the real worker:
deeply nested JSON, an empty key list, and a shutdown that cut streams without a word and kept their tokens."""

from __future__ import annotations

import json
import logging
import threading

import httpx
import pytest

from .conftest import MODEL, USER_KEY
from .test_errors import assert_error

DEEP = 100_000


def deeply_nested(field: str = "prompt") -> bytes:
    return f'{{"model": "{MODEL}", "{field}": {"[" * DEEP}{"]" * DEEP}}}'.encode()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_deeply_nested_json_is_a_400_without_a_traceback(gateway, path, caplog):
    caplog.set_level(logging.WARNING)
    resp = gateway.post(path, content=deeply_nested(), headers={"Content-Type": "application/json"})
    error = assert_error(resp, 400, "invalid_json")
    assert "nested deeper than 200 levels" in error["message"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert gateway.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}).status_code == 200


def test_an_empty_key_list_closes_the_api(make_gateway):
    gw = make_gateway(api_keys=[])
    for key in (None, USER_KEY, "anything"):
        error = assert_error(gw.get("/v1/models", key=key), 401, "no_api_keys")
        assert "gateway.api_keys is empty" in error["message"]
    assert httpx.get(f"{gw.url}/health").status_code == 200  # open paths stay open


def test_an_empty_key_list_on_a_dev_cluster_is_open(make_gateway):
    from hpcllm.config import parse_config

    gw = make_gateway(api_keys=[])
    dev = parse_config({**gw.config.model_dump(mode="json"), "cluster": {"shared_secret": "s", "dev": True}})
    gw.state.config = dev
    assert gw.get("/v1/models", key=None).status_code == 200


def test_shutdown_ends_running_streams_with_an_error_event_and_settles_their_tokens(make_gateway):
    """What the drain timeout does (hpcllm.gateway.server.DrainingThreadWorker): Gateway.stop_generations."""
    tpm = 100_000
    gw = make_gateway(api_keys=[{"key": USER_KEY, "tokens_per_minute": tpm}])
    from hpcllm.gateway.ratelimit import _bucket_id

    key = gw.state.api_keys[USER_KEY]
    bucket = _bucket_id(key, "tokens")

    def level() -> float:
        return gw.state.shared.level(bucket, capacity=tpm, per_second=0.0)

    body = {"model": MODEL, "prompt": "hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {USER_KEY}"}) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")
        reserved = tpm - level()
        assert reserved >= 400  # prompt + max_tokens are reserved while it runs
        stopper = threading.Thread(target=gw.state.stop_generations, args=(5.0,))
        stopper.start()
        rest = [line for line in lines if line]
    stopper.join(10)
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "gateway_shutdown" and "shutting down" in error["message"]
    delivered = sum(1 for line in rest[:-2] if json.loads(line.removeprefix("data: "))["choices"][0]["text"])
    assert delivered < 399  # it was cut, not finished
    # The reservation was settled to what was really used (the prompt and the tokens generated), not kept.
    charged = tpm - level()
    assert charged < reserved - 100, (charged, reserved)
    assert not gw.state._generations
