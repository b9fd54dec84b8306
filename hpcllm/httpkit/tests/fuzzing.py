"""Request fuzzing for the HTTP APIs' property tests (hypothesis): a valid body with one to three of its fields set
to values a confused or hostile client sends (wrong types, NaN and infinities, numbers past int64, empty and huge
strings, broken regexes, grammars and schemas, nested junk), and the check that a server answered such a body as
it should: a 4xx with an OpenAI error body, or served; never a 5xx or an internal error inside a 200 stream."""

from __future__ import annotations

import copy
import json
import math
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# 10 examples per endpoint, the same each run (CI must not fail by chance; a regression guard, the default run kept
# near 30 min); FUZZ_EXAMPLES=N hunts with N new ones (1,500 per endpoint found nothing in the HTTP APIs).
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "10")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=not os.environ.get("FUZZ_EXAMPLES"))

ints = st.sampled_from([-1, 0, 1, 2, 7, 2**31, 2**63, -(2**63), 10**30])
floats = st.sampled_from([0.5, -1.5, 1e308, -1e308, math.nan, math.inf, -math.inf])
scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=12), ints, floats,
    st.sampled_from(["", " ", "-1", "auto", "none", "required", "json_object", "user", "system",
                     "function", "text", "\x00", "\ud7ff" * 3, "a" * 5000, "no-such-model",
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


def field_paths(wire) -> list[tuple]:
    """A pydantic wire type's top-level fields, by the names clients send (aliases)."""
    return [(field.alias or name,) for name, field in wire.model_fields.items()]


@st.composite
def mutated_bodies(draw, base: dict, paths: list[tuple]):
    """base (not changed) with one to three of paths set: half the time to a value of the field's own type (a type
    check passes it), else any JSON."""
    body = json.loads(json.dumps(base))
    for path in draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3, unique=True)):
        value = draw(st.one_of(like(get_path(body, path)), json_values))
        # a copy: sampled values are shared objects, and a later path may set a field inside this one
        body = set_path(body, path, copy.deepcopy(value))
    return body


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


def problem_in(status: int, text: str) -> str | None:
    """What is wrong with a server's answer (its status and body), None if nothing: a 5xx, an error without the
    OpenAI body, or an internal error inside a 200 stream."""
    if status >= 500:
        return f"HTTP {status}: {text[:500]}"
    if status >= 400:
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return f"HTTP {status} without an OpenAI error body: {text[:500]}"
        return None if isinstance(message, str) and message else f"an empty error message: {text[:500]}"
    if "internal_error" in text or "Traceback" in text:
        return f"HTTP 200 carrying an internal error: {text[-800:]}"
    return None


def as_sent(body: dict) -> str:
    """body as the request carries it: NaN and Infinity written as Python's json (and some clients') writes them."""
    return json.dumps(body, allow_nan=True)
