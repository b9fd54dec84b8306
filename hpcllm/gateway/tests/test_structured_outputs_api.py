"""response_format (OpenAI's structured outputs) through the gateway, with the official openai client: json_schema
and json_object answers parse (the tiny model's random weights write no JSON by themselves), on chat and on
completions (vLLM's extension), and schemas llguidance cannot compile are a 400 naming the field."""

from __future__ import annotations

import json

import openai
import pytest

from hpcllm.worker.tests.schemas import PERSON_SCHEMA, check_person

from .conftest import MODEL

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
