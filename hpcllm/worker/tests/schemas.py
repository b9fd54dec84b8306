"""A JSON schema for structured-output tests (worker and gateway) and its check."""

from __future__ import annotations

import json

PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "color": {"enum": ["red", "green", "blue"]}},
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
CONSTRAINED = dict(temperature=1.0, json_schema=PERSON_SCHEMA)


def check_person(text: str) -> dict:
    """The text as JSON, asserted valid against PERSON_SCHEMA (jsonschema is not a dependency)."""
    person = json.loads(text)
    assert set(person) == {"name", "age", "color"}, person
    assert isinstance(person["name"], str) and len(person["name"]) <= 12
    assert type(person["age"]) is int and 0 <= person["age"] <= 150
    assert person["color"] in ("red", "green", "blue")
    return person
