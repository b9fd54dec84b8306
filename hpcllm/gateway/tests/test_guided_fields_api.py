"""vLLM's older guided_* fields through the gateway as vLLM reads them: guided_json as a schema object or its JSON text
(as structured_outputs.json takes it), and guided_whitespace_pattern (structured_outputs.whitespace_pattern's older
name) refused as that field is, never dropped."""

from __future__ import annotations

import json

from hpcllm.worker.tests.schemas import PERSON_SCHEMA

from .conftest import MODEL
from .test_errors import assert_error
from .test_structured_outputs_api import MESSAGES, check_person_answers

ENDPOINTS = (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "hello"}))


def test_guided_json_as_json_text_constrains_chat_and_completions(gateway):
    check_person_answers(gateway, {"guided_json": json.dumps(PERSON_SCHEMA)})


def test_guided_json_that_is_no_schema_is_a_400_naming_it(gateway):
    for path, request in ENDPOINTS:
        for schema in ("{not json", "[1, 2]", 3):
            error = assert_error(gateway.post(path, json={"model": MODEL, "max_tokens": 4, **request,
                                                          "guided_json": schema}), 400, "invalid_value", "guided_json")
            assert "JSON schema" in error["message"]


def test_guided_whitespace_pattern_is_refused_as_structured_outputs_whitespace_pattern_is(gateway):
    for path, request in ENDPOINTS:
        body = {"model": MODEL, "max_tokens": 4, **request, "guided_json": PERSON_SCHEMA,
                "guided_whitespace_pattern": r"[ \n]*"}
        assert_error(gateway.post(path, json=body), 400, "unsupported_parameter", "guided_whitespace_pattern")
