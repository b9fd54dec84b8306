"""A JSON schema that no JSON value satisfies, though llguidance compiles it (references that lead only back to
themselves: {"$ref": "#"}), is a 400 naming the field that gave it, not an empty answer (the grammar admits no
text, so the model could only end); a recursive schema that does describe values still constrains the answer."""

from __future__ import annotations

import json

import pytest

from .conftest import MODEL
from .test_errors import assert_error

MESSAGES = [{"role": "user", "content": "who are you?"}]
SELF_REFERENCES = [
    {"$ref": "#"},
    {"anyOf": [{"$ref": "#"}]},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
]


@pytest.mark.parametrize("schema", SELF_REFERENCES, ids=["root", "anyOf", "defs-loop"])
def test_a_schema_no_value_satisfies_is_a_400_naming_its_field(gateway, schema):
    for field, value, param in (
            ("response_format", {"type": "json_schema", "json_schema": {"name": "loop", "schema": schema}},
             "response_format.json_schema.schema"),
            ("structured_outputs", {"json": schema}, "structured_outputs.json"),
            ("guided_json", schema, "guided_json")):
        for path, request in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions",
                                                                                 {"prompt": "hello"})):
            error = assert_error(gateway.post(path, json={"model": MODEL, "max_tokens": 8, **request, field: value}),
                                 400, "invalid_value", param)
            assert "no JSON value" in error["message"]


def test_a_recursive_schema_with_values_still_constrains_the_answer(gateway):
    tree = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 3},
                                             "children": {"type": "array", "maxItems": 1, "items": {"$ref": "#"}}},
            "required": ["name"], "additionalProperties": False}
    answer = gateway.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "tree", "schema": tree}})
    assert isinstance(json.loads(answer.choices[0].message.content)["name"], str)
