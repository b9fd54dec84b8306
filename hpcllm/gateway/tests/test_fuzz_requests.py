"""Property tests: whatever a client puts in a request body's fields, the gateway answers a 4xx with an OpenAI
error body (a message saying what to fix) or serves it; never a 500, a dropped connection or an error in the stream.

Each example takes a valid request of one endpoint and sets one to three of its fields (any the endpoint's wire type
declares, nested ones in messages, tools and formats included) to values a confused or hostile client sends: wrong
types, NaN and infinities, numbers past int64, empty and huge strings, nested junk. The gateway serves the tiny real
model through a real worker, so a value the gateway lets through and the worker chokes on shows up too.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcllm.gateway.batches.protocol import CreateBatchRequest
from hpcllm.gateway.chat.protocol import ChatCompletionRequest
from hpcllm.gateway.classify.protocol import ClassificationRequest
from hpcllm.gateway.completions.protocol import CompletionRequest
from hpcllm.gateway.conversations.protocol import ConversationCreate
from hpcllm.gateway.embeddings.protocol import EmbeddingRequest
from hpcllm.gateway.responses.protocol import ResponsesRequest
from hpcllm.gateway.score.protocol import RerankRequest, ScoreRequest
from hpcllm.gateway.tokenize.protocol import DetokenizeRequest, TokenizeRequest

from .conftest import MODEL

# 25 examples per endpoint, the same each run (CI must not fail by chance); FUZZ_EXAMPLES=N hunts with N new ones.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "25")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=not os.environ.get("FUZZ_EXAMPLES"))

ints = st.sampled_from([-1, 0, 1, 2, 7, 2**31, 2**63, -(2**63), 10**30])
floats = st.sampled_from([0.5, -1.5, 1e308, -1e308, math.nan, math.inf, -math.inf])
scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=12), ints, floats,
    st.sampled_from(["", " ", "-1", "auto", "none", "required", "json_object", "user", "system",
                     "function", "text", "\x00", "\ud7ff" * 3, "a" * 5000, MODEL, "no-such-model",
                     # constraint texts: broken regexes and grammars, a schema's JSON text
                     "(", "[a-", "\\", "a{99999999}", "root ::= x", "start: ", '{"type": "nonsense"}']),
)
# JSON schemas that are valid JSON but odd or broken as schemas
schemas = st.sampled_from([
    {"$ref": "#/nowhere"}, {"type": "nonsense"}, {"type": "string", "pattern": "("}, {"enum": []},
    {"type": "string", "minLength": 5, "maxLength": 1}, {"type": "array", "minItems": 2**63},
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}, {"not": {}}, {"allOf": [True, False]},
    {"type": "integer", "minimum": 2, "maximum": 1}, {"format": "no-such-format", "type": "string"},
])
json_values = st.recursive(
    st.one_of(scalars, schemas),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.sampled_from(["type", "name", "role", "content", "text",
                                                                "function", "json_schema", "schema",
                                                                "parameters", "arguments", "id", "x"]),
                                               children, max_size=3)),
    max_leaves=8,
)



def like(value) -> st.SearchStrategy:
    """Values of value's JSON type with odd contents (a list's items like its first), where a type check alone
    would not stop them."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return ints
    if isinstance(value, float):
        return floats
    if isinstance(value, str):
        return st.one_of(st.text(max_size=12), scalars.filter(lambda v: isinstance(v, str)))
    if isinstance(value, list):
        return st.lists(like(value[0]) if value else json_values, max_size=4)
    if isinstance(value, dict):
        return st.fixed_dictionaries({key: like(item) for key, item in value.items()})
    return json_values


MESSAGE_PATHS = [("messages", 0, key) for key in ("role", "content", "name", "tool_calls", "tool_call_id")]
# vLLM's and OpenAI's nested sampling fields: constraints, biases, stops
SAMPLING_PATHS = [("structured_outputs", kind) for kind in ("json", "regex", "choice", "grammar")] + [
    ("response_format", "type"), ("response_format", "json_schema", "schema"), ("response_format", "json_schema",
                                                                                 "name"),
    ("logit_bias", "5"), ("logit_bias", "-1"), ("logit_bias", "99999999"), ("stop", 0), ("stop_token_ids", 0),
    ("allowed_token_ids", 0), ("bad_words", 0), ("stream_options", "include_usage")]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
