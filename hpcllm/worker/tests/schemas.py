"""Constraints for structured-output tests (worker, gateway, vLLM): a JSON schema, its grammar and its check, and
one constraint of each other kind with what its output must match."""

from __future__ import annotations

import json
import re

from hpcllm.worker.grammar import json_grammar

PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "color": {"enum": ["red", "green", "blue"]}},
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
PERSON_GRAMMAR = json_grammar(PERSON_SCHEMA)  # what the gateway sends the worker for it (GenerateRequest.grammar)
CONSTRAINED = dict(temperature=1.0, grammar=PERSON_GRAMMAR)


def check_person(text: str) -> dict:
    """The text as JSON, asserted valid against PERSON_SCHEMA (jsonschema is not a dependency)."""
    person = json.loads(text)
    assert set(person) == {"name", "age", "color"}, person
    assert isinstance(person["name"], str) and len(person["name"]) <= 12
    assert type(person["age"]) is int and 0 <= person["age"] <= 150
    assert person["color"] in ("red", "green", "blue")
    return person


# vLLM's other kinds of constraint: name -> (grammar.compile_grammar's kind, spec, whether a text matches it).
REGEX = r"[a-z]{3,8}-[0-9]{2}"
CHOICES = ["red", "green", "blue", "a dark shade of purple"]
LARK = 'start: "(" num (" + " num)? ")"\nnum: /[1-9][0-9]{0,2}/'
GBNF = 'root ::= "yes" | "no" | "maybe " [0-9]'
OTHER_CONSTRAINTS = {
    "regex": ("regex", REGEX, lambda text: re.fullmatch(REGEX, text) is not None),
    "choice": ("choice", CHOICES, lambda text: text in CHOICES),
    "lark": ("grammar", LARK,
             lambda text: re.fullmatch(r"\([1-9][0-9]{0,2}( \+ [1-9][0-9]{0,2})?\)", text) is not None),
    "gbnf": ("grammar", GBNF, lambda text: re.fullmatch(r"yes|no|maybe [0-9]", text) is not None),
}
