"""response_format (OpenAI's structured outputs) through the gateway, with the official openai client: json_schema
and json_object answers parse (the tiny model's random weights write no JSON by themselves), on chat and on
completions (vLLM's extension), and schemas llguidance cannot compile are a 400 naming the field; vLLM's
structured_outputs (json, json_object, regex, choice, grammar) and older guided_* fields constrain the answer the
same way; a regex or grammar llguidance cannot compile is a 400 naming its field."""

from __future__ import annotations

import json

import openai
import pytest

from hpcllm.worker.tests.schemas import OTHER_CONSTRAINTS, PERSON_SCHEMA, check_person

from .conftest import MODEL
from .test_errors import assert_error

PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "who are you?"}]


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=3)], ids=["greedy", "seeded"])
def test_chat_json_schema_answers_validate_whole_and_streamed(gateway, sampling):
    client = gateway.client()
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64,
                                           response_format=PERSON_FORMAT, **sampling)
    assert whole.choices[0].finish_reason == "stop"
    check_person(whole.choices[0].message.content)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64, stream=True,
                                                 response_format=PERSON_FORMAT, **sampling))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


def test_json_object_chat_and_json_schema_completions(gateway, hf_pair):
    client = gateway.client()
    tokenizer = hf_pair[1]
    closers = {str(tokenizer.convert_tokens_to_ids(t)): 10 for t in ('"', "}")}  # closes the random keys soon
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64, temperature=0,
                                            logit_bias=closers, response_format={"type": "json_object"})
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    completion = client.completions.create(model=MODEL, prompt="hello", max_tokens=64, temperature=1.0, seed=1,
                                           extra_body={"response_format": PERSON_FORMAT})
    assert completion.choices[0].finish_reason == "stop"
    check_person(completion.choices[0].text)
    cut = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, temperature=1.0, seed=1,
                                    extra_body={"response_format": PERSON_FORMAT})
    assert cut.choices[0].finish_reason == "length" and completion.choices[0].text.startswith(cut.choices[0].text)


def test_bad_response_formats_are_refused_naming_the_field(gateway):
    client = gateway.client()

    def refused(response_format, error):
        with pytest.raises(error) as caught:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                           response_format=response_format)
        return caught.value.body

    body = refused({"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objekt"}}},
                   openai.BadRequestError)
    assert body["param"] == "response_format.json_schema.schema" and body["code"] == "invalid_value"
    assert "objekt" in body["message"]
    body = refused({"type": "json_schema", "json_schema": {"name": "bad", "schema": {"$ref": "#/nowhere"}}},
                   openai.BadRequestError)
    assert body["param"] == "response_format.json_schema.schema" and "nowhere" in body["message"]
    assert refused({"type": "json_schema"}, openai.BadRequestError)["param"] == "response_format.json_schema"
    assert refused({"type": "yaml"}, openai.UnprocessableEntityError)["param"] == "response_format.type"


def check_person_answers(gateway, constraint: dict) -> None:
    """A chat answer (seeded) and a completion (greedy) asked with `constraint` (extra body fields holding
    PERSON_SCHEMA) each stop by themselves, and what they say validates as PERSON_SCHEMA."""
    client = gateway.client()
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64, temperature=1.0, seed=2,
                                            extra_body=constraint)
    assert answer.choices[0].finish_reason == "stop"
    check_person(answer.choices[0].message.content)
    completion = client.completions.create(model=MODEL, prompt="hello", max_tokens=64, temperature=0,
                                           extra_body=constraint)
    assert completion.choices[0].finish_reason == "stop"
    check_person(completion.choices[0].text)


@pytest.mark.parametrize("constraint", [
    {"structured_outputs": {"json": PERSON_SCHEMA}},
    {"structured_outputs": {"json": json.dumps(PERSON_SCHEMA), "disable_any_whitespace": True}},  # vLLM takes both
    {"guided_json": PERSON_SCHEMA},
], ids=["structured_outputs", "as-json-text", "guided_json"])
def test_vllms_structured_outputs_json_on_chat_and_completions(gateway, constraint):
    check_person_answers(gateway, constraint)


def test_structured_outputs_json_object(gateway, hf_pair):
    closers = {str(hf_pair[1].convert_tokens_to_ids(t)): 10 for t in ('"', "}")}
    answer = gateway.client().completions.create(model=MODEL, prompt="hello", max_tokens=64, temperature=0,
                                                 logit_bias=closers,
                                                 extra_body={"structured_outputs": {"json_object": True}})
    assert isinstance(json.loads(answer.choices[0].text), dict)


