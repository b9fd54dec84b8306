"""A JSON schema with a part no finite JSON value satisfies, though llguidance compiles it (references that lead only
back to themselves: {"$ref": "#"}; a required property or item of its own kind), where an answer could reach it, is a
400 naming the field that gave it and the part, not an answer that begins it and can never complete it (an empty
answer, '{"a":', a forced call cut inside its arguments); a recursive schema that does describe values still
constrains the answer."""

from __future__ import annotations

import json

import pytest

from .conftest import MODEL
from .test_errors import assert_error
from .test_tool_calling_api import TOOLS_MODEL, gw, tools_model_dir  # noqa: F401 (a model whose template has tools)

MESSAGES = [{"role": "user", "content": "who are you?"}]
SELF_REFERENCES = [
    {"$ref": "#"},
    {"anyOf": [{"$ref": "#"}]},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
]
# Schemas whose values would each hold another without end: a required property, or an array's required item
NESTED = {"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "required": ["a"],
          "$defs": {"x": {"$ref": "#/$defs/x"}}}
ENDLESS = [
    (NESTED, "#/$defs/x"),
    ({"type": "array", "items": {"$ref": "#"}, "minItems": 1}, "#"),
    ({"type": "object", "properties": {"next": {"$ref": "#"}}, "required": ["next"]}, "#"),
]


@pytest.mark.parametrize("schema", SELF_REFERENCES + [schema for schema, _ in ENDLESS],
                         ids=["root", "anyOf", "defs-loop", "nested", "array", "required-self"])
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


def test_a_schema_is_searched_for_a_part_without_values_once_not_with_every_request(gateway, monkeypatch):
    """The search walks the whole schema (milliseconds for a large one, on the gateway's loop): a client's schema
    that comes again (its tools, its response format) is not searched again, nor twice for one request."""
    from hpcllm.worker import grammar

    searched = []
    search = grammar.endless_subschema
    monkeypatch.setattr(grammar, "endless_subschema", lambda schema: searched.append(schema) or search(schema))
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 3}}, "required": ["name"],
              "description": "searched once (a schema no other test sends)"}
    for _ in range(2):
        gateway.client().chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "once", "schema": schema}})
    assert len(searched) == 1


@pytest.mark.parametrize("schema, part", ENDLESS, ids=["nested", "array", "required-self"])
def test_the_400_names_the_part_without_end(gateway, schema, part):
    error = assert_error(gateway.post("/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 8, "messages": MESSAGES,
        "response_format": {"type": "json_schema", "json_schema": {"name": "loop", "schema": schema}}}),
        400, "invalid_value", "response_format.json_schema.schema")
    assert f"'{part}'" in error["message"]


def _tool(parameters):
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


@pytest.mark.parametrize("parameters", [{"$ref": "#"}, NESTED], ids=["root", "nested"])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "f"}}],
                         ids=["required", "named"])
def test_a_forced_call_to_a_function_whose_parameters_no_value_satisfies_is_a_400(gw, parameters, tool_choice):
    """Otherwise the answer is cut inside the call ('[{"name":"f","parameters":', '{"a":'), with no tool call."""
    error = assert_error(gw.post("/v1/chat/completions", json={
        "model": TOOLS_MODEL, "max_tokens": 8, "messages": MESSAGES, "tools": [_tool(parameters)],
        "tool_choice": tool_choice}), 400, "invalid_value", "tools")
    assert "no JSON value" in error["message"]


def test_a_schema_with_one_branch_without_end_still_answers_from_another(gateway):
    """anyOf a branch no value satisfies and one that has values: the answer is a value of the second."""
    schema = {"type": "object", "properties": {"a": {"anyOf": [{"$ref": "#/$defs/x"}, {"type": "null"}]}},
              "required": ["a"], "additionalProperties": False, "$defs": {"x": {"$ref": "#/$defs/x"}}}
    answer = gateway.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "either", "schema": schema}})
    assert json.loads(answer.choices[0].message.content) == {"a": None}


def test_a_required_call_among_tools_with_values_is_a_400_naming_the_function_without(gw):
    """tool_choice "required" with a function no value fits besides one with values: a 400 naming the first one's
    parameters, not an answer that may begin a call of it and never complete it."""
    error = assert_error(gw.post("/v1/chat/completions", json={
        "model": TOOLS_MODEL, "max_tokens": 8, "messages": MESSAGES, "tool_choice": "required",
        "tools": [_tool({"$ref": "#"}), {"type": "function", "function": {"name": "g", "parameters": {
            "type": "object", "properties": {}, "additionalProperties": False}}}]}), 400, "invalid_value", "tools")
    assert "'#/$defs/f.parameters'" in error["message"]


def test_an_optional_property_no_value_satisfies_is_a_400(gateway):
    """The answer could begin it ('{"a":') and never complete it."""
    schema = {"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "$defs": {"x": {"$ref": "#/$defs/x"}}}
    error = assert_error(gateway.post("/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 8, "messages": MESSAGES,
        "response_format": {"type": "json_schema", "json_schema": {"name": "loop", "schema": schema}}}),
        400, "invalid_value", "response_format.json_schema.schema")
    assert "'#/$defs/x'" in error["message"]
