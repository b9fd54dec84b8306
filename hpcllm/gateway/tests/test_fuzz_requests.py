"""Property tests: whatever a client puts in a request body's fields, the gateway answers a 4xx with an OpenAI
error body (a message saying what to fix) or serves it; never a 500, a dropped connection or an error in the stream.

Each example takes a valid request of one endpoint and sets one to three of its fields (any the endpoint's wire type
declares, nested ones in messages, tools and formats included) to values a confused or hostile client sends: wrong
types, NaN and infinities, numbers past int64, empty and huge strings, nested junk. The gateway serves the tiny real
model through a real worker, so a value the gateway lets through and the worker chokes on shows up too.
"""

from __future__ import annotations

import pytest
from hypothesis import given

from hpcllm.gateway.batches.protocol import CreateBatchRequest
from hpcllm.gateway.chat.protocol import ChatCompletionRequest
from hpcllm.gateway.classify.protocol import ClassificationRequest
from hpcllm.gateway.completions.protocol import CompletionRequest
from hpcllm.gateway.conversations.protocol import ConversationCreate
from hpcllm.gateway.embeddings.protocol import EmbeddingRequest
from hpcllm.gateway.responses.protocol import ResponsesRequest
from hpcllm.gateway.score.protocol import RerankRequest, ScoreRequest
from hpcllm.gateway.tokenize.protocol import DetokenizeRequest, TokenizeRequest

from hpcllm.httpkit.tests.fuzzing import FUZZ, as_sent, field_paths, mutated_bodies, problem_in

from .conftest import MODEL

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



@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_every_endpoint_declares_the_fields_it_is_fuzzed_with(endpoint):
    """The valid body each example starts from is valid: a field renamed in a wire type fails here, not silently
    turns the fuzzer into one of 400s."""
    wire, body, _ = ENDPOINTS[endpoint]
    wire.model_validate(body)
    assert set(body) <= {path[0] for path in field_paths(wire)}  # extra="ignore" would pass a stale key


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_no_request_body_makes_the_gateway_fail(gateway, endpoint):
    wire, base, extra = ENDPOINTS[endpoint]

    @FUZZ
    @given(body=mutated_bodies(base, field_paths(wire) + extra))
    def served_or_refused(body):
        response = gateway.post(endpoint, content=as_sent(body), headers={"Content-Type": "application/json"})
        problem = problem_in(response.status_code, response.text)
        assert problem is None, f"{endpoint} {as_sent(body)[:1500]}\n-> {problem}"

    served_or_refused()