# vLLM's other constraints (OTHER_CONSTRAINTS' names), through structured_outputs and the older guided_* fields.
SPECS = {name: spec for name, (_, spec, _) in OTHER_CONSTRAINTS.items()}
CONSTRAINTS = {
    "regex": {"structured_outputs": {"regex": SPECS["regex"]}}, "guided_regex": {"guided_regex": SPECS["regex"]},
    "choice": {"structured_outputs": {"choice": SPECS["choice"]}}, "guided_choice": {"guided_choice": SPECS["choice"]},
    "lark": {"structured_outputs": {"grammar": SPECS["lark"]}}, "gbnf": {"guided_grammar": SPECS["gbnf"]},
}


@pytest.mark.parametrize("name", CONSTRAINTS)
def test_regex_choice_and_grammar_constrain_chat_and_completions(gateway, name):
    constraint, matches = CONSTRAINTS[name], OTHER_CONSTRAINTS[name.removeprefix("guided_")][2]
    client = gateway.client()
    for sampling in (dict(temperature=0), dict(temperature=1.0, seed=4)):
        answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=32, extra_body=constraint,
                                                **sampling)
        assert answer.choices[0].finish_reason == "stop" and matches(answer.choices[0].message.content)
        completion = client.completions.create(model=MODEL, prompt="hello", max_tokens=32, extra_body=constraint,
                                               **sampling)
        assert completion.choices[0].finish_reason == "stop" and matches(completion.choices[0].text)


@pytest.mark.parametrize("body, status, code, param", [
    ({"structured_outputs": {"regex": "[a-z"}}, 400, "invalid_value", "structured_outputs.regex"),
    ({"guided_regex": "(open"}, 400, "invalid_value", "guided_regex"),
    ({"structured_outputs": {"grammar": "start: missing_rule"}}, 400, "invalid_value", "structured_outputs.grammar"),
    ({"guided_grammar": "root ::= \"a\" undefined"}, 400, "invalid_value", "guided_grammar"),
    ({"structured_outputs": {"grammar": "no grammar at all"}}, 400, "invalid_value", "structured_outputs.grammar"),
    ({"structured_outputs": {"choice": []}}, 422, "invalid_value", "structured_outputs.choice"),
    ({"guided_choice": ["yes", 1]}, 422, "invalid_value", "guided_choice[1]"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, 400, "invalid_value", "structured_outputs"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, 400, "invalid_value", "guided_regex"),
    ({"structured_outputs": {"structural_tag": "{}"}}, 400, "unsupported_parameter",
     "structured_outputs.structural_tag"),
    ({"structured_outputs": {"json": "{not json"}}, 400, "invalid_value", "structured_outputs.json"),
    ({"structured_outputs": {"json": {"type": "objekt"}}}, 400, "invalid_value", "structured_outputs.json"),
    ({"structured_outputs": {"json": {"type": "object"}, "json_object": True}}, 400, "invalid_value",
     "structured_outputs"),
    ({"structured_outputs": {"json": {"type": "object"}}, "response_format": {"type": "json_object"}}, 400,
     "invalid_value", "structured_outputs"),
    ({"guided_json": {"type": "objekt"}}, 400, "invalid_value", "guided_json"),
    # no constraint at all (vLLM's 400 too): a misspelt field ("json_schema" for "json") would otherwise leave the
    # answer free text
    ({"structured_outputs": {}}, 400, "invalid_value", "structured_outputs"),
    ({"structured_outputs": {"json_schema": {"type": "object"}, "disable_any_whitespace": True}}, 400,
     "invalid_value", "structured_outputs"),
])
def test_structured_outputs_that_cannot_be_done_are_refused_naming_the_field(gateway, body, status, code, param):
    for path, request in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "hi"})):
        assert_error(gateway.post(path, json={"model": MODEL, "max_tokens": 4, **request, **body}), status, code,
                     param)


def test_a_thinking_budget_for_a_model_that_does_not_think_is_refused(gateway):
    """vLLM refuses thinking_token_budget without a reasoning parser; this model's template writes no thinking."""
    error = assert_error(gateway.post("/v1/chat/completions", json={
        "model": MODEL, "messages": MESSAGES, "response_format": PERSON_FORMAT, "thinking_token_budget": 8}),
        400, "invalid_value", "thinking_token_budget")
    assert "reasoning model" in error["message"]