# endpoint -> (a valid body, extra paths into it to set besides the wire type's top-level fields)
ENDPOINTS = {
    "/v1/completions": (CompletionRequest, {"model": MODEL, "prompt": "hello", "max_tokens": 2}, SAMPLING_PATHS),
    "/v1/chat/completions": (ChatCompletionRequest,
                             {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2,
                              "tools": [TOOL]},
                             MESSAGE_PATHS + [("tools", 0, "function", key) for key in ("name", "parameters")]
                             + [("tool_choice", "function", "name")] + SAMPLING_PATHS),
    "/v1/responses": (ResponsesRequest, {"model": MODEL, "input": "hello", "max_output_tokens": 2, "store": False},
                      [("text", "format", "type"), ("text", "format", "schema"), ("tools", 0, "type"),
                       ("tools", 0, "parameters"), ("input", 0, "content"), ("input", 0, "role")]),
    "/v1/embeddings": (EmbeddingRequest, {"model": MODEL, "input": "hello"}, []),
    "/v1/score": (ScoreRequest, {"model": MODEL, "text_1": "hello", "text_2": "world"}, []),
    "/v1/rerank": (RerankRequest, {"model": MODEL, "query": "hello", "documents": ["a", "b"]}, []),
    "/v1/classify": (ClassificationRequest, {"model": MODEL, "input": "hello"}, []),
    "/tokenize": (TokenizeRequest, {"model": MODEL, "prompt": "hello"}, []),
    "/detokenize": (DetokenizeRequest, {"model": MODEL, "tokens": [5, 6]}, []),
    "/v1/conversations": (ConversationCreate, {"items": [{"type": "message", "role": "user", "content": "hi"}]},
                          [("items", 0, "content"), ("items", 0, "role"), ("metadata", "k")]),
    "/v1/batches": (CreateBatchRequest, {"input_file_id": "file-nothere", "endpoint": "/v1/chat/completions",
                                         "completion_window": "24h"}, []),
}


def paths_of(endpoint: str) -> list[tuple]:
    wire, _, extra = ENDPOINTS[endpoint]
    return [(name,) for name in wire.model_fields] + extra


def set_path(body: dict, path: tuple, value) -> dict:
    """body with path set to value: a container on the way that is missing or of the wrong kind for the next step
    is replaced (a list for an index, else a dict); an index past a list's end appends."""
    node = body
    for step, nxt in zip(path, path[1:]):
        kind = list if isinstance(nxt, int) else dict
        child = get(node, step)
        if not isinstance(child, kind):
            child = kind()
            put(node, step, child)
        node = child
    put(node, path[-1], value)
    return body


def get_path(body: dict, path: tuple):
    """The value at path in body, None where there is none."""
    node = body
    for step in path:
        if not isinstance(node, (dict, list)) or isinstance(node, list) and not isinstance(step, int):
            return None
        node = get(node, step)
    return node


def get(node: dict | list, step):
    return node[step] if isinstance(node, list) and step < len(node) else \
        node.get(step) if isinstance(node, dict) else None


def put(node: dict | list, step, value) -> None:
    if isinstance(node, list) and step >= len(node):
        node.append(value)
    else:
        node[step] = value


@st.composite
def mutated_bodies(draw, endpoint: str):
    body = json.loads(json.dumps(ENDPOINTS[endpoint][1]))
    for path in draw(st.lists(st.sampled_from(paths_of(endpoint)), min_size=1, max_size=3, unique=True)):
        # half the time a value of the field's own type (a type check passes it), else any JSON
        body = set_path(body, path, draw(st.one_of(like(get_path(body, path)), json_values)))
    return body


def problem_in(response) -> str | None:
    """What is wrong with the gateway's answer, None if nothing: a 5xx, an error without the OpenAI body, or an
    internal error inside a 200 stream."""
    if response.status_code >= 500:
        return f"HTTP {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return f"HTTP {response.status_code} without an OpenAI error body: {response.text[:500]}"
        return None if isinstance(message, str) and message else f"an empty error message: {response.text[:500]}"
    if "internal_error" in response.text or "Traceback" in response.text:
        return f"HTTP 200 carrying an internal error: {response.text[-800:]}"
    return None


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_every_endpoint_declares_the_fields_it_is_fuzzed_with(endpoint):
    """The valid body each example starts from is valid: a field renamed in a wire type fails here, not silently
    turns the fuzzer into one of 400s."""
    wire, body, _ = ENDPOINTS[endpoint]
    wire.model_validate(body)


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_no_request_body_makes_the_gateway_fail(gateway, endpoint):
    @FUZZ
    @given(body=mutated_bodies(endpoint))
    def served_or_refused(body):
        check(gateway, endpoint, body)

    served_or_refused()


def check(gateway, endpoint: str, body: dict) -> None:
    # allow_nan: Python's json writes NaN and Infinity as clients' JSON libraries may; the gateway must refuse them.
    response = gateway.post(endpoint, content=json.dumps(body, allow_nan=True),
                            headers={"Content-Type": "application/json"})
    problem = problem_in(response)
    assert problem is None, f"{endpoint} {json.dumps(body, allow_nan=True)[:1500]}\n-> {problem}"
